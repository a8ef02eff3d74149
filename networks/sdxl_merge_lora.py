"""kohya-ss/sd-scripts' SDXL name for merge_lora.py: the same tool, under the name SDXL users call.

merge_lora.py detects the model family from the file (SDXL included), so nothing here differs but the name:

    python networks/sdxl_merge_lora.py --sd_model sd_xl_base_1.0.safetensors --models style.safetensors \\
        --ratios 0.8 --save_to merged.safetensors

kohya's `--lbws` (LoRA block weights: one JSON list per LoRA) is merge_lora.py's. SDXL's U-Net has input and output
blocks 0..8, so its full table is the 20-value preset (BASE, IN00..IN08, MID, OUT00..OUT08); a weight other than 1
for IN09..IN11 / OUT09..OUT11 changes nothing and is warned about:

    python networks/sdxl_merge_lora.py --sd_model sd_xl_base_1.0.safetensors --models style.safetensors \\
        --ratios 0.8 --lbws "[1,0,0,0,0,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1]" --save_to merged.safetensors

A module contributes ratio * block weight * ΔW, into a model or into a LoRA (kohya's LoRA-into-LoRA merge squares
the block weight: it multiplies both factors by it).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from networks import merge_lora  # noqa: E402


def setup_parser():
    parser = merge_lora.setup_parser()
    parser.description = __doc__
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    return merge_lora.run(setup_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
