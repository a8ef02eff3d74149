"""Hugging Face `datasets` data on disk (parquet, `save_to_disk` folders) turned into the image-folder form the
trainer reads: one image file per cell plus a `metadata.jsonl` naming them.

`--dataset_name` in the diffusers examples is a hub dataset such as `fusing/fill50k`; here nothing is downloaded, so
it is a local copy in one of these forms:
- an image folder with `metadata.jsonl` / `metadata.csv` (diffusers' imagefolder): used as it is;
- a `.parquet` file, or a folder of them (the hub layout, e.g. `data/train-00000-of-00002.parquet`; when file or
  folder names carry split names, only the `train` split is used);
- a folder written by `Dataset.save_to_disk` (`state.json`, `dataset_info.json`, `data-*.arrow`), or by
  `DatasetDict.save_to_disk` (`dataset_dict.json` and one such folder per split; `train` is used).
Image cells are what the `datasets` Image feature stores: a struct `{"bytes", "path"}` (bytes embedded, or a path
to an image file), or plain bytes / a path string.

Where the extracted files go: `<dataset folder>/.sdtrain_extracted/dataset/` (for a single file
`<its folder>/.sdtrain_extracted/file-<name>/`), or, when that folder cannot be written,
`$XDG_CACHE_HOME/sdtrain/datasets/<hash of the dataset path>/` (default `~/.cache/...`). Inside: `<column>/<row>.<ext>`
(the embedded bytes written as they are: same encoding, same pixels; formats the trainer does not read are
re-encoded losslessly as PNG), `metadata.jsonl` with the dataset's own column names (image columns -> file paths,
the caption column -> its text), and `source.json`, the key of the extraction: every source file's path, size,
mtime and a hash of its first and last 64 KiB, plus the columns. A later run reuses the folder only when that key
matches; otherwise it is extracted again, never used stale. The key is deleted before re-extraction starts and
written last, after the images are on disk and `metadata.jsonl` is written atomically, so an interrupted
extraction is redone, not used. A lock file serialises processes (e.g. `accelerate launch` with several GPUs).

pyarrow is imported only when a parquet / arrow dataset is actually read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from library.atomic_files import atomic_file
from library.images import IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)

CACHE_DIR_NAME = ".sdtrain_extracted"
KEY_FILE = "source.json"
EXTRACTION_VERSION = 1  # bump when the extracted layout changes: older extractions are then redone
_HASHED_BYTES = 64 * 1024  # hashed at each end of a source file: catches rewrites that keep size and mtime
_ROWS_PER_BATCH = 64  # rows held in memory at a time (two 512 px PNGs per row: a few tens of MB)

# Split keywords as the `datasets` library recognises them in file and folder names.
_SPLIT_KEYWORDS = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                   "val": "validation", "dev": "validation", "test": "test", "testing": "test", "eval": "test",
                   "evaluation": "test"}

ACCEPTED_FORMS = ("an image folder with metadata.jsonl, a .parquet file or a folder of them (the hub layout), or a "
                  "folder written by datasets' save_to_disk")


class DatasetSourceError(ValueError):
    """A `--dataset_name` that cannot be read as asked; the message says what is wrong and what is there."""


@dataclass(frozen=True)
class Columns:
    """The dataset columns the trainer needs, each with the flag that names it (for error messages)."""

    image: str
    conditioning_image: str
    caption: str

    def by_flag(self) -> list[tuple[str, str]]:
        return [("--image_column", self.image), ("--conditioning_image_column", self.conditioning_image),
                ("--caption_column", self.caption)]


@dataclass(frozen=True)
class Source:
    kind: str  # "parquet" | "arrow"
    root: Path  # the folder relative to which files are named (and path-only image cells resolve)
    files: tuple[Path, ...]


# ----------------------------------------------------------------------------------------------------------
# Entry point


def image_folder_for(dataset: Path | str, columns: Columns, *, progress: bool = True) -> Path:
    """The image folder (with metadata.jsonl) that holds `dataset`'s rows: `dataset` itself when it already is one,
    else the extraction folder, extracted now unless an up-to-date extraction exists."""
    dataset = Path(dataset)
    if dataset.is_dir() and any((dataset / name).is_file() for name in ("metadata.jsonl", "metadata.csv")):
        return dataset
    source = find_source(dataset)
    check_columns(source, columns)
    target = extraction_folder(dataset)
    key = extraction_key(source, columns)
    with _lock(target):
        previous = _read_key(target)
        if previous == key and (target / "metadata.jsonl").is_file():
            logger.info("%s: using the images extracted earlier to %s (the source files are unchanged)", dataset,
                        target)
            return target
        logger.info("%s: extracting the images of %d data file(s) to %s%s", dataset, len(source.files), target,
                    "" if previous is None else " (the source or the columns changed since the last extraction)")
        extract(source, columns, target, key, progress=progress)
    return target


# ----------------------------------------------------------------------------------------------------------
# Finding the data files


def find_source(dataset: Path) -> Source:
    if dataset.is_file():
        if dataset.suffix.lower() == ".parquet":
            return Source("parquet", dataset.parent, (dataset,))
        raise DatasetSourceError(f"not a .parquet file; give {ACCEPTED_FORMS}")
    if not dataset.is_dir():
        raise DatasetSourceError(f"no such file or folder (datasets cannot be downloaded here); give "
                                 f"{ACCEPTED_FORMS}")
    if (dataset / "dataset_dict.json").is_file():
        splits = _read_json(dataset / "dataset_dict.json").get("splits", [])
        if "train" not in splits:
            raise DatasetSourceError(f"this saved DatasetDict has no 'train' split (it has: {', '.join(splits)}); "
                                     f"give the folder of the split to train on, e.g. {dataset / (splits or ['x'])[0]}")
        return _saved_dataset(dataset / "train")
    if (dataset / "state.json").is_file():
        return _saved_dataset(dataset)
    parquet = sorted(p for p in dataset.rglob("*.parquet") if p.is_file()
                     and not any(part.startswith(".") for part in p.relative_to(dataset).parts))
    if parquet:
        return Source("parquet", dataset, tuple(_train_split(dataset, parquet)))
    raise DatasetSourceError(f"neither metadata.jsonl / metadata.csv, nor .parquet files, nor a save_to_disk "
                             f"dataset (state.json) in this folder; give {ACCEPTED_FORMS}")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DatasetSourceError(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(data, dict):
        raise DatasetSourceError(f"{path}: expected a JSON object")
    return data


def _saved_dataset(folder: Path) -> Source:
    """A `Dataset.save_to_disk` folder: its state.json lists the arrow files (IPC streams) in row order."""
    state = _read_json(folder / "state.json") if (folder / "state.json").is_file() else None
    if state is None:
        raise DatasetSourceError(f"{folder}: no state.json (not a folder written by save_to_disk)")
    names = [entry.get("filename") for entry in state.get("_data_files", []) if isinstance(entry, dict)]
    if not names or not all(names):
        raise DatasetSourceError(f"{folder / 'state.json'}: lists no data files (_data_files)")
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DatasetSourceError(f"{folder}: data file(s) listed in state.json are missing: {', '.join(missing)}")
    return Source("arrow", folder, tuple(folder / n for n in names))


def _split_of(relative: Path) -> str | None:
    """The split a file belongs to by the `datasets` naming rules: a folder named after a split, or a file name
    starting with one (`train-00000-of-00002.parquet`, `test.parquet`)."""
    for part in relative.parent.parts:
        if part.lower() in _SPLIT_KEYWORDS:
            return _SPLIT_KEYWORDS[part.lower()]
    first_word = re.split(r"[-._ 0-9]", relative.name, maxsplit=1)[0].lower()
    return _SPLIT_KEYWORDS.get(first_word)


def _train_split(root: Path, files: list[Path]) -> list[Path]:
    splits = {f: _split_of(f.relative_to(root)) for f in files}
    if not any(splits.values()):
        return files
    train = [f for f in files if splits[f] == "train"]
    if not train:
        found = sorted({s for s in splits.values() if s})
        raise DatasetSourceError(f"the parquet files are named for the split(s) {', '.join(found)} but none for "
                                 "'train'; give the file or folder to train on")
    skipped = [f for f in files if splits[f] != "train"]
    if skipped:
        logger.info("%s: using the %d parquet file(s) of the train split; not the %d other(s): %s", root,
                    len(train), len(skipped), ", ".join(str(f.relative_to(root)) for f in skipped[:5]))
    return train


# ----------------------------------------------------------------------------------------------------------
# Columns


def _schema(source: Source, path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if source.kind == "parquet":
            return pq.read_schema(path)
        with _arrow_reader(path) as reader:
            return reader.schema
    except (OSError, pa.ArrowException) as e:
        raise DatasetSourceError(f"{path}: cannot be read as {source.kind} ({e})") from None


def check_columns(source: Source, columns: Columns) -> None:
    """Every shard has the three columns, and the image columns hold images. A missing one is an error naming
    the flag and listing the columns there are (diffusers' example does the same)."""
    import pyarrow as pa

    for path in source.files:
        schema = _schema(source, path)
        names = list(schema.names)
        problems = [f"no column {name!r} ({flag})" for flag, name in columns.by_flag() if name not in names]
        if problems:
            where = f" in {path.name}" if len(source.files) > 1 else ""
            raise DatasetSourceError(f"{'; '.join(problems)}{where}; the dataset has: {', '.join(names)}")
        for flag, name in columns.by_flag()[:2]:
            kind = schema.field(name).type
            is_struct = pa.types.is_struct(kind) and {"bytes", "path"} <= {kind.field(i).name
                                                                           for i in range(kind.num_fields)}
            if not (is_struct or _is_bytes(kind) or _is_text(kind)):
                raise DatasetSourceError(f"column {name!r} ({flag}) holds {kind}, not images (expected the datasets "
                                         "Image feature: a struct of bytes and path, or bytes, or a path)")


def _is_bytes(kind) -> bool:
    import pyarrow as pa

    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def _is_text(kind) -> bool:
    import pyarrow as pa

    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


# ----------------------------------------------------------------------------------------------------------
# Where the extraction goes, and its key


def extraction_folder(dataset: Path) -> Path:
    dataset = dataset.absolute()
    parent, name = (dataset, "dataset") if dataset.is_dir() else (dataset.parent, f"file-{dataset.name}")
    if _can_write(parent):
        return parent / CACHE_DIR_NAME / name
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    fallback = cache_home / "sdtrain" / "datasets" / hashlib.sha256(str(dataset).encode()).hexdigest()[:16]
    logger.info("%s is not writable; extracting the dataset's images to %s", parent, fallback)
    return fallback


def _can_write(folder: Path) -> bool:
    existing = folder / CACHE_DIR_NAME
    return os.access(existing if existing.is_dir() else folder, os.W_OK | os.X_OK)


def _file_fingerprint(path: Path) -> dict:
    stat = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(_HASHED_BYTES))
        if stat.st_size > 2 * _HASHED_BYTES:
            f.seek(-_HASHED_BYTES, os.SEEK_END)
            digest.update(f.read(_HASHED_BYTES))
        elif stat.st_size > _HASHED_BYTES:
            digest.update(f.read())
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "edges_sha256": digest.hexdigest()}


