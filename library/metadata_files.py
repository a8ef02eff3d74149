"""kohya's fine-tune metadata files: reading, resolving keys to images, writing, merging caption / tag files.

The trainer (`--in_json`, a dataset config's `metadata_file`) and the `finetune/` tools read through this one
module, so a file a tool writes is read back by the same rules.

Formats:
- JSON object (kohya): `{key: {"caption": ..., "tags": ..., "image_size": [w, h], "train_resolution": [w, h]}}`;
- JSON Lines: one `{"image_path": key, ...}` per line (`file_name` instead of `image_path`: diffusers imagefolder);
- CSV with a `file_name` column (diffusers imagefolder `metadata.csv`; read only).
A key is an absolute image path, a path relative to the image folder, or a bare stem (any image suffix).
Files are written atomically, UTF-8 (not `\\u` escapes), with sorted keys, so reruns give identical files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from library.atomic_files import atomic_file
from library.captions import CaptionFileError, caption_path_for, read_caption_file
from library.images import IMAGE_EXTENSIONS

KEY_FIELDS = ("image_path", "file_name")  # where a JSON Lines / CSV row names its image
_SUFFIXES = tuple(IMAGE_EXTENSIONS) + tuple(s.upper() for s in IMAGE_EXTENSIONS)


class MetadataError(ValueError):
    """A metadata file that cannot be read or written as asked; the message names the file and what to do."""


# ----------------------------------------------------------------------------------------------------------
# Reading


def read_entries(path: Path, *, key_field: str | None = None) -> list[tuple[str, dict]]:
    """(key, entry) pairs in file order, as the trainer reads them (entries keep their key field, if any).

    `key_field`: the JSON Lines / CSV column that names the image (diffusers' `--image_column`, e.g. "image");
    default `image_path` or `file_name`."""
    path = Path(path)
    if not path.is_file():
        raise MetadataError(f"{path}: no such metadata file")
    if path.suffix.lower() == ".csv":
        return _csv_entries(path, key_field)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise MetadataError(f"{path}: not UTF-8 (byte offset {e.start}); re-save it with UTF-8 encoding") from None
    if path.suffix.lower() == ".jsonl":
        return _jsonl_entries(path, text, key_field)
    if key_field:
        raise MetadataError(f"{path}: an image column ({key_field!r}) applies to JSON Lines / CSV metadata; a kohya "
                            "JSON object is keyed by image")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise MetadataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise MetadataError(f"{path}: expected a JSON object {{image key: {{caption, tags}}}}")
    not_objects = [k for k, v in data.items() if not isinstance(v, dict)]
    if not_objects:
        shown = ", ".join(map(repr, not_objects[:5])) + (" ..." if len(not_objects) > 5 else "")
        raise MetadataError(f"{path}: each image key needs an object such as {{\"caption\": \"...\"}} as its value; "
                            f"not so for {shown}")
    return [(str(k), v) for k, v in data.items()]


def _jsonl_entries(path: Path, text: str, key_field: str | None = None) -> list[tuple[str, dict]]:
    entries = []
    fields = (key_field,) if key_field else KEY_FIELDS
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise MetadataError(f"{path}: invalid JSON on line {number} column {e.colno}: {e.msg}") from None
        key = next((entry[f] for f in fields if entry.get(f)), None) if isinstance(entry, dict) else None
        if not key:
            found = f" (it has: {', '.join(entry)})" if isinstance(entry, dict) else ""
            wanted = f'"{key_field}" (--image_column)' if key_field else '"image_path" (or "file_name")'
            raise MetadataError(f"{path} line {number}: each line needs an {wanted}{found}")
        entries.append((str(key), entry))
    return entries


def _csv_entries(path: Path, key_field: str | None = None) -> list[tuple[str, dict]]:
    import csv

    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except UnicodeDecodeError as e:
        raise MetadataError(f"{path}: not UTF-8 (byte offset {e.start}); re-save it with UTF-8 encoding") from None
    column = key_field or "file_name"
    if rows and column not in rows[0]:
        raise MetadataError(f"{path}: needs a {column!r} column (found: {', '.join(rows[0])})")
    return [(row[column], row) for row in rows]


def read_metadata(path: Path) -> dict[str, dict]:
    """key -> fields (without the JSON Lines key field), for tools that edit the file. A key listed twice is an
    error: which of the two entries should a tool keep?"""
    metadata: dict[str, dict] = {}
    for key, entry in read_entries(path):
        if key in metadata:
            raise MetadataError(f"{path}: the image {key!r} is listed twice; remove one of the entries")
        metadata[key] = {k: v for k, v in entry.items() if k not in KEY_FIELDS}
    return metadata


def resolve_image(key: str, image_dir: Path | None, metadata_dir: Path) -> Path | None:
    """The image a key names: the path itself (absolute, or relative to the image folder, then to the metadata
    file's folder), or that path plus an image suffix (stem keys). None when there is no such image."""
    candidates = [Path(key)] if Path(key).is_absolute() else []
    candidates += [base / key for base in (image_dir, metadata_dir) if base is not None]
    for candidate in candidates:
        if candidate.is_file() and candidate.suffix.lower() in IMAGE_EXTENSIONS:
            return candidate
        for suffix in _SUFFIXES:
            with_suffix = candidate.with_name(candidate.name + suffix)
            if with_suffix.is_file():
                return with_suffix
    return None


# ----------------------------------------------------------------------------------------------------------
# Writing


def write_metadata(path: Path, metadata: dict[str, dict]) -> None:
    """Write atomically: a JSON object (indent 2), or JSON Lines when the name ends in .jsonl. Keys sorted."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        lines = [json.dumps({"image_path": key, **dict(sorted(metadata[key].items()))}, ensure_ascii=False)
                 for key in sorted(metadata)]
        text = "".join(line + "\n" for line in lines)
    elif suffix == ".csv":
        raise MetadataError(f"{path}: CSV metadata is read only; write a .json (kohya) or .jsonl file")
    else:
        text = json.dumps(metadata, indent=2, ensure_ascii=False, sort_keys=True) + "\n"
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------
# Merging caption / tag files (finetune/merge_captions_to_metadata.py, merge_dd_tags_to_metadata.py)


def image_key(image: Path, *, full_path: bool) -> str:
    """kohya's key for an image: its stem, or with --full_path its absolute path (normalised, links kept)."""
    return os.path.abspath(image) if full_path else image.stem


@dataclass(frozen=True)
class MergeResult:
    metadata: dict[str, dict]  # a new dict; the input is not modified
    merged: int  # entries whose field was set from a file
    without_file: list[Path]  # images that have no text file (their entries are left as they were)


def merge_text_files(metadata: dict[str, dict], images: list[Path], *, field: str, extension: str,
                     full_path: bool, progress: bool = True) -> MergeResult:
    """Set `field` of each image's entry to the stripped text of its `<stem><extension>` file, creating entries
    as needed; every other field of an existing entry is kept (kohya's merge). Two images with one key (same
    stem in other formats or folders) are an error: one file's text would silently replace the other's."""
    from tqdm import tqdm

    owners: dict[str, Path] = {}
    for image in images:
        key = image_key(image, full_path=full_path)
        if key in owners:
            hint = "" if full_path else "; use --full_path to key images by their full path"
            raise MetadataError(f"{owners[key]} and {image} have the same metadata key {key!r}: rename one of "
                                f"them{hint}")
        owners[key] = image
    out = {key: dict(entry) for key, entry in metadata.items()}
    without_file, problems = [], []
    for key, image in tqdm(owners.items(), desc=f"reading {extension} files", unit="file", disable=not progress):
        try:
            text = read_caption_file(caption_path_for(image, extension))
        except CaptionFileError as e:
            problems.append(str(e))
            continue
        if text is None:
            without_file.append(image)
            continue
        out.setdefault(key, {})[field] = text.strip()
    if problems:
        raise MetadataError(f"{len(problems)} {extension} file(s) cannot be used:\n  " + "\n  ".join(problems))
    return MergeResult(out, len(owners) - len(without_file), without_file)
