"""Extract a LoRA from a fine-tuned model: the truncated SVD of (tuned - original) of every LoRA-able layer
(kohya-ss/sd-scripts' extract_lora_from_models.py).

    python networks/extract_lora_from_models.py --model_org v1-5.safetensors --model_tuned my_finetune.safetensors \\
        --dim 64 --conv_dim 32 --save_to extracted.safetensors

Layers: the attention layers (and the text encoder's), plus with --conv_dim the ResNet and sampler layers (their
3x3 convs at --conv_dim, Linear and 1x1 layers at --dim), the same set train_network.py trains. Each layer keeps
min(--dim, its own limit min(out, in x kh x kw)) singular values, with alpha = rank. The text encoder is skipped
when no weight of it differs by more than --min_diff (kohya). --clamp_quantile clips outlying factor entries
(1 = no clipping: with a rank that holds the whole difference, the LoRA then reproduces it exactly).

Both models may be in any format the suite reads (original .safetensors / .ckpt, diffusers folder) and must be
of one family: SD 1.x, SD 2.x or SDXL (detected; --v2 / --sdxl / --v_parameterization are checked against the
files). For SDXL both text encoders are extracted (lora_te1_ / lora_te2_) when either differs by more than
--min_diff, as kohya does. They are read one weight at a time, never whole.
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
from tqdm import tqdm  # noqa: E402

from library.atomic_files import check_writable_output  # noqa: E402
from library.checkpoint_writer import modelspec_keys, parse_save_precision  # noqa: E402
from library.families import PredictionType  # noqa: E402
from library.sd_checkpoint import FamilyHints, SDCheckpoint, read_checkpoint  # noqa: E402
from networks.lora_checkpoint import check_same_structure, lora_layers, weight_difference  # noqa: E402
from networks.lora_files import (LoRAFactors, LoRAFileError, check_lora_output_path, lora_metadata,  # noqa: E402
                                 write_lora_file)
from networks.lora_files import run_file_tool  # noqa: E402
from networks.lora_math import check_rank_fits, svd_of_matrix  # noqa: E402

logger = logging.getLogger("extract_lora")


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--v2", action="store_true", help="assert the models are SD 2.x (detected anyway)")
    p.add_argument("--v_parameterization", action="store_true",
                   help="the models predict v; only needed when the files do not say so themselves")
    p.add_argument("--sdxl", action="store_true", help="assert the models are SDXL (detected anyway)")
    p.add_argument("--model_org", required=True, help="the original model (.safetensors / .ckpt / diffusers folder)")
    p.add_argument("--model_tuned", required=True, help="the fine-tuned model")
    p.add_argument("--save_to", required=True, help="output LoRA (.safetensors / .pt)")
    p.add_argument("--dim", type=int, default=4, help="rank of Linear and 1x1 conv modules (default 4)")
    p.add_argument("--conv_dim", type=int, default=None,
                   help="also extract the ResNet / sampler layers, 3x3 convs at this rank (LoCon)")
    p.add_argument("--clamp_quantile", type=float, default=0.99,
                   help="clip factor entries beyond this quantile (default 0.99); 1 = no clipping")
    p.add_argument("--min_diff", type=float, default=0.01,
                   help="skip the text encoder if none of its weights differs by more than this (default 0.01)")
    p.add_argument("--load_precision", choices=["float", "fp16", "bf16"], default=None,
                   help="round both models' weights to this precision before taking differences")
    p.add_argument("--save_precision", choices=["float", "fp16", "bf16"], default=None,
                   help="precision of the saved file (default float)")
    p.add_argument("--device", default=None, help="device for the SVD, e.g. cuda (default cpu)")
    p.add_argument("--no_metadata", action="store_true", help="write only the essential ss_* metadata")
    for flag in ("--load_original_model_to", "--load_tuned_model_to"):  # kohya's SDXL flags: refused, see main
        p.add_argument(flag, default=None, help="refused: kohya places whole models on devices with it; this tool "
                                                "reads both models tensor by tensor (--device: where the SVD runs)")
    return p


def extract(original: SDCheckpoint, tuned: SDCheckpoint, *, dim: int, conv_dim: int | None = None,
            clamp_quantile: float = 0.99, min_diff: float = 0.01, load_dtype: torch.dtype | None = None,
            device: str | None = None) -> dict[str, LoRAFactors]:
    for flag, value in (("--dim", dim), ("--conv_dim", conv_dim)):
        if value is not None and value < 1:
            raise LoRAFileError(f"{flag} {value}: the rank must be at least 1")
    if not 0.0 < clamp_quantile <= 1.0:
        raise LoRAFileError(f"--clamp_quantile {clamp_quantile}: must be in (0, 1]; 1 = no clipping")
    layers = lora_layers(original, conv=conv_dim is not None)

    def limit(layer) -> int:
        return min(layer.shape[0], int(torch.Size(layer.shape[1:]).numel()))

    def is_kxk(layer) -> bool:
        return len(layer.shape) == 4 and layer.shape[2:] != (1, 1)

    check_rank_fits("--dim", dim, {n: limit(l) for n, l in layers.items() if not is_kxk(l)})
    if conv_dim is not None:
        check_rank_fits("--conv_dim", conv_dim, {n: limit(l) for n, l in layers.items() if is_kxk(l)})

    text_encoder = {n: l for n, l in layers.items() if l.component != "unet"}  # every text encoder of the family
    te_max = max((float(weight_difference(original, tuned, l, load_dtype).abs().max()) for l in text_encoder.values()),
                 default=0.0)
    if te_max <= min_diff:
        logger.warning("the text encoders do not differ (largest difference %.3g <= --min_diff %g): extracting the "
                       "U-Net only", te_max, min_diff)
        layers = {n: l for n, l in layers.items() if l.component != "text_encoder"}
    else:
        logger.info("the text encoders differ (largest difference %.3g > --min_diff %g)", te_max, min_diff)

    modules = {}
    for name, layer in tqdm(layers.items(), desc="extracting", unit="module"):
        difference = weight_difference(original, tuned, layer, load_dtype)
        svd = svd_of_matrix(difference, device)
        rank = min(conv_dim if is_kxk(layer) else dim, svd.full_rank)
        modules[name] = svd.factors(rank, scale=1.0, clamp_quantile=clamp_quantile)
    return modules


def family_metadata(checkpoint: SDCheckpoint, title: str, *, with_modelspec: bool) -> dict[str, str]:
    """What a LoRA for this model says about its base (as train_network.py writes it)."""
    family = checkpoint.family
    v = checkpoint.prediction_type is PredictionType.V_PREDICTION
    # SD 2.x has a v family of its own; a v-prediction SD 1.x gets "sd_v1_v". kohya writes SDXL's version as it is
    # (modelspec.prediction_type says "v" for a v-prediction SDXL).
    metadata = {"ss_v2": str(family.is_v2),
                "ss_base_model_version": family.ss_base_model_version + ("_v" if v and family.arch == "sd1" else "")}
    if with_modelspec:
        metadata.update(modelspec_keys(family, checkpoint.prediction_type, kind="lora", implementation="diffusers"))
        metadata["modelspec.title"] = title
    return metadata


def check_sdxl_flag(checkpoint: SDCheckpoint, path: str) -> None:
    """kohya's --sdxl says which loader to use; here the family is detected, and the flag only checked."""
    if not checkpoint.family.arch.startswith("sdxl"):
        raise LoRAFileError(f"{path}: --sdxl was given, but this is {checkpoint.family.description}. Remove --sdxl; "
                            "the family is detected from the file.")