def extraction_key(source: Source, columns: Columns) -> dict:
    """Everything that determines the extracted folder's content."""
    return {"version": EXTRACTION_VERSION, "kind": source.kind, "root": str(source.root.absolute()),
            "files": {str(p.relative_to(source.root)): _file_fingerprint(p) for p in source.files},
            "columns": {"image": columns.image, "conditioning_image": columns.conditioning_image,
                        "caption": columns.caption}}


def _read_key(target: Path) -> dict | None:
    try:
        return json.loads((target / KEY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


@contextmanager
def _lock(target: Path) -> Iterator[None]:
    """One process extracts; the others wait and then find the extraction up to date."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; concurrent extraction of one dataset is unsupported there
        yield
        return
    with open(target.parent / f"{target.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------------------
# Extraction


@contextmanager
def _arrow_reader(path: Path):
    """A save_to_disk arrow file: an IPC stream (what `datasets` writes), or an IPC file. Memory-mapped."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_file(source)
        yield reader


def _row_count(source: Source, path: Path) -> int:
    import pyarrow.parquet as pq

    if source.kind == "parquet":
        return pq.ParquetFile(path).metadata.num_rows
    with _arrow_reader(path) as reader:
        return reader.read_all().num_rows  # memory-mapped: no copy of the data


def _batches(source: Source, path: Path, names: list[str]):
    import pyarrow.parquet as pq

    if source.kind == "parquet":
        # No pre-buffering, small read buffers: pyarrow would otherwise hold whole row groups (~100 MB each for
        # image datasets) and read ahead several of them.
        parquet = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
        yield from parquet.iter_batches(batch_size=_ROWS_PER_BATCH, columns=names)
        return
    with _arrow_reader(path) as reader:
        yield from reader.read_all().select(names).to_batches(max_chunksize=_ROWS_PER_BATCH)


def _cells(array) -> list[tuple[bytes | None, str | None]]:
    """(bytes, path) of each image cell of a batch column."""
    import pyarrow as pa

    if pa.types.is_struct(array.type):
        return list(zip(array.field("bytes").to_pylist(), array.field("path").to_pylist()))
    values = array.to_pylist()
    return [(None, v) for v in values] if _is_text(array.type) else [(v, None) for v in values]


def extract(source: Source, columns: Columns, target: Path, key: dict, *, progress: bool = True) -> None:
    """Write every row's two images and the metadata.jsonl into `target`, replacing an earlier extraction."""
    from tqdm import tqdm

    (target / KEY_FILE).unlink(missing_ok=True)  # first: an interrupted extraction is never taken for a finished one
    folders = _column_folders(columns)
    for folder in folders.values():
        shutil.rmtree(target / folder, ignore_errors=True)
        (target / folder).mkdir(parents=True)
    total = sum(_row_count(source, p) for p in source.files)
    width = max(6, len(str(total - 1)))
    lines, problems = [], []
    row = 0
    names = list(dict.fromkeys([columns.image, columns.conditioning_image, columns.caption]))
    with tqdm(total=total, desc="extracting dataset images", unit="row", disable=not progress) as bar:
        for path in source.files:
            for batch in _batches(source, path, names):
                image_cells = {name: _cells(batch.column(names.index(name))) for name in folders}
                captions = batch.column(names.index(columns.caption)).to_pylist()
                for i in range(batch.num_rows):
                    entry = {}
                    for name, folder in folders.items():
                        data, where = image_cells[name][i]
                        try:
                            entry[name] = _write_image(data, where, target, f"{folder}/{row:0{width}d}", source, path)
                        except DatasetSourceError as e:
                            problems.append(f"row {row} column {name!r}: {e}")
                    entry[columns.caption] = _caption(captions[i])
                    lines.append(json.dumps(entry, ensure_ascii=False))
                    row += 1
                bar.update(batch.num_rows)
    if problems:
        raise DatasetSourceError(f"{len(problems)} image cell(s) cannot be used: {'; '.join(problems[:5])}"
                                 f"{' ...' if len(problems) > 5 else ''}")
    if row == 0:
        raise DatasetSourceError("the dataset has no rows")
    _flush_to_disk(target)
    with atomic_file(target / "metadata.jsonl") as tmp:
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    with atomic_file(target / KEY_FILE) as tmp:  # last: the extraction is complete
        tmp.write_text(json.dumps(key, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def _column_folders(columns: Columns) -> dict[str, str]:
    """image column -> the subfolder its files go to (a safe file name; a column used twice is written once)."""
    folders: dict[str, str] = {}
    for name in dict.fromkeys([columns.image, columns.conditioning_image]):
        safe = re.sub(r"[^A-Za-z0-9_-]", "_", name) or "column"
        while safe in folders.values() or safe.startswith("."):
            safe = "_" + safe
        folders[name] = safe
    return folders


_MAGIC = ((b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8\xff", ".jpg"), (b"BM", ".bmp"))


def _suffix(data: bytes) -> str | None:
    for magic, suffix in _MAGIC:
        if data.startswith(magic):
            return suffix
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return None


def _write_image(data: bytes | None, where: str | None, target: Path, stem: str, source: Source,
                 shard: Path) -> str:
    """Write one cell's image under `target/stem.<ext>`; returns what metadata.jsonl names it by: the relative file
    name, or, for a cell that only holds a path to an existing image file, that file's absolute path."""
    if data:
        suffix = _suffix(data)
        if suffix is not None:
            (target / (stem + suffix)).write_bytes(data)
            return stem + suffix
        return _reencode(data, target, stem)
    if where:
        for candidate in (Path(where), shard.parent / where, source.root / where):
            if candidate.is_file():
                if candidate.suffix.lower() not in IMAGE_EXTENSIONS:
                    return _reencode(candidate.read_bytes(), target, stem)
                return str(candidate.absolute())
        raise DatasetSourceError(f"no embedded bytes, and its path {where!r} is no file (looked beside the data file "
                                 f"and in {source.root})")
    raise DatasetSourceError("empty (no image)")


def _reencode(data: bytes, target: Path, stem: str) -> str:
    """A format the trainer does not read (TIFF, GIF, ...) as PNG: lossless, so the pixels stay the same."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            image.save(target / (stem + ".png"), format="PNG")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DatasetSourceError(f"not a readable image ({e})") from None
    return stem + ".png"


def _caption(value) -> str:
    """The caption cell as text; a list of captions (some datasets hold several) gives its first."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return _caption(value[0]) if value else ""
    return str(value)


def _flush_to_disk(target: Path) -> None:
    """Make the image files durable before the key says the extraction is complete. One sync of everything is far
    cheaper than an fsync per file for tens of thousands of files."""
    if hasattr(os, "sync"):
        os.sync()
        return
    for path in target.rglob("*"):
        if path.is_file():
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
