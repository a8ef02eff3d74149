"""Where training images come from: kohya's DreamBooth folder convention, turned into image records.

`--train_data_dir` is the *parent* of folders named `<repeats>_<identifier> <class>` (e.g. `10_sks dog`);
`--reg_data_dir` the parent of `<repeats>_<class>` folders. Each folder becomes a `Subset`; each image in it an
`ImageRecord` with its raw caption (caption file, else the folder's class tokens). Sizes are read from image
headers only, so scanning thousands of images is quick.

The most common kohya failure ("No data found") is pointing `--train_data_dir` at the image folder itself; that
case, folders without a repeat count and empty folders all get a message that says what the layout must be.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from library.captions import CaptionOptions, caption_path_for, read_caption_file
from library.images import ImageError, image_size, is_image_file

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


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    size: tuple[int, int]  # (width, height) after EXIF orientation
    caption: str  # raw: before prefix/shuffle/dropout, which happen per sample
    subset: Subset


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
    for path in sorted(p for p in subset.image_dir.iterdir() if p.is_file() and is_image_file(p)):
        try:
            size = image_size(path)
        except ImageError as e:
            problems.append(str(e))
            continue
        caption = read_caption_file(caption_path_for(path, subset.caption_extension))
        if caption is None:
            uncaptioned.append(path.name)
            caption = subset.class_tokens or ""
        records.append(ImageRecord(path, size, caption, subset))
    if uncaptioned:
        fallback = f"the folder's class tokens {subset.class_tokens!r}" if subset.class_tokens else "an empty caption"
        logger.warning("%s: %d image(s) without a %s caption file use %s: %s%s", subset.image_dir, len(uncaptioned),
                       subset.caption_extension, fallback, ", ".join(uncaptioned[:5]),
                       " ..." if len(uncaptioned) > 5 else "")
    if not records and not problems:
        raise DatasetError(f"{subset.image_dir}: no images (looked for .png, .jpg, .jpeg, .webp, .bmp); put the "
                           "images in it, or remove the empty folder")
    return records, problems


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
