"""Weighted merge of N Stable Diffusion checkpoints (kohya-ss/sd-scripts' tools/merge_models.py).

Every weight becomes sum_i ratio_i * W_i (ratios default to 1/N each; they need not sum to 1, e.g. "add
difference" merges use 1 1 -1):

    python tools/merge_models.py --models a.safetensors b_diffusers_folder c.ckpt --ratios 0.5 0.3 0.2 \\
        --output merged.safetensors

- Inputs in any format the suite reads (original .safetensors / .ckpt, diffusers folders), all of one family
  (SD 1.x or SD 2.x; detected). A layout difference such as Linear vs 1x1-conv proj_in is reconciled.
- `--unet_only`: merge the U-Net only; the text encoder and VAE are the first model's.
- The output format follows --output: .safetensors, .ckpt, or a folder (diffusers); kohya added ".safetensors" to
  a name without a suffix, here such a name is a diffusers folder.
- The merge is computed one tensor at a time while writing (memory: about one tensor per input), atomically, and
  the file records `modelspec.merged_from`. The DDPM schedule buffers of an original file are constants and are
  taken from the first model; EMA weights of inputs are not merged (dropped).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from library.atomic_files import check_writable_output  # noqa: E402
from library.checkpoint_writer import SAVE_DTYPES, SaveFormat, save_checkpoint  # noqa: E402
from library.key_maps import LDM_SCHEDULE_BUFFERS  # noqa: E402
from library.sd_checkpoint import SDCheckpoint, read_checkpoint  # noqa: E402
from library.tensor_files import CheckpointError, LazyTensor  # noqa: E402
from networks.lora_checkpoint import check_same_structure  # noqa: E402
from networks.lora_files import check_ratios  # noqa: E402
from tools.convert_diffusers20_original_sd import check_no_overlap  # noqa: E402

logger = logging.getLogger("merge_models")


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, help="models to merge (any format, one family)")
    p.add_argument("--output", required=True, help="output: .safetensors, .ckpt, or a folder (diffusers)")
    p.add_argument("--ratios", nargs="+", type=float, default=None, help="one ratio per model (default 1/N each)")
    p.add_argument("--unet_only", action="store_true", help="merge the U-Net only; text encoder and VAE of the first")
    p.add_argument("--device", default="cpu", help="device for the arithmetic (default cpu)")
    p.add_argument("--precision", choices=["float", "fp16", "bf16"], default="float",
                   help="precision of the arithmetic (default float)")
    p.add_argument("--saving_precision", "--save_precision", dest="saving_precision",
                   choices=["float", "fp16", "bf16"], default="float", help="precision of the output (default float)")
    p.add_argument("--show_skipped", action="store_true", help="list the tensors not merged (EMA weights)")
    return p


def _weighted_sum(parts: list[tuple[LazyTensor, float, str]], shape: tuple[int, ...], dtype: torch.dtype,
                  device: str, key: str) -> LazyTensor:
    def load() -> torch.Tensor:
        total = None
        for lazy, ratio, source in parts:
            tensor = lazy.load().to(device=device, dtype=dtype).reshape(shape)
            if not torch.isfinite(tensor).all():
                raise CheckpointError(f"{source}: {key} holds NaN / Inf values; a merge with it would be broken. "
                                      "Nothing was written.")
            total = ratio * tensor if total is None else total + ratio * tensor
        return total.cpu()

    return LazyTensor(tuple(shape), dtype, load)


def merge_checkpoints(checkpoints: list[SDCheckpoint], names: list[str], ratios: list[float], *,
                      unet_only: bool = False, dtype: torch.dtype = torch.float32, device: str = "cpu",
                      show_skipped: bool = False) -> SDCheckpoint:
    """The first checkpoint with every tensor replaced by the lazily computed weighted sum."""
    first = checkpoints[0]
    for other, name in zip(checkpoints[1:], names[1:]):
        check_same_structure(first, other, (names[0], name))
    tensors = {}
    for component, own in first.tensors.items():
        if unet_only and component != "unet":
            tensors[component] = own  # the first model's, as kohya does
            continue
        tensors[component] = {key: _weighted_sum([(c.tensors[component][key], r, n) for c, r, n in
                                                  zip(checkpoints, ratios, names)], lazy.shape, dtype, device, key)
                              for key, lazy in own.items()}
    extras, dropped = {}, []
    for key, lazy in first.extras.items():
        if key.startswith("model_ema."):
            dropped.append(key)
        elif key in LDM_SCHEDULE_BUFFERS or unet_only:
            extras[key] = lazy  # schedule constants (and, with --unet_only, text-encoder extras) from the first
        elif all(key in c.extras and c.extras[key].shape == lazy.shape for c in checkpoints):
            extras[key] = _weighted_sum([(c.extras[key], r, n) for c, r, n in zip(checkpoints, ratios, names)],
                                        lazy.shape, dtype, device, key)
        else:
            logger.warning("%s is not in every model; the first model's value is kept", key)
            extras[key] = lazy
    if dropped:
        logger.info("EMA weights are not merged: %d tensor(s) dropped%s", len(dropped),
                    (": " + ", ".join(dropped)) if show_skipped else " (--show_skipped lists them)")
    return replace(first, tensors=tensors, extras=extras, _open=[])


def run(args: argparse.Namespace) -> Path:
    dest = Path(args.output)
    fmt = SaveFormat.from_path(dest)
    sources = [Path(m) for m in args.models]
    check_writable_output(dest, sources=sources)
    check_no_overlap(dest, sources)
    ratios = check_ratios(len(args.models), args.ratios, default=1.0 / len(args.models))
    logger.info("ratios %s (sum %g)%s", ratios, sum(ratios), ", U-Net only" if args.unet_only else "")
    with ExitStack() as stack:
        checkpoints = [stack.enter_context(read_checkpoint(m)) for m in args.models]
        merged = merge_checkpoints(checkpoints, args.models, ratios, unet_only=args.unet_only,
                                   dtype=SAVE_DTYPES[args.precision], device=args.device,
                                   show_skipped=args.show_skipped)
        titles = [c.metadata.get("modelspec.title") or Path(m).stem for c, m in zip(checkpoints, args.models)]
        metadata = {"modelspec.title": dest.stem, "modelspec.merged_from": ", ".join(titles)}
        return save_checkpoint(merged, dest, fmt, dtype=SAVE_DTYPES[args.saving_precision], metadata=metadata,
                               progress=True)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    args = setup_parser().parse_args(argv)
    try:
        run(args)
    except ValueError as e:  # CheckpointError, OutputPathError, LoRAFileError
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
