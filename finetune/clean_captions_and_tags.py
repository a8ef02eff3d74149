"""Clean up the captions and tags of a fine-tune metadata JSON (kohya's finetune/clean_captions_and_tags.py).

    python finetune/clean_captions_and_tags.py meta_tags.json meta_clean.json
    python finetune/clean_captions_and_tags.py train_data_dir meta_tags.json meta_clean.json   # kohya's older form

Tags: "_" -> " ", rating tags removed, conflicting per-person tags removed in pictures of several people, "shirt"
removed beside "white shirt". Captions: "a cartoon woman" -> "a girl" and similar. The rules, and where they
differ from kohya's, are listed in library/caption_cleanup.py. Every other field of an entry is kept.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.atomic_files import OutputPathError, check_writable_output  # noqa: E402
from library.caption_cleanup import clean_metadata  # noqa: E402
from library.metadata_files import MetadataError, read_metadata, write_metadata  # noqa: E402

logger = logging.getLogger("finetune")


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("train_data_dir", nargs="?", help="not used (kohya's scripts once needed it; still accepted)")
    p.add_argument("in_json", help="metadata file to clean")
    p.add_argument("out_json", help="metadata file to write (may be in_json itself)")
    p.add_argument("--debug", action="store_true", help="print every value that changes, before and after")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    args = setup_parser().parse_args(argv)
    try:
        check_writable_output(args.out_json)
        report = clean_metadata(read_metadata(Path(args.in_json)))
        write_metadata(Path(args.out_json), report.metadata)
    except (MetadataError, OutputPathError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for field, keys in (("tags", report.without_tags), ("caption", report.without_caption)):
        if keys:
            logger.info("%d entries have no %s: %s%s", len(keys), field, ", ".join(keys[:5]),
                        " ..." if len(keys) > 5 else "")
    if args.debug:
        for key, field, before, after in report.changes:
            logger.info("%s %s\n  FROM: %s\n  TO:   %s", key, field, before, after)
    logger.info("cleaned %d entries (%d values changed); wrote %s", len(report.metadata), len(report.changes),
                args.out_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
