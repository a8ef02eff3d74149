"""Where training images come from: kohya's DreamBooth folder convention, turned into image records.

`--train_data_dir` is the *parent* of folders named `<repeats>_<identifier> <class>` (e.g. `10_sks dog`);
`--reg_data_dir` the parent of `<repeats>_<class>` folders. Each folder becomes a `Subset`; each image in it an
`ImageRecord` with its raw caption (caption file, else the folder's class tokens). Sizes are read from image
headers only, so scanning thousands of images is quick.

The most common kohya failure ("No data found") is pointing `--train_data_dir` at the image folder itself; that
case, folders without a repeat count and empty folders all get a message that says what the layout must be.
"""

from __future__ import annotations

import enum
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from library.captions import CaptionOptions, other_caption_files
from library.image_scan import scan_folder
from library.images import ImageError, image_size, is_image_file
from library.metadata_files import MetadataError, read_entries, resolve_image

logger = logging.getLogger(__name__)

_FOLDER_NAME = re.compile(r"^(\d+)_(.*)$")


class DatasetError(ValueError):
    """A dataset layout problem; the message names the folder or file and says what to do."""


@dataclass(frozen=True)
class Subset:
    """One image folder and the options that apply to its images (kohya's dataset "subset")."""

    image_dir: Path
    num_repeats: int = 1
    class_tokens: str | None = None
    is_reg: bool = False
    caption_extension: str = ".caption"
    caption: CaptionOptions = field(default_factory=CaptionOptions)
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False
    alpha_mask: bool = False
    resize_interpolation: str | None = None  # kohya's name of the resize filter (None: area / lanczos)
    metadata_file: Path | None = None  # fine-tune subsets: captions from kohya metadata JSON / JSONL
    caption_column: str = "text"  # diffusers imagefolder metadata.jsonl / metadata.csv
    image_column: str | None = None  # metadata column naming the image (default: image_path / file_name)
    conditioning_column: str | None = None  # metadata column naming a ControlNet conditioning image
    conditioning_dir: Path | None = None  # same-stem companion images (loss masks, ControlNet conditions)
    cache_info: bool = False  # kohya's --cache_info: sizes and captions kept in <image_dir>/metadata_cache.json


class ConditioningUse(enum.Enum):
    """What a record's companion (conditioning) image is for."""

    LOSS_MASK = "loss_mask"  # --masked_loss: its R channel weights the loss
    CONTROL = "control"  # ControlNet: the control image, given to the ControlNet as is (0..1)
    UNET_INPUT = "unet_input"  # a model's extra U-Net input: inpainting mask, depth map, condition channels


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    size: tuple[int, int]  # (width, height) after EXIF orientation
    caption: str  # raw: before prefix/shuffle/dropout, which happen per sample
    subset: Subset
    conditioning: Path | None = None  # the companion image from the subset's conditioning_dir


def dreambooth_subsets(parent: Path, *, is_reg: bool, template: Subset) -> list[Subset]:
    """Subsets from the `<repeats>_<class tokens>` folders inside `parent`."""
    flag = "--reg_data_dir" if is_reg else "--train_data_dir"
    if not parent.is_dir():
        raise DatasetError(f"{flag} {parent}: no such folder")
    entries = sorted(parent.iterdir())
    direct_images = [p.name for p in entries if p.is_file() and is_image_file(p)]
    folders = [p for p in entries if p.is_dir()]
    subsets, skipped = [], []
    for folder in folders:
        match = _FOLDER_NAME.match(folder.name)
        if not match:
            skipped.append(folder.name)
            continue
        repeats, tokens = int(match.group(1)), match.group(2).strip()
        if repeats < 1:
            raise DatasetError(f"{folder}: the repeat count must be at least 1 (folder names are "
                               "'<repeats>_<identifier> <class>', e.g. '10_sks dog')")
        subsets.append(Subset(**{**template.__dict__, "image_dir": folder, "num_repeats": repeats,
                                 "class_tokens": tokens or None, "is_reg": is_reg}))
    for name in skipped:
        logger.warning("%s: ignoring folder %r: its name does not start with '<repeats>_' (e.g. '10_%s')",
                       flag, name, name)
    if not subsets:
        example = f"'{parent / '10_sks dog'}'"
        if direct_images:
            shown = ", ".join(direct_images[:3]) + (", ..." if len(direct_images) > 3 else "")
            hint = (f" It holds {len(direct_images)} image(s) directly ({shown}), but {flag} must be the PARENT of "
                    "'<repeats>_<class>' folders, not the image folder itself: ")
            if _FOLDER_NAME.match(parent.name):
                hint += f"use {flag} {parent.parent}"
            else:
                hint += f"move the images into a folder such as {example} (10 = repeats per epoch)"
        elif skipped:
            hint = (f" Found folder(s) without a '<repeats>_' prefix: {', '.join(map(repr, skipped[:5]))}"
                    f"{', ...' if len(skipped) > 5 else ''}; rename them, e.g. '10_{skipped[0]}'")
        else:
            hint = f" Put the images into a folder such as {example} (10 = repeats per epoch)"
        raise DatasetError(f"{flag} {parent}: no '<repeats>_<identifier> <class>' folders inside.{hint}.")
    if direct_images:
        logger.warning("%s %s: ignoring %d image(s) directly in the parent folder; only images inside "
                       "'<repeats>_<class>' folders are used", flag, parent, len(direct_images))
    return subsets


