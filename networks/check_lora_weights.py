"""Per-tensor statistics of a LoRA file, with broken modules flagged (kohya-ss/sd-scripts' check_lora_weights.py).

    python networks/check_lora_weights.py my_lora.safetensors [-s]

Prints, per lora_down / lora_up tensor (with -s every tensor, alphas and foreign keys too): shape, dtype,
mean |w|, min |w|, max |w|, and the module flags:
- ZERO: the module's update is all zeros (lora_up or lora_down is zero: an untrained module, e.g. a run whose
  learning rate for that part was 0, or a save before the first step);
- NaN / Inf: non-finite values (a diverged or fp16-overflowed run); such a file breaks every image it touches.
Keys outside kohya's layout and incomplete modules are listed too; embeddings bundled in the LoRA (`bundle_emb.*`,
WebUI's layout) are listed by word and are not a problem. Exit status: 0 when nothing is flagged, 1 when something
is, 2 when the file cannot be read.
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

from library.tensor_files import CheckpointError, open_tensor_file  # noqa: E402
from library.textual_inversion import bundled_words  # noqa: E402
from networks.lora_files import ALPHA, DOWN, UP, LoRAFactors, parse_lora_tensors  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="LoRA file (.safetensors / .pt / .ckpt)")
    p.add_argument("-s", "--show_all_keys", action="store_true",
                   help="also list alphas and keys outside the LoRA layout")
    return p


def module_flags(factors: LoRAFactors) -> list[str]:
    flags = []
    for part, tensor in (("lora_down", factors.down), ("lora_up", factors.up)):
        if torch.isnan(tensor).any():
            flags.append(f"NaN in {part}")
        if torch.isinf(tensor).any():
            flags.append(f"Inf in {part}")
    if not flags and (not factors.up.any() or not factors.down.any()):
        zero = "lora_up" if not factors.up.any() else "lora_down"
        flags.append(f"ZERO ({zero} is all zeros: the module changes nothing)")
    return flags


def tensor_row(key: str, tensor: torch.Tensor) -> str:
    shape = "x".join(map(str, tensor.shape)) or "scalar"
    dtype = str(tensor.dtype).removeprefix("torch.")
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return f"{key}  {shape}  {dtype}"
    magnitude = tensor.float().abs()
    finite = magnitude[torch.isfinite(magnitude)]
    stats = (f"{finite.mean():.4g}  {finite.min():.4g}  {finite.max():.4g}" if finite.numel()
             else "no finite values")
    return f"{key}  {shape}  {dtype}  {stats}"


def check(path: Path, *, show_all_keys: bool = False, out=None) -> int:
    """Print the report (to `out`, default stdout); return the number of flagged modules and problems."""
    out = out or sys.stdout
    with open_tensor_file(path) as source:
        tensors = {name: lazy.load() for name, lazy in source.tensors.items()}
    parsed = parse_lora_tensors(tensors)
    modules = parsed.modules
    ranks = sorted({f.rank for f in modules.values()})
    alphas = sorted({f.alpha for f in modules.values()})
    print(f"{path}: {len(modules)} LoRA modules (ranks {ranks}, alphas {[f'{a:g}' for a in alphas]}), "
          f"{len(tensors)} tensors", file=out)
    print("key  shape  dtype  mean|w|  min|w|  max|w|", file=out)
    for key, tensor in tensors.items():
        if key.endswith((DOWN, UP)) or show_all_keys:
            print(tensor_row(key, tensor), file=out)
    flagged = {name: flags for name, f in modules.items() if (flags := module_flags(f))}
    problems = len(flagged) + len(parsed.unknown) + len(parsed.incomplete) + len(parsed.bad_shapes)
    if flagged:
        print(f"\n{len(flagged)} flagged module(s):", file=out)
        for name, flags in flagged.items():
            print(f"  {name}: {'; '.join(flags)}", file=out)
    for title, items in (("key(s) outside kohya's LoRA layout", parsed.unknown),
                         ("incomplete module(s)", parsed.incomplete),
                         ("module(s) with inconsistent shapes", parsed.bad_shapes)):
        if items:
            print(f"\n{len(items)} {title}:", file=out)
            for item in items:
                print(f"  {item}", file=out)
    if parsed.bundled:
        print(f"\nbundled embedding(s) {', '.join(bundled_words(parsed.bundled))}:", file=out)
        for key, tensor in parsed.bundled.items():
            print(f"  {key}  {list(tensor.shape)}  {str(tensor.dtype).replace('torch.', '')}", file=out)
    alpha_count = sum(1 for k in tensors if k.endswith(ALPHA))
    print(f"\n{'OK' if not problems else 'PROBLEMS'}: {len(modules)} modules, {alpha_count} alphas, "
          f"{len(flagged)} flagged, {len(parsed.unknown)} foreign keys", file=out)
    return problems


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    args = setup_parser().parse_args(argv)
    try:
        problems = check(Path(args.file), show_all_keys=args.show_all_keys)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
