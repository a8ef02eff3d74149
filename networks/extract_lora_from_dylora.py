"""Cut plain LoRAs of lower rank out of a DyLoRA file (kohya-ss/sd-scripts' extract_lora_from_dylora.py).

A DyLoRA (networks.dylora) is trained so that its first b ranks, for every multiple b of its `unit`, are a LoRA of
their own. Each output keeps, per module, the first b rows of lora_down, the first b columns of lora_up and the
alpha, so it computes ΔW = up[:, :b] @ down[:b] * alpha / b: exactly the DyLoRA truncated to b ranks (what
networks.dylora trained at the steps that drew b, and what DyLoRANetwork.set_rank(b) computes).

    python networks/extract_lora_from_dylora.py --model dylora.safetensors --save_to lora.safetensors --unit 4

writes lora-0004.safetensors, lora-0008.safetensors and lora-0012.safetensors for a rank-16 DyLoRA: every multiple of
--unit below the file's rank, named as kohya names them (the full rank is the input file itself). --rank picks
ranks (e.g. --rank 8). --unit defaults to the unit the file records (ss_network_args, as train_network.py writes
it). The outputs are plain networks.lora files: ss_network_module, ss_network_dim / conv_dim follow the ranks
written, the rest of the metadata is carried over, with the split noted in ss_training_comment; bundled embeddings
stay with each output.
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

from library.atomic_files import check_writable_output  # noqa: E402
from networks.lora_files import (LoRAFactors, LoRAFileError, LoRAFile, check_lora_output_path,  # noqa: E402
                                 lora_metadata, read_lora_file, short_list, write_lora_file)
from networks.lora_files import run_file_tool  # noqa: E402

logger = logging.getLogger("extract_lora_from_dylora")


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unit", type=int, default=None,
                   help="the DyLoRA's rank step (default: the unit its metadata records)")
    p.add_argument("--save_to", required=True,
                   help="output base name (.safetensors / .pt); each rank b is written as <name>-<b:04d><suffix>")
    p.add_argument("--model", required=True, help="the DyLoRA file (.safetensors / .pt / .ckpt)")
    p.add_argument("--rank", type=int, nargs="+", default=None,
                   help="the ranks to write (multiples of --unit, at most the file's rank); default: every multiple "
                        "of --unit below the file's rank")
    return p


def recorded_unit(metadata: dict[str, str]) -> int | None:
    """The `unit` train_network.py recorded in ss_network_args, if any."""
    try:
        args = json.loads(metadata.get("ss_network_args") or "{}")
        return int(args["unit"]) if isinstance(args, dict) and "unit" in args else None
    except (json.JSONDecodeError, ValueError, TypeError):
        return None


def truncated(modules: dict[str, LoRAFactors], rank: int) -> dict[str, LoRAFactors]:
    """Every module cut to its first `rank` ranks (all of its own where it has fewer), alpha kept."""
    return {name: LoRAFactors(f.down[:rank].contiguous(), f.up[:, :rank].contiguous(), f.alpha)
            for name, f in modules.items()}


def plan(lora: LoRAFile, unit: int | None, ranks: list[int] | None) -> tuple[int, list[int]]:
    """(unit, ranks to write), checked against the file."""
    unit = unit if unit is not None else recorded_unit(lora.metadata)
    if unit is None:
        raise LoRAFileError(f"{lora.name}: its metadata records no DyLoRA unit; give --unit (the rank step it was "
                            "trained with, --network_args unit=...)")
    if unit < 1:
        raise LoRAFileError(f"--unit {unit}: must be at least 1")
    odd = [f"{name}: rank {f.rank}" for name, f in lora.modules.items() if f.rank % unit]
    if odd:
        raise LoRAFileError(f"--unit {unit} does not divide the rank of {len(odd)} module(s) of {lora.name} (is it a "
                            f"DyLoRA of this unit?):\n    {short_list(odd)}")
    full = max(f.rank for f in lora.modules.values())
    if ranks is None:
        ranks = list(range(unit, full, unit))
        if not ranks:
            raise LoRAFileError(f"{lora.name} has rank {full} = --unit {unit}: there is no lower rank to extract")
    bad = [r for r in ranks if r < unit or r % unit or r > full]
    if bad:
        raise LoRAFileError(f"--rank {' '.join(map(str, bad))}: each rank must be a multiple of --unit {unit} from "
                            f"{unit} to the file's rank {full}")
    return unit, sorted(set(ranks))


def output_path(save_to: Path, rank: int) -> Path:
    return save_to.with_name(f"{save_to.stem}-{rank:04d}{save_to.suffix}")  # kohya's naming


def extract(args: argparse.Namespace) -> list[Path]:
    save_to = check_lora_output_path(args.save_to)
    lora = read_lora_file(args.model)
    unit, ranks = plan(lora, args.unit, args.rank)
    full = max(f.rank for f in lora.modules.values())
    carried = dict(lora.metadata)
    try:  # the output is a plain LoRA: the DyLoRA's unit no longer describes it
        network_args = json.loads(carried.get("ss_network_args") or "{}")
        if isinstance(network_args, dict) and network_args.pop("unit", None) is not None:
            carried["ss_network_args"] = json.dumps(network_args)
    except json.JSONDecodeError:
        pass
    written = []
    for rank in ranks:
        dest = output_path(save_to, rank)
        check_writable_output(dest, sources=[args.model])
        modules = truncated(lora.modules, rank)
        metadata = lora_metadata(carried, modules, comment=f"split from DyLoRA, rank {full} to {rank}")
        written.append(write_lora_file(dest, modules, metadata, bundled=lora.bundled))
    logger.info("unit %d: wrote rank(s) %s of a rank-%d DyLoRA", unit, ", ".join(map(str, ranks)), full)
    return written


def main(argv: list[str] | None = None) -> int:
    return run_file_tool(extract, setup_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
