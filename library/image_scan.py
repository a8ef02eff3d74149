"""The size and caption of every image in a folder: what scanning a DreamBooth subset costs, made fast.

Scanning reads each image's header (its size, and its EXIF orientation, which may swap the sides) and its caption
file. At 100k images that took about a minute; two things cut it:
- The first scan reads the headers and captions of a large folder in worker processes, one per core.
- kohya's `--cache_info` (also the subset key `cache_info`) keeps each folder's results in
  `<image_dir>/metadata_cache.json`, so a repeated scan reads one JSON file and stats the files. kohya trusts that
  file as it is ("the user must take responsibility" for changed images); here every entry also records the
  image's and the caption file's size and modification time, and an entry whose files changed (or an image that
  is new) is read again, so a stale cache is never used. The entries keep kohya's `caption` and `resolution`
  fields, so kohya reads our file too; kohya's own files lack the fingerprints and are read afresh once.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from library.captions import CaptionFileError, caption_path_for, read_caption_file
from library.images import ImageError, image_size, is_image_file

logger = logging.getLogger(__name__)

CACHE_FILE = "metadata_cache.json"  # kohya's name (train_util.DreamBoothDataset.IMAGE_INFO_CACHE_FILE)
PARALLEL_FROM = 2000  # fewer images to read are quicker in this process than starting the workers
WORKERS = os.cpu_count() or 1  # processes for a first scan (benchmarks/bench_dataset_scan.py sets 1 to compare)


@dataclass(frozen=True)
class ImageInfo:
    path: Path
    size: tuple[int, int] | None  # (width, height) after EXIF orientation; None: unreadable (see `problem`)
    caption: str | None  # the caption file's text; None: no caption file
    problem: str | None = None  # why the image cannot be used, naming the file


def _fingerprint(path: str) -> str | None:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def read_one(path: Path, caption_extension: str) -> ImageInfo:
    """Header and caption of one image (a worker's unit of work). A caption that is not UTF-8 raises
    CaptionFileError, as reading it in training would."""
    try:
        size = image_size(path)
    except ImageError as e:
        return ImageInfo(path, None, None, str(e))
    return ImageInfo(path, size, read_caption_file(caption_path_for(path, caption_extension)))


def _read_chunk(paths: list[Path], caption_extension: str) -> list[ImageInfo | str]:
    out = []
    for path in paths:
        try:
            out.append(read_one(path, caption_extension))
        except CaptionFileError as e:  # raised again in the scanning process, with the same message
            out.append(str(e))
    return out


def read_many(paths: list[Path], caption_extension: str, workers: int | None = None) -> list[ImageInfo]:
    """`read_one` for every path, in order; in `workers` processes (default: one per core) when there are many."""
    import multiprocessing

    workers = workers if workers is not None else WORKERS
    # Forked workers, as torch's DataLoader uses on Linux: they start at once and only run PIL and file reads
    # (a spawned worker would import the entry script, torch included, and needs it guarded by __main__).
    if workers < 2 or len(paths) < PARALLEL_FROM or "fork" not in multiprocessing.get_all_start_methods():
        return [read_one(path, caption_extension) for path in paths]
    chunk = max(256, len(paths) // (workers * 8))  # several chunks per worker, so a slow one does not hold the rest
    chunks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        results = [info for part in pool.map(_read_chunk, chunks, [caption_extension] * len(chunks))
                   for info in part]
    for info in results:
        if isinstance(info, str):
            raise CaptionFileError(info)
    return results


def list_image_files(folder: Path) -> list[Path]:
    """The image files directly in `folder`, sorted by name (scandir: no stat per entry)."""
    with os.scandir(folder) as entries:
        names = sorted(entry.name for entry in entries if entry.is_file() and is_image_file(Path(entry.name)))
    return [folder / name for name in names]


def scan_folder(folder: Path, caption_extension: str, *, cache_info: bool = False) -> list[ImageInfo]:
    """Every image file in `folder` with its size and caption. `cache_info`: read and update the folder's
    metadata_cache.json (entries checked against the files' sizes and modification times)."""
    paths = list_image_files(folder)
    if not cache_info:
        return read_many(paths, caption_extension)
    cache_path = folder / CACHE_FILE
    cached = _load_cache(cache_path)
    # Strings, not Path objects, for the per-image work: at 100k images pathlib's parsing was most of the time.
    base = os.path.realpath(folder)
    caption_ext = caption_path_for(Path("x.png"), caption_extension).suffix  # with its leading dot
    known, prints_of, to_read = {}, {}, []
    for path in paths:
        name = path.name
        caption_name = os.path.splitext(name)[0] + caption_ext
        key = os.path.join(base, name)
        prints = (_fingerprint(key), caption_name, _fingerprint(os.path.join(base, caption_name)))
        prints_of[path] = (key, prints)
        entry = cached.get(key)
        if isinstance(entry, dict) and (entry.get("image"), entry.get("caption_file"), entry.get("caption_fp")) == prints \
                and isinstance(entry.get("resolution"), list) and len(entry["resolution"]) == 2:
            known[path] = ImageInfo(path, tuple(entry["resolution"]), entry.get("caption") if prints[2] else None)
        else:
            to_read.append(path)
    fresh = {info.path: info for info in read_many(to_read, caption_extension)}
    infos = [known.get(path) or fresh[path] for path in paths]
    logger.info("%s: %d image(s): %d from %s, %d read", folder, len(paths), len(known), CACHE_FILE, len(to_read))
    if to_read or len(cached) != len(known):
        _save_cache(cache_path, {prints_of[info.path][0]: _entry(info, prints_of[info.path][1]) for info in infos
                                 if info.size is not None})
    return infos


def _entry(info: ImageInfo, prints: tuple) -> dict:
    image, caption_file, caption_fp = prints
    return {"caption": info.caption or "", "resolution": list(info.size),  # kohya's fields
            "image": image, "caption_file": caption_file, "caption_fp": caption_fp}


def _load_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        logger.warning("%s: unreadable (%s); the folder is read afresh and the file rewritten", path, e)
        return {}
    return data if isinstance(data, dict) else {}


def _save_cache(path: Path, entries: dict) -> None:
    from library.atomic_files import atomic_file

    try:
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    except OSError as e:
        logger.warning("--cache_info: cannot write %s (%s); the next scan reads the folder again", path, e)
