"""Merge kohya LoRAs into a Stable Diffusion checkpoint, or into one LoRA (kohya-ss/sd-scripts' merge_lora.py).

Into a model: every weight a LoRA touches becomes W + ratio * ΔW (ΔW = up @ down * alpha / rank), exactly what
applying the LoRA at multiplier `ratio` computes:

    python networks/merge_lora.py --sd_model model.safetensors --models style.safetensors char.safetensors \\
        --ratios 0.8 0.6 --save_to merged.safetensors

Into one LoRA (no --sd_model):
- `--concat`: the exact sum of ratio * ΔW of all inputs, as one LoRA whose rank is the sum of the inputs' ranks;
- default: a LoRA of the inputs' rank. A module found in one input is copied (times its ratio: exact). A module
  found in several inputs (they must have the same rank there) gets the best approximation of the summed update at
  that rank (truncated SVD); that is exact whenever the sum fits in the rank, and the Frobenius norm retained is
  reported otherwise. (kohya instead adds the up and down matrices of the inputs separately, which is not the sum
  of the updates and squares the ratio of a single LoRA, issue #868.)

`--lbws` (kohya's LoRA block weights, networks/lora_block_weights.py) gives each LoRA one weight per U-Net block
(BASE = the text encoders, IN00..IN11, MID, OUT00..OUT11), as a JSON list of 12, 17, 20 or 26 numbers:

    python networks/merge_lora.py --sd_model model.safetensors --models style.safetensors --ratios 0.8 \\
        --lbws "[1,0,0,0,0,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1]" --save_to merged.safetensors

A module then contributes ratio * weight * ΔW, into a model and into a LoRA alike: the block weight multiplies the
update as the ratio does (kohya multiplies both factors of a LoRA-into-LoRA merge by it, which squares it). Into a
model, the weights of modules at block weight 0 are left exactly as they were.

Inputs: LoRA files as .safetensors / .pt / .ckpt; the model (SD 1.x, SD 2.x or SDXL: detected from the file) as
an original .safetensors / .ckpt or a diffusers folder. A LoRA made for another family is refused, saying which
family its names point to. networks/sdxl_merge_lora.py, kohya's SDXL name for this tool, runs this one.

The output format follows --save_to: .safetensors, .ckpt or a folder (diffusers) for a model; .safetensors (with
metadata) or .pt for a LoRA. Outputs are written atomically, with `modelspec.merged_from` naming the inputs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from library.atomic_files import check_writable_output  # noqa: E402
from library.checkpoint_writer import SAVE_DTYPES, SaveFormat, parse_save_precision, save_checkpoint  # noqa: E402
from library.sd_checkpoint import FamilyHints, read_checkpoint  # noqa: E402
from networks.lora_block_weights import (add_lbws_argument, module_block_weights, parse_lbws,  # noqa: E402
                                         weighted_terms)
from networks.lora_checkpoint import merge_into_checkpoint  # noqa: E402
from networks.lora_files import (LoRAFactors, LoRAFile, LoRAFileError, bundles_of,  # noqa: E402
                                 check_lora_output_path, check_same_layers, identity_metadata, lora_metadata,
                                 read_lora_files, short_list, warn_bundles_left_out, write_lora_file)
from networks.lora_math import Retention, concat_factors, svd_of_factors  # noqa: E402
from tools.convert_diffusers20_original_sd import check_no_overlap  # noqa: E402

logger = logging.getLogger("merge_lora")


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--v2", action="store_true", help="assert --sd_model is SD 2.x (detected from the weights anyway)")
    p.add_argument("--save_precision", choices=["float", "fp16", "bf16"], default=None,
                   help="precision of the saved file (default: --precision)")
    p.add_argument("--precision", choices=["float", "fp16", "bf16"], default="float",
                   help="precision of the merged weights (the deltas are always computed in fp32); default float")
    p.add_argument("--sd_model", default=None,
                   help="model to merge into (.safetensors / .ckpt / diffusers folder); without it the LoRAs are "
                        "merged into one LoRA")
    p.add_argument("--save_to", required=True,
                   help="output: a model (.safetensors / .ckpt / folder) or a LoRA (.safetensors / .pt)")
    p.add_argument("--models", nargs="+", required=True, help="LoRA files to merge (.safetensors / .pt / .ckpt)")
    p.add_argument("--ratios", type=float, nargs="*", default=None,
                   help="one multiplier per LoRA (default 1.0 each)")
    p.add_argument("--no_metadata", action="store_true",
                   help="write only the essential metadata (no modelspec title / merged_from)")
    p.add_argument("--concat", action="store_true",
                   help="LoRA + LoRA: concatenate the ranks, so the result is the exact sum (rank = sum of ranks)")
    p.add_argument("--shuffle", action="store_true", help="LoRA + LoRA: permute the ranks of each output module")
    add_lbws_argument(p)
    return p


# ---------------------------------------------------------------------------------------------- into a model


def merge_into_model(args: argparse.Namespace) -> Path:
    dest = Path(args.save_to)
    fmt = SaveFormat.from_path(dest)
    sources = [Path(args.sd_model), *map(Path, args.models)]
    check_writable_output(dest, sources=sources)
    check_no_overlap(dest, sources)
    lbws = parse_lbws(args.lbws, len(args.models))
    loras, ratios = read_lora_files(args.models, args.ratios)
    warn_bundles_left_out(loras, f"the merged model {dest}")
    merge_dtype = SAVE_DTYPES[args.precision]
    save_dtype = parse_save_precision(args.save_precision) or merge_dtype
    with read_checkpoint(args.sd_model, FamilyHints(v2=True if args.v2 else None)) as checkpoint:
        logger.info("%s: %s", args.sd_model, checkpoint.family.description)
        merged = merge_into_checkpoint(checkpoint, list(zip(loras, ratios)), merge_dtype,
                                       module_block_weights(loras, lbws, checkpoint))
        base_title = checkpoint.metadata.get("modelspec.title") or Path(args.sd_model).stem
        metadata = None if args.no_metadata else {
            "modelspec.title": dest.stem,
            "modelspec.merged_from": ", ".join([base_title] + [lora.title for lora in loras])}
        return save_checkpoint(merged, dest, fmt, dtype=save_dtype, metadata=metadata, progress=True)


# ---------------------------------------------------------------------------------------------- into a LoRA


def merge_lora_files(loras: list[LoRAFile], ratios: list[float], *, concat: bool = False, shuffle: bool = False,
                     block_weights: list[dict[str, float]] | None = None,
                     ) -> tuple[dict[str, LoRAFactors], dict[str, Retention]]:
    """One LoRA from several: (modules, retention of the modules that had to be re-factored). `block_weights`: per
    LoRA, a weight per module (--lbws) that multiplies its ratio."""
    check_same_layers(loras)
    terms = weighted_terms(loras, ratios, block_weights)
    if not concat:
        mixed = [f"{name}: ranks {', '.join(str(f.rank) for f, _ in t)}" for name, t in terms.items()
                 if len({f.rank for f, _ in t}) > 1]
        if mixed:
            raise LoRAFileError(f"{len(mixed)} module(s) have different ranks in different inputs, so they cannot be "
                                f"merged at one rank:\n    {short_list(mixed)}\n  Use --concat (rank = sum of ranks, "
                                "exact) or svd_merge_lora.py --new_rank N.")
    modules, retention = {}, {}
    for name, module_terms in tqdm(terms.items(), desc="merging", unit="module"):
        if concat:
            merged = concat_factors(module_terms)
        elif len(module_terms) == 1:
            factors, ratio = module_terms[0]
            merged = factors.times(ratio)
        else:
            first = module_terms[0][0]
            svd = svd_of_factors(module_terms)
            rank = min(first.rank, svd.full_rank)
            merged = svd.factors(rank, scale=first.scale)
            retention[name] = svd.retention(rank)
        if shuffle:
            order = torch.randperm(merged.rank)
            merged = LoRAFactors(merged.down[order], merged.up[:, order], merged.alpha)
        modules[name] = merged
    _report_refactored(retention)
    return modules, retention


def _report_refactored(retention: dict[str, Retention]) -> None:
    if not retention:
        return
    fro = [r.fro_retained for r in retention.values()]
    lossy = sorted(name for name, r in retention.items() if r.fro_retained < 1 - 1e-6)
    if not lossy:
        logger.info("%d module(s) are in several inputs; their summed update fits the rank exactly", len(retention))
        return
    worst = min(retention, key=lambda n: retention[n].fro_retained)
    logger.warning("%d module(s) are in several inputs and their summed update does not fit the rank: re-factored to "
                   "the best approximation, Frobenius norm retained %.1f%% on average, %.1f%% at worst (%s). Use "
                   "--concat for the exact sum.", len(lossy), 100 * sum(fro) / len(fro),
                   100 * retention[worst].fro_retained, worst)


def merge_into_lora(args: argparse.Namespace) -> Path:
    dest = check_lora_output_path(args.save_to)
    check_writable_output(dest, sources=args.models)
    lbws = parse_lbws(args.lbws, len(args.models))
    loras, ratios = read_lora_files(args.models, args.ratios)
    modules, _ = merge_lora_files(loras, ratios, concat=args.concat, shuffle=args.shuffle,
                                  block_weights=module_block_weights(loras, lbws))
    carried = identity_metadata(loras[0])
    if args.no_metadata:
        metadata = lora_metadata({k: v for k, v in carried.items() if k.startswith("ss_")}, modules)
    else:
        metadata = lora_metadata(carried, modules, title=dest.stem,
                                 merged_from_titles=[lora.title for lora in loras])
    save_dtype = parse_save_precision(args.save_precision) or SAVE_DTYPES[args.precision]
    return write_lora_file(dest, modules, metadata, save_dtype, bundled=bundles_of(loras))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    return run(setup_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Merge as the arguments say; the exit status (2 with the message on stderr for a bad input)."""
    try:
        if args.sd_model is not None:
            if args.concat or args.shuffle:
                raise LoRAFileError("--concat / --shuffle apply when merging LoRAs into one LoRA (without --sd_model)")
            merge_into_model(args)
        else:
            merge_into_lora(args)
    except ValueError as e:  # our errors (LoRAFileError, CheckpointError, OutputPathError) are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
