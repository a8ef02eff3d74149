"""Merge LoRAs through their full update and re-factor it to a new rank (kohya-ss/sd-scripts' svd_merge_lora.py).

For every module, sum_i ratio_i * ΔW_i is formed exactly and cut to its best rank-`--new_rank` approximation
(`--new_conv_rank` for 3x3 convs) by SVD; at a rank that holds the whole sum (the sum of the input ranks, or the
layer's limit) the result is the exact sum. Output alpha = rank (scale 1), as kohya writes it.

    python networks/svd_merge_lora.py --models a.safetensors b.safetensors --ratios 0.7 0.5 \\
        --new_rank 32 --new_conv_rank 16 --save_to ab.safetensors

`--lbws` (kohya's LoRA block weights, one JSON list of 12, 17, 20 or 26 numbers per LoRA: see
networks/lora_block_weights.py) multiplies each module's ratio by its U-Net block's weight before the sum, so a module
contributes ratio * weight * ΔW:

    python networks/svd_merge_lora.py --models a.safetensors b.safetensors --ratios 1 1 --new_rank 32 \\
        --lbws "[1,1,1,1,1,1,1,1,1,1,1,1]" "[0,0,0,0,0,0,1,1,1,1,1,1]" --save_to ab.safetensors

`--clamp_quantile` (kohya's fixed 0.99) clips outlying factor entries; 1 turns clipping off, which is needed for
an exact result.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tqdm import tqdm  # noqa: E402

from library.atomic_files import check_writable_output  # noqa: E402
from library.checkpoint_writer import SAVE_DTYPES, parse_save_precision  # noqa: E402
from networks.lora_block_weights import (add_lbws_argument, module_block_weights, parse_lbws,  # noqa: E402
                                         weighted_terms)
from networks.lora_files import (LoRAFactors, LoRAFile, LoRAFileError, bundles_of,  # noqa: E402
                                 check_lora_output_path, check_same_layers, identity_metadata, lora_metadata,
                                 read_lora_files, write_lora_file)
from networks.lora_files import run_file_tool  # noqa: E402
from networks.lora_math import Retention, check_rank_fits, svd_of_factors  # noqa: E402

logger = logging.getLogger("svd_merge_lora")


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--save_precision", choices=["float", "fp16", "bf16"], default=None,
                   help="precision of the saved file (default: --precision)")
    p.add_argument("--precision", choices=["float", "fp16", "bf16"], default="float",
                   help="precision the input factors are read in (the SVD itself runs in fp64); default float")
    p.add_argument("--save_to", required=True, help="output LoRA (.safetensors / .pt)")
    p.add_argument("--models", nargs="+", required=True, help="LoRA files to merge")
    p.add_argument("--ratios", type=float, nargs="*", default=None, help="one multiplier per LoRA (default 1.0 each)")
    p.add_argument("--new_rank", type=int, default=4, help="rank of the output (Linear and 1x1 conv modules)")
    p.add_argument("--new_conv_rank", type=int, default=None, help="rank of 3x3 conv modules (default: --new_rank)")
    p.add_argument("--clamp_quantile", type=float, default=0.99,
                   help="clip factor entries beyond this quantile (kohya: 0.99); 1 = no clipping")
    p.add_argument("--device", default=None, help="device for the SVD, e.g. cuda (default cpu)")
    p.add_argument("--no_metadata", action="store_true", help="write only the essential ss_* metadata")
    add_lbws_argument(p)
    return p


def svd_merge(loras: list[LoRAFile], ratios: list[float], *, new_rank: int, new_conv_rank: int | None = None,
              clamp_quantile: float = 0.99, device: str | None = None,
              block_weights: list[dict[str, float]] | None = None,
              ) -> tuple[dict[str, LoRAFactors], dict[str, Retention]]:
    """sum_i ratio_i * ΔW_i per module, re-factored; `block_weights`: per LoRA, a weight per module (--lbws) that
    multiplies its ratio."""
    new_conv_rank = new_conv_rank or new_rank
    for flag, value in (("--new_rank", new_rank), ("--new_conv_rank", new_conv_rank)):
        if value < 1:
            raise LoRAFileError(f"{flag} {value}: the rank must be at least 1")
    if not 0.0 < clamp_quantile <= 1.0:
        raise LoRAFileError(f"--clamp_quantile {clamp_quantile}: must be in (0, 1]; 1 = no clipping")
    check_same_layers(loras)
    terms = weighted_terms(loras, ratios, block_weights)
    firsts = {name: t[0][0] for name, t in terms.items()}
    check_rank_fits("--new_rank", new_rank, {n: f.max_rank for n, f in firsts.items() if not f.is_kxk_conv})
    check_rank_fits("--new_conv_rank", new_conv_rank, {n: f.max_rank for n, f in firsts.items() if f.is_kxk_conv})
    modules, retention, short = {}, {}, []
    for name, module_terms in tqdm(terms.items(), desc="SVD merge", unit="module"):
        requested = new_conv_rank if firsts[name].is_kxk_conv else new_rank
        svd = svd_of_factors(module_terms, device)
        rank = max(1, min(requested, svd.full_rank))
        if rank < requested and rank < firsts[name].max_rank:
            short.append(name)
        modules[name] = svd.factors(rank, scale=1.0, clamp_quantile=clamp_quantile)
        retention[name] = svd.retention(rank)
    if short:
        logger.info("%d module(s) hold less than the requested rank in total (sum of the input ranks) and keep "
                    "what they have (e.g. %s: rank %d)", len(short), short[0], modules[short[0]].rank)
    fro = [r.fro_retained for r in retention.values()]
    logger.info("Frobenius norm retained: %.2f%% on average, %.2f%% at worst", 100 * sum(fro) / len(fro),
                100 * min(fro))
    return modules, retention


def run(args: argparse.Namespace) -> Path:
    dest = check_lora_output_path(args.save_to)
    check_writable_output(dest, sources=args.models)
    lbws = parse_lbws(args.lbws, len(args.models))
    loras, ratios = read_lora_files(args.models, args.ratios)
    load_dtype = SAVE_DTYPES[args.precision]
    for lora in loras:  # kohya reads the inputs in --precision
        lora.modules = {n: LoRAFactors(f.down.to(load_dtype), f.up.to(load_dtype), f.alpha)
                        for n, f in lora.modules.items()}
    modules, _ = svd_merge(loras, ratios, new_rank=args.new_rank, new_conv_rank=args.new_conv_rank,
                           clamp_quantile=args.clamp_quantile, device=args.device,
                           block_weights=module_block_weights(loras, lbws))
    carried = identity_metadata(loras[0])
    if args.no_metadata:
        metadata = lora_metadata({k: v for k, v in carried.items() if k.startswith("ss_")}, modules)
    else:
        metadata = lora_metadata(carried, modules, title=dest.stem, merged_from_titles=[lora.title for lora in loras])
    save_dtype = parse_save_precision(args.save_precision) or load_dtype
    return write_lora_file(dest, modules, metadata, save_dtype, bundled=bundles_of(loras))


def main(argv: list[str] | None = None) -> int:
    return run_file_tool(run, setup_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
