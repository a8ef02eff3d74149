"""Our SDXL single file against the one diffusers' own converter writes, tensor for tensor.

diffusers ships its SDXL diffusers-to-original converter as a repository script
(`scripts/convert_diffusers_to_original_sdxl.py`), not in the pip package, so the test suite cannot run it offline.
This script runs it once, given a diffusers source checkout, on a tiny SDXL pipeline folder, runs our
`tools/convert_diffusers20_original_sd.py` on the same folder, and compares the two files: same keys, shapes,
dtypes and bytes, in fp32 and fp16.

    . .venv/bin/activate && export HF_HUB_OFFLINE=1
    python benchmarks/check_sdxl_converter_parity.py --diffusers_repo ~/src/diffusers

The folder is written without our `original_extras.safetensors` (a plain diffusers folder), so neither converter
has tensors the other lacks. Exit status 0 when the files are equal.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def differences(theirs: Path, ours: Path) -> list[str]:
    import torch
    from safetensors.torch import load_file

    a, b = load_file(theirs), load_file(ours)
    problems = [f"only in diffusers' file: {k}" for k in sorted(set(a) - set(b))]
    problems += [f"only in ours: {k}" for k in sorted(set(b) - set(a))]
    for key in sorted(set(a) & set(b)):
        if a[key].dtype != b[key].dtype or a[key].shape != b[key].shape or not torch.equal(a[key], b[key]):
            problems.append(f"differs: {key} {a[key].dtype} {tuple(a[key].shape)} vs {b[key].dtype} "
                            f"{tuple(b[key].shape)}")
    return problems


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--diffusers_repo", required=True, type=Path, help="a diffusers source checkout")
    args = p.parse_args()
    script = args.diffusers_repo / "scripts" / "convert_diffusers_to_original_sdxl.py"
    if not script.is_file():
        print(f"error: {script} not found; give the root of a diffusers source checkout", file=sys.stderr)
        return 2
    python = sys.executable
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "tiny_sdxl"
        subprocess.run([python, str(ROOT / "tools" / "make_tiny_model.py"), "--family", "sdxl", str(folder)],
                       check=True, capture_output=True)
        (folder / "original_extras.safetensors").unlink(missing_ok=True)
        for precision, theirs_flags, our_flags in (("fp32", [], []), ("fp16", ["--half"], ["--fp16"])):
            theirs, ours = Path(tmp) / f"theirs_{precision}.safetensors", Path(tmp) / f"ours_{precision}.safetensors"
            subprocess.run([python, str(script), "--model_path", str(folder), "--checkpoint_path", str(theirs),
                            "--use_safetensors", *theirs_flags], check=True, capture_output=True)
            subprocess.run([python, str(ROOT / "tools" / "convert_diffusers20_original_sd.py"), str(folder),
                            str(ours), *our_flags], check=True, capture_output=True)
            problems = differences(theirs, ours)
            print(f"{precision}: {'equal' if not problems else f'{len(problems)} difference(s)'}")
            for line in problems[:20]:
                print("   ", line)
            failed |= bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
