"""The command line shared by merge_captions_to_metadata.py and merge_dd_tags_to_metadata.py, which differ only
in the field they fill ("caption" / "tags") and their default file extension."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from library.atomic_files import OutputPathError, check_writable_output
from library.captions import caption_path_for, other_caption_files
from library.images import IMAGE_EXTENSIONS, list_images
from library.metadata_files import MetadataError, merge_text_files, read_metadata, write_metadata

logger = logging.getLogger("finetune")


def merge_parser(doc: str, *, default_extension: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("train_data_dir", help="folder of the training images and their text files")
    p.add_argument("out_json", help="metadata file to write (.json; .jsonl for JSON Lines)")
    p.add_argument("--in_json", default=None,
                   help="metadata file to merge into (default: out_json, when it exists)")
    p.add_argument("--caption_extension", default=default_extension,
                   help=f"extension of the text files (default {default_extension})")
    p.add_argument("--full_path", action="store_true",
                   help="key entries by the images' absolute paths instead of their file stems")
    p.add_argument("--recursive", action="store_true",
                   help="also take images in subfolders (needs --full_path: stems can repeat across folders)")
    p.add_argument("--debug", action="store_true", help="print every key and its text")
    return p


def run_merge(args: argparse.Namespace, *, field: str) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        metadata, existing = _merge(args, field)
    except (MetadataError, OutputPathError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    logger.info("wrote %d entries to %s%s", len(metadata), args.out_json,
                f" (merged into {existing})" if existing else "")
    return 0


def _merge(args: argparse.Namespace, field: str) -> tuple[dict, Path | None]:
    folder, out_json = Path(args.train_data_dir), Path(args.out_json)
    if args.recursive and not args.full_path:
        raise ValueError("--recursive needs --full_path: images in different folders can share a file stem, "
                         "and stems are the keys without --full_path")
    if not folder.is_dir():
        raise ValueError(f"train_data_dir {folder}: no such folder")
    existing = Path(args.in_json) if args.in_json else (out_json if out_json.is_file() else None)
    if args.in_json and not existing.is_file():
        raise ValueError(f"--in_json {existing}: no such metadata file (leave --in_json out to start a new one)")
    check_writable_output(out_json)
    images = list_images(folder, recursive=args.recursive)
    if not images:
        where = "it or its subfolders" if args.recursive else "it (add --recursive --full_path for subfolders)"
        raise ValueError(f"train_data_dir {folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in {where}")
    metadata = read_metadata(existing) if existing else {}
    result = merge_text_files(metadata, images, field=field, extension=args.caption_extension,
                              full_path=args.full_path)
    if len(result.without_file) == len(images):
        example = caption_path_for(images[0], args.caption_extension)
        found = other_caption_files(images, args.caption_extension)
        hint = "; ".join(f"found {n} {ext} file(s): pass --caption_extension {ext}" for ext, n in found.items()) \
            or f"text files must share the image's name, e.g. {example.name} for {images[0].name}"
        problem = (f"train_data_dir {folder}: none of the {len(images)} image(s) has a {example.suffix} file, so "
                   f"there is no {field} to merge; {hint}")
        if not result.metadata:  # an empty output would look like success, and train on nothing
            raise ValueError(problem + ". Nothing written.")
        # Merging into existing metadata still writes it (e.g. only to convert .json to .jsonl), unchanged.
        logger.warning("%s. %s is written with %s's entries unchanged.", problem, out_json, existing)
    if result.without_file:
        names = ", ".join(p.name for p in result.without_file[:5])
        logger.warning("%d of %d image(s) have no %s file; their entries get no %s: %s%s",
                       len(result.without_file), len(images), args.caption_extension, field, names,
                       " ..." if len(result.without_file) > 5 else "")
    if args.debug:
        for key, entry in sorted(result.metadata.items()):
            logger.info("%s: %s", key, entry.get(field))
    write_metadata(out_json, result.metadata)
    return result.metadata, existing
