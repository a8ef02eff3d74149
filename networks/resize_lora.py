"""Change the rank of a LoRA by SVD (kohya-ss/sd-scripts' resize_lora.py).

Each module's update ΔW is cut to its best approximation at the new rank; alpha / rank is kept, so the LoRA's
strength does not change. A fixed rank:

    python networks/resize_lora.py --model big.safetensors --save_to small.safetensors --new_rank 16 --verbose

or a rank per module from a rule, with --new_rank as the upper limit (--dynamic_method / --dynamic_param):
- sv_ratio P: keep singular values >= S_max / P (P >= 1);
- sv_fro P: the smallest rank that keeps a fraction P of the Frobenius norm (0 < P <= 1);
- sv_cumulative P: the smallest rank that keeps a fraction P of sum(S).

--verbose prints, per module, the fraction of sum(S) and of the Frobenius norm retained (its square is the energy
retained) and S_max / S_min of what is kept; a summary line is always logged. A module cannot gain rank: one whose
rank is already at or below the target is re-factored at its own rank (lossless). The metadata is carried over
with ss_network_dim / ss_network_alpha / conv_dim / conv_alpha updated ("Dynamic" when modules differ).
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
from library.checkpoint_writer import parse_save_precision  # noqa: E402
from networks.lora_files import (LoRAFactors, check_lora_output_path, lora_metadata, read_lora_file,  # noqa: E402
                                 write_lora_file)
from networks.lora_files import run_file_tool  # noqa: E402
from networks.lora_math import RankRule, Retention, check_rank_fits, rank_rule, svd_of_factors  # noqa: E402

logger = logging.getLogger("resize_lora")


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--save_precision", choices=["float", "fp16", "bf16"], default=None,
                   help="precision of the saved file (default float)")
    p.add_argument("--new_rank", type=int, default=4,
                   help="rank of the output; with --dynamic_method the upper limit (default 4)")
    p.add_argument("--new_conv_rank", type=int, default=None, help="rank of 3x3 conv modules (default: --new_rank)")
    p.add_argument("--save_to", required=True, help="output LoRA (.safetensors / .pt)")
    p.add_argument("--model", required=True, help="LoRA to resize (.safetensors / .pt / .ckpt)")
    p.add_argument("--device", default=None, help="device for the SVD, e.g. cuda (default cpu)")
    p.add_argument("--verbose", action="store_true", help="print what each module retains")
    p.add_argument("--dynamic_method", choices=["sv_ratio", "sv_fro", "sv_cumulative"], default=None,
                   help="choose each module's rank by a rule (see above); --new_rank is the limit")
    p.add_argument("--dynamic_param", type=float, default=None, help="the rule's target")
    return p


def resize_modules(modules: dict[str, LoRAFactors], rule: RankRule, conv_rule: RankRule,
                   device: str | None = None) -> tuple[dict[str, LoRAFactors], dict[str, Retention]]:
    """Every module at its new rank (alpha / rank kept), and what each retained."""
    check_rank_fits("--new_rank", rule.max_rank, {n: f.max_rank for n, f in modules.items() if not f.is_kxk_conv})
    check_rank_fits("--new_conv_rank", conv_rule.max_rank,
                    {n: f.max_rank for n, f in modules.items() if f.is_kxk_conv})
    resized, report = {}, {}
    for name, factors in tqdm(modules.items(), desc="resizing", unit="module"):
        svd = svd_of_factors([(factors, 1.0)], device)
        rank = (conv_rule if factors.is_kxk_conv else rule).rank_for(svd.S)
        resized[name] = svd.factors(rank, scale=factors.scale)
        report[name] = svd.retention(rank)
    return resized, report


def print_report(report: dict[str, Retention], modules: dict[str, LoRAFactors], *, verbose: bool,
                 dynamic: bool) -> None:
    if verbose:
        width = max(len(name) for name in report)
        for name, r in report.items():
            line = (f"{name:{width}} | sum(S) retained: {r.sum_retained:.1%}, fro retained: {r.fro_retained:.1%}, "
                    f"max(S) ratio: {r.max_ratio:0.1f}")
            if dynamic:
                line += f", dynamic | dim: {modules[name].rank}, alpha: {modules[name].alpha:g}"
            print(line)
    fro = [r.fro_retained for r in report.values()]
    mean = sum(fro) / len(fro)
    std = (sum((f - mean) ** 2 for f in fro) / len(fro)) ** 0.5
    print(f"Average Frobenius norm retention: {mean:.2%} | std: {std:0.3f} | minimum: {min(fro):.2%} "
          f"({len(fro)} modules)")


def resize(args: argparse.Namespace) -> Path:
    dest = check_lora_output_path(args.save_to)
    check_writable_output(dest, sources=[args.model])
    rule = rank_rule(args.new_rank, args.dynamic_method, args.dynamic_param)
    conv_rule = rank_rule(args.new_conv_rank or args.new_rank, args.dynamic_method, args.dynamic_param,
                          flag="--new_conv_rank")
    lora = read_lora_file(args.model)
    old_ranks = sorted({f.rank for f in lora.modules.values()})
    if args.dynamic_method:
        logger.info("choosing each module's rank by %s %s, at most %d", args.dynamic_method, args.dynamic_param,
                    args.new_rank)
    modules, report = resize_modules(lora.modules, rule, conv_rule, args.device)
    print_report(report, modules, verbose=args.verbose, dynamic=bool(args.dynamic_method))
    if args.dynamic_method:
        comment = f"Dynamic resize with {args.dynamic_method}: {args.dynamic_param} from {old_ranks[-1]}"
    else:
        conv = "" if conv_rule.max_rank == rule.max_rank else f" (conv: {conv_rule.max_rank})"
        comment = f"dimension is resized from {old_ranks[-1]} to {args.new_rank}{conv}"
    metadata = lora_metadata(lora.metadata, modules, comment=comment)
    return write_lora_file(dest, modules, metadata, parse_save_precision(args.save_precision),
                           bundled=lora.bundled)  # the resized LoRA is the same LoRA: its words stay with it


def main(argv: list[str] | None = None) -> int:
    return run_file_tool(resize, setup_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
