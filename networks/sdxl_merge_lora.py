"""kohya-ss/sd-scripts' SDXL name for merge_lora.py: the same tool, under the name SDXL users call.

merge_lora.py detects the model family from the file (SDXL included), so nothing here differs but the name:

    python networks/sdxl_merge_lora.py --sd_model sd_xl_base_1.0.safetensors --models style.safetensors \\
        --ratios 0.8 --save_to merged.safetensors

kohya's `--lbws` (per-block ratios for each LoRA) is refused: its block table and presets are not implemented
here. Merge at one ratio per LoRA, or apply block weights in the UI that loads the LoRA.
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
    parser.add_argument("--lbws", nargs="*", default=None,
                        help="kohya's per-block ratios (not supported: refused; see above)")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    args = setup_parser().parse_args(argv)
    if args.lbws is not None:
        print("error: --lbws (per-block ratios) is not supported; nothing was written. Merge with one --ratios "
              "value per LoRA, or apply block weights where the LoRA is loaded.", file=sys.stderr)
        return 2
    del args.lbws
    return merge_lora.run(args)


if __name__ == "__main__":
    sys.exit(main())