def scan_subset(subset: Subset) -> tuple[list[ImageRecord], list[str]]:
    """The subset's images as records, plus a list of problems (unreadable images), each naming the file."""
    if not subset.image_dir.is_dir():
        raise DatasetError(f"{subset.image_dir}: no such image folder")
    records, problems, uncaptioned = [], [], []
    for info in scan_folder(subset.image_dir, subset.caption_extension, cache_info=subset.cache_info):
        if info.problem is not None:
            problems.append(info.problem)
            continue
        caption = info.caption
        if caption is None:
            uncaptioned.append(info.path.name)
            caption = subset.class_tokens or ""
        records.append(ImageRecord(info.path, info.size, caption, subset))
    if uncaptioned:
        fallback = f"the folder's class tokens {subset.class_tokens!r}" if subset.class_tokens else "an empty caption"
        logger.warning("%s: %d image(s) without a %s caption file use %s: %s%s", subset.image_dir, len(uncaptioned),
                       subset.caption_extension, fallback, ", ".join(uncaptioned[:5]),
                       " ..." if len(uncaptioned) > 5 else "")
        # Caption files with another extension are almost always a wrong --caption_extension (a tagger's .txt
        # beside the trainers' default .caption); training on the fallback is kohya's behaviour, so say it loudly.
        found = other_caption_files((subset.image_dir / name for name in uncaptioned), subset.caption_extension)
        for ext, count in found.items():
            logger.warning("%s: %d of these image(s) have a %s file, which is NOT read: captions come from %s "
                           "files only (--caption_extension / the subset's caption_extension). Pass "
                           "--caption_extension %s to train with them.", subset.image_dir, count, ext,
                           subset.caption_extension, ext)
    if not records and not problems:
        raise DatasetError(f"{subset.image_dir}: no images (looked for .png, .jpg, .jpeg, .webp, .bmp); put the "
                           "images in it, or remove the empty folder")
    if subset.conditioning_dir is not None:
        records = pair_conditioning(records, subset.conditioning_dir)
    return records, problems


def pair_conditioning(records: list[ImageRecord], folder: Path) -> list[ImageRecord]:
    """Give each record its same-stem image from `folder`; a missing or an extra counterpart is an error naming
    them (a silently unpaired image would train on the wrong target)."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such conditioning folder")
    by_stem: dict[str, Path] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p)):
        if path.stem in by_stem:
            raise DatasetError(f"{folder}: two conditioning images for '{path.stem}': {by_stem[path.stem].name}, "
                               f"{path.name}")
        by_stem[path.stem] = path
    missing = [r.path.name for r in records if r.path.stem not in by_stem]
    extra = sorted(set(by_stem) - {r.path.stem for r in records})
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} image(s) without a conditioning image: {', '.join(missing[:5])}")
        if extra:
            names = ", ".join(by_stem[stem].name for stem in extra[:5])
            parts.append(f"{len(extra)} conditioning image(s) without an image: {names}")
        raise DatasetError(f"{folder}: every image needs exactly one same-stem conditioning image; "
                           + "; ".join(parts))
    return [replace(r, conditioning=by_stem[r.path.stem]) for r in records]


def balance_regularization(train_samples: int, reg_repeats: list[int]) -> list[int]:
    """kohya's reg balancing, per reg image (given each image's folder repeats): images are taken in order, each
    with its repeats, until the reg samples reach `train_samples` (later images get 0: unused this run, as kohya
    warns); if all are taken and the total is still short, images get +1 repeat round-robin until it is reached.
    Returns each reg image's repeats. The point: each epoch sees about as many reg as train samples."""
    if not reg_repeats or train_samples <= 0:
        return [0] * len(reg_repeats)
    repeats = [0] * len(reg_repeats)
    total = 0
    for i, r in enumerate(reg_repeats):
        repeats[i] = r
        total += r
        if total >= train_samples:
            return repeats
    i = 0
    while total < train_samples:
        repeats[i] += 1
        total += 1
        i = (i + 1) % len(repeats)
    return repeats


