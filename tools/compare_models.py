"""Compare two Stable Diffusion models in any layouts (original .safetensors/.ckpt or diffusers folders),
tensor by tensor, under diffusers names.

    python tools/compare_models.py model.safetensors converted_folder

Exit status 0 when every tensor is equal: bit-identical by default, or within `--atol` / `--rtol` (as
torch.isclose: |a - b| <= atol + rtol * |b|), e.g. `--allow_cast --atol 1e-3` for an fp16 copy of an fp32 model;
1 when they differ (each differing tensor is listed with its largest absolute difference, then a per-component
summary); 2 on bad input.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


import torch  # noqa: E402

from library.sd_checkpoint import FamilyHints, read_checkpoint  # noqa: E402
from library.tensor_files import CheckpointError  # noqa: E402


def compare(a_path: str, b_path: str, *, allow_cast: bool, hints: FamilyHints, atol: float = 0.0,
            rtol: float = 0.0) -> list[str]:
    problems: list[str] = []
    with read_checkpoint(a_path, hints) as a, read_checkpoint(b_path, hints) as b:
        if a.family is not b.family:
            problems.append(f"family: {a.family.name} vs {b.family.name}")
        for component in a.tensors:
            ka, kb = set(a.tensors[component]), set(b.tensors[component])
            if ka != kb:
                problems.append(f"{component}: {len(ka - kb)} tensors only in A, {len(kb - ka)} only in B")
            worst = []
            for key in sorted(ka & kb):
                x, y = a.tensors[component][key].load(), b.tensors[component][key].load()
                if x.dtype != y.dtype and not allow_cast:
                    problems.append(f"{component}.{key}: dtype {x.dtype} vs {y.dtype} (use --allow_cast)")
                    continue
                if x.shape != y.shape:
                    problems.append(f"{component}.{key}: shape {tuple(x.shape)} vs {tuple(y.shape)}")
                    continue
                # float64: exact differences of any two fp32 / fp16 / bf16 values, so the report is not rounded.
                x, y = x.double(), y.double()
                close = torch.isclose(x, y, rtol=rtol, atol=atol, equal_nan=True)
                if not close.all():
                    diff = (x - y).abs()[~close].max().item()  # NaN when one side is NaN
                    worst.append((diff, key))
                    problems.append(f"{component}.{key}: max abs difference {diff:.3g} "
                                    f"({(~close).sum().item()} of {close.numel()} values differ)")
            if worst:
                diff, key = max(worst, key=lambda w: (w[0] != w[0], w[0]))  # NaN first, then the largest
                problems.append(f"{component}: {len(worst)} tensors differ; largest: {key} ({diff:.3g})")
            print(f"{component}: {len(ka & kb)} tensors compared, {len(worst)} differ")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_a")
    p.add_argument("model_b")
    p.add_argument("--allow_cast", action="store_true", help="compare values across dtypes (e.g. fp16 vs fp32)")
    p.add_argument("--atol", type=float, default=0.0,
                   help="absolute tolerance per value (default 0: exact); e.g. 1e-3 for fp16 vs fp32")
    p.add_argument("--rtol", type=float, default=0.0,
                   help="relative tolerance per value, of model_b's value (default 0: exact)")
    p.add_argument("--v_parameterization", action="store_true", help="for .ckpt files of v-prediction models")
    args = p.parse_args(argv)
    if not (args.atol >= 0 and args.rtol >= 0):  # also refuses NaN
        print(f"error: --atol {args.atol} / --rtol {args.rtol}: tolerances must be 0 or more", file=sys.stderr)
        return 2
    try:
        problems = compare(args.model_a, args.model_b, allow_cast=args.allow_cast, atol=args.atol, rtol=args.rtol,
                           hints=FamilyHints(v_parameterization=args.v_parameterization))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in problems:
        print("DIFFERENT:", line)
    if problems:
        print("models differ")
    else:
        print("identical" if not (args.atol or args.rtol) else f"equal within --atol {args.atol} --rtol {args.rtol}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