def run(args: argparse.Namespace) -> Path:
    dest = check_lora_output_path(args.save_to)
    check_writable_output(dest, sources=[args.model_org, args.model_tuned])
    hints = FamilyHints(v2=True if args.v2 else None, v_parameterization=args.v_parameterization)
    with read_checkpoint(args.model_org, hints) as original, read_checkpoint(args.model_tuned, hints) as tuned:
        logger.info("%s: %s", args.model_org, original.family.description)
        if args.sdxl:
            check_sdxl_flag(original, args.model_org)
        check_same_structure(original, tuned, (args.model_org, args.model_tuned))
        modules = extract(original, tuned, dim=args.dim, conv_dim=args.conv_dim, clamp_quantile=args.clamp_quantile,
                          min_diff=args.min_diff, load_dtype=parse_save_precision(args.load_precision),
                          device=args.device)
        titles = [c.metadata.get("modelspec.title") or Path(p).stem
                  for c, p in ((tuned, args.model_tuned), (original, args.model_org))]
        base = family_metadata(tuned, dest.stem, with_modelspec=not args.no_metadata)
    network_args = {"conv_dim": str(args.conv_dim), "conv_alpha": str(float(args.conv_dim))} if args.conv_dim else {}
    base["ss_network_args"] = json.dumps(network_args)
    metadata = lora_metadata(base, modules,
                             comment=None if args.no_metadata else f"extracted: {titles[0]} - {titles[1]}")
    return write_lora_file(dest, modules, metadata, parse_save_precision(args.save_precision))


def main(argv: list[str] | None = None) -> int:
    return run_file_tool(refuse_placement_then_run, setup_parser, argv)


def refuse_placement_then_run(args: argparse.Namespace) -> None:
    placed = [flag for flag in ("--load_original_model_to", "--load_tuned_model_to") if getattr(args, flag[2:])]
    if placed:
        # kohya loads both whole models, on these devices, to fit SDXL in memory; here both are read tensor by
        # tensor (a few tensors in memory at once), so there is no model to place.
        raise ValueError(f"{', '.join(placed)}: this tool reads both models tensor by tensor, never a whole model, "
                         "so there is nothing to place; drop the flag(s) (--device chooses where the SVD runs)")
    run(args)


if __name__ == "__main__":
    sys.exit(main())
