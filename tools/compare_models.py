"""Compare two Stable Diffusion models in any layouts (original .safetensors/.ckpt or diffusers folders),
tensor by tensor, under diffusers names.

    python tools/compare_models.py model.safetensors converted_folder

Exit status 0 when every tensor is bit-identical (after casting to a common dtype with --allow_cast), 1 when
they differ (a per-component summary with the largest differences is printed), 2 on bad input.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


from library.sd_checkpoint import FamilyHints, read_checkpoint  # noqa: E402
from library.tensor_files import CheckpointError  # noqa: E402


def compare(a_path: str, b_path: str, *, allow_cast: bool, hints: FamilyHints) -> list[str]:
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
                diff = (x.float() - y.float()).abs().max().item() if x.numel() else 0.0
                if diff != 0.0:
                    worst.append((diff, key))
            if worst:
                worst.sort(reverse=True)
                shown = ", ".join(f"{k} ({d:.3g})" for d, k in worst[:3])
                problems.append(f"{component}: {len(worst)} tensors differ; largest: {shown}")
            print(f"{component}: {len(ka & kb)} tensors compared, {len(worst)} differ")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_a")
    p.add_argument("model_b")
    p.add_argument("--allow_cast", action="store_true", help="compare values across dtypes (e.g. fp16 vs fp32)")
    p.add_argument("--v_parameterization", action="store_true", help="for .ckpt files of v-prediction models")
    args = p.parse_args(argv)
    try:
        problems = compare(args.model_a, args.model_b, allow_cast=args.allow_cast,
                           hints=FamilyHints(v_parameterization=args.v_parameterization))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in problems:
        print("DIFFERENT:", line)
    print("identical" if not problems else "models differ")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
