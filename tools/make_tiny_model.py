"""Write a tiny random-weight Stable Diffusion model (real SD block structure) for trying the tools and trainers
without downloading anything. A .safetensors file is about 21 MB for sd1 and 24 MB for sd2-* (fp32): a U-Net of
~3.2M parameters (13 MB) and the text encoder's full-vocabulary token table (49,408 rows: 6-9 MB) make most of it.

    python tools/make_tiny_model.py --family sd1 out/tiny_sd1.safetensors
    python tools/make_tiny_model.py --family sd2-768-v out/tiny_sd2v        # a folder: diffusers layout

Families: sd1, sd2-512, sd2-768-v, sdxl, sdxl-refiner; their inpainting models sd1-inpainting, sd2-512-inpainting,
sd2-768-v-inpainting, sdxl-inpainting; sd2-512-depth (with a tiny stand-in for its MiDaS part); and the extra-channel
families sd1-extra, sd2-512-extra, sd2-768-v-extra, sdxl-extra (2 extra channels). The output format follows the path
(.safetensors, .ckpt, or a folder).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from library.atomic_files import OutputPathError, check_writable_output  # noqa: E402
from library.checkpoint_writer import SaveFormat, save_checkpoint  # noqa: E402
from library.families import FAMILIES  # noqa: E402
from library.tiny_models import tiny_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=sorted(FAMILIES), default="sd1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--use_safetensors", action="store_true", help="safetensors weights inside a diffusers folder")
    p.add_argument("output")
    args = p.parse_args(argv)
    dest = Path(args.output)
    try:
        fmt = SaveFormat.from_path(dest, use_safetensors=args.use_safetensors)
        check_writable_output(dest)
    except (OutputPathError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    save_checkpoint(tiny_checkpoint(FAMILIES[args.family], seed=args.seed), dest, fmt)
    print(f"tiny {FAMILIES[args.family].description} written to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
