"""Merge tag files (WD14 / DeepDanbooru tagger output) into a fine-tune metadata JSON (kohya's
finetune/merge_dd_tags_to_metadata.py).

    python finetune/merge_dd_tags_to_metadata.py train_data_dir meta_tags.json --in_json meta_cap.json

Each image `<stem>.png` with a tag file `<stem>.txt` gets `{"<stem>": {"tags": "..."}}` (the key is the image's
absolute path with --full_path). With --in_json, or when out_json already exists, the tags are merged into that
file: tags are replaced, every other field of an entry (the caption) is kept. Note the default extension is
.txt (the taggers' default), not the trainers' .caption.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune._merge_text_files import merge_parser, run_merge  # noqa: E402


def setup_parser():
    return merge_parser(__doc__, default_extension=".txt")


def main(argv: list[str] | None = None) -> int:
    return run_merge(setup_parser().parse_args(argv), field="tags")


if __name__ == "__main__":
    sys.exit(main())
