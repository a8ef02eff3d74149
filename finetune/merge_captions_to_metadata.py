"""Merge caption files into a fine-tune metadata JSON (kohya's finetune/merge_captions_to_metadata.py).

    python finetune/merge_captions_to_metadata.py train_data_dir meta_cap.json [--caption_extension .caption]

Each image `<stem>.png` with a caption file `<stem>.caption` becomes `{"<stem>": {"caption": "..."}}` (the key is
the image's absolute path with --full_path). With --in_json, or when out_json already exists, the captions are
merged into that file: captions are replaced, every other field of an entry is kept.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune._merge_text_files import merge_parser, run_merge  # noqa: E402


def setup_parser():
    parser = merge_parser(__doc__, default_extension=".caption")
    # kohya's original misspelling of the flag, still accepted there
    parser.add_argument("--caption_extention", dest="caption_extension", default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_merge(setup_parser().parse_args(argv), field="caption")


if __name__ == "__main__":
    sys.exit(main())