# ----------------------------------------------------------------------------------------------------------
# Captions from metadata files: kohya's fine-tune JSON / JSONL and diffusers' imagefolder metadata (the files
# themselves are read by library/metadata_files.py, which the finetune/ tools share)


def scan_metadata_subset(subset: Subset, caption_joiner: str = ", ") -> tuple[list[ImageRecord], list[str]]:
    """Records of a fine-tune subset: every metadata entry must name an existing image; caption = caption +
    separator + tags (kohya). Keys without an image are an error listing them (with a count)."""
    try:
        entries = read_entries(subset.metadata_file, key_field=subset.image_column)
    except MetadataError as e:
        raise DatasetError(str(e)) from None
    fields = {k for _, entry in entries for k in entry}
    if entries and not fields & {"caption", "tags", subset.caption_column}:
        raise DatasetError(f"{subset.metadata_file}: no caption column: expected 'caption' / 'tags' (kohya) or "
                           f"'{subset.caption_column}' (--caption_column); the entries have: {', '.join(sorted(fields))}")
    if entries and subset.conditioning_column and subset.conditioning_column not in fields:
        raise DatasetError(f"{subset.metadata_file}: no column {subset.conditioning_column!r} "
                           f"(--conditioning_image_column); the entries have: {', '.join(sorted(fields))}")
    records, problems, missing, missing_conditioning, uncaptioned = [], [], [], [], []
    seen = set()
    for key, entry in entries:
        path = resolve_image(key, subset.image_dir, subset.metadata_file.parent)
        if path is None:
            missing.append(key)
            continue
        if path in seen:
            continue
        seen.add(path)
        conditioning = None
        if subset.conditioning_column:
            name = str(entry.get(subset.conditioning_column) or "")
            conditioning = resolve_image(name, subset.image_dir, subset.metadata_file.parent) if name else None
            if conditioning is None:
                missing_conditioning.append(f"{key} -> {name or '(empty)'}")
                continue
        caption = entry.get("caption") or entry.get(subset.caption_column) or ""
        tags = entry.get("tags") or ""
        caption = caption_joiner.join(p for p in (str(caption).strip(), str(tags).strip()) if p)
        if not caption:
            uncaptioned.append(path.name)
        try:
            records.append(ImageRecord(path, image_size(path), caption, subset, conditioning=conditioning))
        except ImageError as e:
            problems.append(str(e))
    if missing:
        raise DatasetError(f"{subset.metadata_file}: {len(missing)} of {len(entries)} entries match no image "
                           f"(looked in {subset.image_dir} and beside the metadata file): "
                           f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. Fix the paths, or remove "
                           "those entries from the metadata.")
    if missing_conditioning:
        raise DatasetError(f"{subset.metadata_file}: {len(missing_conditioning)} of {len(entries)} entries name no "
                           f"existing conditioning image in column {subset.conditioning_column!r}: "
                           f"{', '.join(missing_conditioning[:5])}{' ...' if len(missing_conditioning) > 5 else ''}")
    if uncaptioned:
        logger.warning("%s: %d image(s) have neither caption nor tags: %s", subset.metadata_file, len(uncaptioned),
                       ", ".join(uncaptioned[:5]))
    if subset.image_dir is not None and subset.image_dir.is_dir():
        listed = {p.resolve() for p in seen}
        unlisted = [p.name for p in sorted(subset.image_dir.iterdir())
                    if p.is_file() and is_image_file(p) and p.resolve() not in listed]
        if unlisted:
            logger.warning("%s: %d image(s) have no metadata entry and are not used: %s", subset.image_dir,
                           len(unlisted), ", ".join(unlisted[:5]))
    if not records and not problems:
        raise DatasetError(f"{subset.metadata_file}: no entries")
    if subset.conditioning_dir is not None:
        if subset.conditioning_column:
            raise DatasetError(f"{subset.metadata_file}: conditioning images named both by the column "
                               f"{subset.conditioning_column!r} and by the folder {subset.conditioning_dir}; give one")
        records = pair_conditioning(records, subset.conditioning_dir)
    return records, problems


def imagefolder_metadata(folder: Path) -> Path | None:
    """diffusers' imagefolder layout: images plus `metadata.jsonl` (or `metadata.csv`) with a `file_name` column."""
    for name in ("metadata.jsonl", "metadata.csv"):
        if (folder / name).is_file():
            return folder / name
    return None
