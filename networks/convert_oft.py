"""Write a kohya OFT file (networks.oft) under LyCORIS' names, the OFT layout ComfyUI and WebUI read for every model
family. Not a kohya script: kohya's OFT files have no other way into ComfyUI.

    python networks/convert_oft.py --model my_oft.safetensors --save_to my_oft_comfy.safetensors

Why: kohya names OFT modules `oft_unet_...`. ComfyUI (and LyCORIS) only look for `lora_unet_...` (and `lycoris_...`)
names, so they skip kohya's files; WebUI maps `oft_unet_` to its own names only for SDXL (original-layout names),
not for SD 1.x / 2.x files (diffusers-layout names). All three read `<lora_unet name>.oft_blocks` [k, n, n] with
`.alpha` as LyCORIS' diagonal OFT, computing R as kohya does (Cayley transform of B - Bᵀ; W' = Rᵀ W per block of
output rows), but they read alpha differently: WebUI and LyCORIS clamp |Q| to alpha * out as kohya does, ComfyUI to
alpha itself. So the output folds the constraint into the blocks instead: each module's oft_blocks is scaled by
min(1, constraint / |Q|), the factor kohya's forward applies, and alpha is written as 0, which all three read as
"no constraint". Every reader then computes the rotations the kohya file meant (to fp32 rounding).

The names keep their layout (`lora_unet_down_blocks_...` for SD 1.x / 2.x, `lora_unet_input_blocks_...` for
SDXL), which ComfyUI and WebUI both map; the metadata is carried over, marked as LyCORIS' diag-oft. LyCORIS itself
loads the output where its block shapes agree with its own factorisation (at least as many blocks as each block's
size) and the names are diffusers' (SD 1.x / 2.x).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from library.atomic_files import atomic_file, check_writable_output  # noqa: E402
from library.safetensors_io import save_tensors  # noqa: E402
from library.tensor_files import CheckpointError, open_tensor_file  # noqa: E402
from library.textual_inversion import split_bundled  # noqa: E402
from networks.lora import PREFIX_UNET  # noqa: E402
from networks.lora_files import check_lora_output_path, run_file_tool  # noqa: E402
from networks.oft import PREFIX_UNET as OFT_PREFIX  # noqa: E402
from networks.oft import dims_from_weights  # noqa: E402

logger = logging.getLogger("convert_oft")


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="kohya OFT file (networks.oft; .safetensors / .pt)")
    p.add_argument("--save_to", required=True, help="output (.safetensors with metadata, or .pt)")
    return p


def constrained_blocks(blocks: torch.Tensor, alpha: float) -> torch.Tensor:
    """oft_blocks scaled so that |B - Bᵀ| is within kohya's constraint alpha * out (out = blocks x block size):
    what kohya's forward does to Q, done once to the stored blocks (Q is linear in B). Unchanged where within it or
    where alpha is 0 (no constraint)."""
    constraint = alpha * blocks.shape[0] * blocks.shape[1]
    b = blocks.float()
    norm = (b - b.transpose(1, 2)).norm().item()
    if constraint <= 0 or norm <= constraint:
        return blocks
    return (b * (constraint / norm)).to(blocks.dtype)


def lycoris_tensors(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """The converted tensors, and how many modules had their blocks scaled to the constraint."""
    dims, alphas = dims_from_weights(weights)  # refuses anything but kohya's OFT layout, by key
    out, clamped = {}, 0
    for name in dims:
        blocks = weights[f"{name}.oft_blocks"]
        scaled = constrained_blocks(blocks, alphas[name])
        clamped += scaled is not blocks
        target = PREFIX_UNET + name[len(OFT_PREFIX):]
        out[f"{target}.oft_blocks"] = scaled.contiguous()
        out[f"{target}.alpha"] = torch.tensor(0.0)  # no constraint: it is in the blocks now
    return out, clamped


def convert(args: argparse.Namespace) -> Path:
    dest = check_lora_output_path(args.save_to)
    check_writable_output(dest, sources=[args.model])
    try:
        with open_tensor_file(args.model) as source:
            weights = {name: lazy.load() for name, lazy in source.tensors.items()}
            metadata = dict(source.metadata)
    except CheckpointError as e:
        raise ValueError(str(e)) from e
    weights, bundled = split_bundled(weights)
    try:
        tensors, clamped = lycoris_tensors(weights)
    except ValueError as e:
        raise ValueError(f"{args.model}: {e}") from None
    modules = len(tensors) // 2
    tensors.update(bundled)  # WebUI and ComfyUI read bundled embeddings from any network file
    metadata = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}
    metadata.update({"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "diag-oft"}),
                     "ss_training_comment": "converted from kohya's networks.oft: constraint folded into oft_blocks, "
                                            "alpha 0" + (f"; {metadata['ss_training_comment']}"
                                                         if metadata.get("ss_training_comment") not in (None, "None")
                                                         else "")})
    if dest.suffix.lower() == ".safetensors":
        from library.training_metadata import additional_networks_hashes

        network_tensors = {k: v for k, v in tensors.items() if k not in bundled}
        metadata.update(additional_networks_hashes(network_tensors, None, metadata))
        save_tensors(dest, tensors, metadata)
    else:
        with atomic_file(dest) as tmp:
            torch.save(tensors, tmp)
    logger.info("wrote %s: %d OFT modules under lora_unet_ names (%d scaled to their constraint)", dest,
                modules, clamped)
    return dest


def main(argv: list[str] | None = None) -> int:
    return run_file_tool(convert, setup_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
