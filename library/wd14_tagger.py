"""WD14-style image taggers (SmilingWolf's ONNX models) as kohya's finetune/tag_images_by_wd14_tagger.py runs them:
the model folder, the labels, the image preprocessing and the choice of tags. The script does the file I/O.

Two model layouts, both read from a local folder (nothing is downloaded):
- SmilingWolf's (`model.onnx` + `selected_tags.csv` with `tag_id,name,category,count`): one output per CSV row, in
  row order; category 9 = rating, 0 = general, 4 = character. The input is NHWC BGR float 0..255 (the Keras models
  were trained so), probabilities come out of the model.
- kohya's second layout (`model_optimized.onnx` + `tag_mapping.json`, `{id: {"tag", "category"}}` with categories
  Rating / General / Character / Copyright / Meta / Model / Quality / Artist): the input is NCHW, scaled to -1..1
  (from the same BGR pixels: kohya feeds it so), the outputs are logits (a sigmoid gives probabilities).

Preprocessing (kohya's, from SmilingWolf's): transparency composited onto white, RGB -> BGR, padded to a square
with white (centred, the odd pixel at the bottom / right), resized to the model's input size (box averaging when
shrinking, Lanczos when enlarging: kohya's cv2.INTER_AREA / PIL LANCZOS rule), float32. EXIF rotation is applied
first (kohya tags the unrotated pixels; the trainers train on rotated ones).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

DEFAULT_REPO_ID = "SmilingWolf/wd-v1-4-convnext-tagger-v2"  # kohya's default
DEFAULT_IMAGE_SIZE = 448  # SmilingWolf's models; used when the ONNX input has no fixed size

CSV_CATEGORIES = {"9": "rating", "0": "general", "4": "character"}
JSON_CATEGORIES = {"Rating": "rating", "General": "general", "Character": "character", "Copyright": "copyright",
                   "Meta": "meta", "Model": "model", "Quality": "quality", "Artist": "artist"}
OTHER_CATEGORIES = ("copyright", "meta", "model", "artist")  # thresholded like general tags, json layout only


class TaggerError(ValueError):
    """A tagger model folder, label file or option that cannot be used; the message says which and what to do."""


# ----------------------------------------------------------------------------------------------------------
# The model folder


@dataclass(frozen=True)
class ModelFiles:
    folder: Path
    onnx: Path
    labels: Path  # selected_tags.csv or tag_mapping.json

    @property
    def json_layout(self) -> bool:
        return self.labels.suffix == ".json"


LAYOUTS = (("model.onnx", "selected_tags.csv"), ("model_optimized.onnx", "tag_mapping.json"))


def _files_in(folder: Path) -> ModelFiles | None:
    for onnx_name, labels_name in LAYOUTS:
        if (folder / onnx_name).is_file() and (folder / labels_name).is_file():
            return ModelFiles(folder, folder / onnx_name, folder / labels_name)
    return None


def kohya_model_location(model_dir: Path, repo_id: str) -> Path:
    """Where kohya's script keeps a downloaded repo: `<model_dir>/<namespace>_<name>[/<subfolder>]`."""
    parts = repo_id.split("/")
    return model_dir.joinpath("_".join(parts[:2]), *parts[2:])


def find_model(model_dir: Path, repo_id: str | None) -> ModelFiles:
    """The model files: `model_dir` itself when it holds them (and no --repo_id is given), else kohya's download
    location for the repo. Nothing is downloaded: a missing model is an error that says how to get it."""
    location = kohya_model_location(model_dir, repo_id or DEFAULT_REPO_ID)
    candidates = [location] if repo_id else [model_dir, location]
    for folder in candidates:
        found = _files_in(folder)
        if found is not None:
            return found
    for folder in candidates:
        if (folder / "saved_model.pb").is_file():
            raise TaggerError(f"{folder}: a TensorFlow SavedModel, which this tool does not run (it runs the ONNX "
                              "export only): put the repo's model.onnx beside its selected_tags.csv")
    repo = repo_id or DEFAULT_REPO_ID
    wanted = " or ".join(f"{a} + {b}" for a, b in LAYOUTS)
    files = ("model_optimized.onnx tag_mapping.json" if len(repo.split("/")) > 2 else "model.onnx selected_tags.csv")
    subfolder = "/".join(repo.split("/")[2:])
    download = (f"huggingface-cli download {'/'.join(repo.split('/')[:2])} "
                + " ".join(f"{subfolder}/{f}" if subfolder else f for f in files.split())
                + f" --local-dir {kohya_model_location(model_dir, '/'.join(repo.split('/')[:2]))}")
    raise TaggerError(
        f"no tagger model in {' or '.join(str(c) for c in candidates)} (looked for {wanted}); nothing is "
        f"downloaded here. On a machine with internet access run `{download}` (or kohya's script, which downloads "
        f"to the same place) and copy the folder here, or give --model_dir a folder holding {files}")


# ----------------------------------------------------------------------------------------------------------
# Labels


@dataclass(frozen=True)
class LabelOptions:
    """kohya's options that rewrite tag names, applied in its documented order: --character_tag_expand, then
    --remove_underscore, then --tag_replacement."""

    caption_separator: str = ", "
    character_tag_expand: bool = False
    remove_underscore: bool = False
    replacements: tuple[tuple[str, str], ...] = ()


def parse_tag_replacement(text: str | None) -> tuple[tuple[str, str], ...]:
    """`source1,target1;source2,target2` with `\\,` and `\\;` for literal commas and semicolons."""
    if not text:
        return ()
    escaped = text.replace("\\,", "\0c").replace("\\;", "\0s")
    pairs = []
    for item in escaped.split(";"):
        parts = item.split(",")
        if len(parts) != 2:
            raise TaggerError(f"--tag_replacement {text!r}: {item.replace(chr(0) + 'c', ',')!r} is not "
                              "'source,target' (escape a comma or semicolon inside a tag as \\, or \\;)")
        pairs.append(tuple(p.replace("\0c", ",").replace("\0s", ";") for p in parts))
    return tuple(pairs)


def rewrite_name(name: str, category: str, options: LabelOptions) -> str:
    if category == "character" and options.character_tag_expand and name.endswith(")"):
        # chara_name_(series) -> "chara_name" + separator + "series"; chara_(costume)_(series) keeps the costume
        head, _, series = name.rpartition("(")
        name = head.removesuffix("_") + options.caption_separator + series.replace(")", "")
    if options.remove_underscore and len(name) > 3:  # short tags are emoticons (^_^): kept as they are
        name = name.replace("_", " ")
    for source, target in options.replacements:
        if name == source:
            name = target
    return name


@dataclass(frozen=True)
class Label:
    name: str
    category: str  # rating, general, character, copyright, meta, model, quality, artist


@dataclass(frozen=True)
class Labels:
    by_output: tuple[Label | None, ...]  # one per model output; None: an output with no usable label
    json_layout: bool

    def __len__(self) -> int:
        return len(self.by_output)


def read_labels(files: ModelFiles, options: LabelOptions) -> Labels:
    path = files.labels
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise TaggerError(f"{path}: cannot be read ({e})") from None
    skipped: dict[str, int] = {}
    if not files.json_layout:
        rows = list(csv.reader(text.splitlines()))
        if not rows or rows[0][:3] != ["tag_id", "name", "category"]:
            raise TaggerError(f"{path}: expected SmilingWolf's columns tag_id,name,category[,count], found "
                              f"{','.join(rows[0]) if rows else 'an empty file'}")
        labels = []
        for number, row in enumerate(rows[1:], start=2):
            if len(row) < 3:
                raise TaggerError(f"{path}: line {number} has {len(row)} column(s), expected tag_id,name,category")
            category = CSV_CATEGORIES.get(row[2].strip())
            if category is None:
                skipped[row[2]] = skipped.get(row[2], 0) + 1
            labels.append(Label(rewrite_name(row[1], category, options), category) if category else None)
    else:
        try:
            mapping = json.loads(text)
            entries = {int(k): (v["tag"], v["category"]) for k, v in mapping.items()}
        except (json.JSONDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise TaggerError(f"{path}: expected {{id: {{\"tag\": ..., \"category\": ...}}}} ({e})") from None
        labels = [None] * (max(entries) + 1 if entries else 0)
        for index, (name, category_name) in entries.items():
            category = JSON_CATEGORIES.get(category_name)
            if category is None:
                raise TaggerError(f"{path}: tag {name!r} has category {category_name!r}; expected one of "
                                  f"{', '.join(JSON_CATEGORIES)}")
            labels[index] = Label(rewrite_name(name, category, options), category)
    for category, count in skipped.items():
        logger.warning("%s: %d tag(s) of category %s (not rating 9, general 0 or character 4) are never output",
                       path, count, category)
    return Labels(tuple(labels), files.json_layout)


# ----------------------------------------------------------------------------------------------------------
# Images


def model_input(image: Image.Image, size: int, *, json_layout: bool) -> np.ndarray:
    """One RGB image (transparency already on white) -> the model's input: [size, size, 3] BGR float 0..255, or
    [3, size, size] BGR in -1..1 for the json layout."""
    width, height = image.size
    side = max(width, height)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    if side != size:
        square = square.resize((size, size), Image.Resampling.BOX if side >= size else Image.Resampling.LANCZOS)
    pixels = np.asarray(square, dtype=np.float32)[:, :, ::-1]  # RGB -> BGR
    if json_layout:
        return np.ascontiguousarray(pixels.transpose(2, 0, 1)) / np.float32(127.5) - np.float32(1.0)
    return np.ascontiguousarray(pixels)


def prepare_image(path: Path, size: int, json_layout: bool):
    """(model input, (width, height)) of one image file, or (None, message) if it cannot be read. A module-level
    function, so that worker processes can run it."""
    from library.images import ImageError, load_image

    try:
        image = load_image(path).rgb  # EXIF rotation applied, transparency on white (as kohya composites it)
    except ImageError as e:
        return None, str(e)
    return model_input(image, size, json_layout=json_layout), image.size


# ----------------------------------------------------------------------------------------------------------
# Choosing the tags


@dataclass(frozen=True)
class TagOptions:
    thresh: float = 0.35  # --thresh, the default of the others (and, json layout, part of the lowest: kohya)
    general_threshold: float = 0.35
    character_threshold: float = 0.35
    other_thresholds: dict[str, float] = field(default_factory=dict)  # copyright / meta / model / artist
    undesired_tags: frozenset[str] = frozenset()
    always_first_tags: tuple[str, ...] = ()
    character_tags_first: bool = False
    use_rating_tags: bool = False
    use_rating_tags_as_last_tag: bool = False
    use_quality_tags: bool = False
    use_quality_tags_as_last_tag: bool = False


def split_tag_list(text: str | None, separator: str) -> list[str]:
    """kohya's --undesired_tags / --always_first_tags: split at the separator without its spaces, names stripped."""
    if not text:
        return []
    return [t.strip() for t in text.split(separator.strip() or separator) if t.strip()]


def choose_tags(probs: np.ndarray, labels: Labels, options: TagOptions) -> list[str]:
    """The image's tags in output order, by kohya's rules for the layout (see the script's documentation)."""
    chosen = _choose_json(probs, labels, options) if labels.json_layout else _choose_csv(probs, labels, options)
    # Each always-first tag present moves to the front in turn, so the last one listed ends up first (kohya).
    for tag in options.always_first_tags:
        if tag in chosen:
            chosen.remove(tag)
            chosen.insert(0, tag)
    return chosen


def _choose_csv(probs: np.ndarray, labels: Labels, options: TagOptions) -> list[str]:
    chosen: list[str] = []
    ratings: list[tuple[float, str]] = []
    for label, p in zip(labels.by_output, probs.tolist()):
        if label is None:
            continue
        if label.category == "rating":
            ratings.append((p, label.name))
        elif label.name in options.undesired_tags:
            continue
        elif label.category == "general" and p >= options.general_threshold:
            chosen.append(label.name)
        elif label.category == "character" and p >= options.character_threshold:
            # kohya inserts each character tag at the front, so several come out in reverse label order
            chosen.insert(0, label.name) if options.character_tags_first else chosen.append(label.name)
    if (options.use_rating_tags or options.use_rating_tags_as_last_tag) and ratings:
        rating = max(ratings, key=lambda r: r[0])[1]  # argmax: the first of equal maxima
        if rating not in options.undesired_tags:
            chosen.insert(0, rating) if options.use_rating_tags else chosen.append(rating)
    return chosen


def _choose_json(logits: np.ndarray, labels: Labels, options: TagOptions) -> list[str]:
    probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    thresholds = {"general": options.general_threshold, "character": options.character_threshold,
                  **options.other_thresholds}
    lowest = min(options.thresh, *thresholds.values())
    tagged: list[tuple[float, str]] = []
    characters: list[tuple[float, str]] = []
    rating = quality = None
    for label, p in zip(labels.by_output, probs.tolist()):
        # kohya only looks at outputs over the lowest threshold, the rating and quality labels included
        if label is None or p < lowest or label.name in options.undesired_tags:
            continue
        if label.category in ("rating", "quality"):
            best = rating if label.category == "rating" else quality
            if best is None or p > best[0]:
                if label.category == "rating":
                    rating = (p, label.name)
                else:
                    quality = (p, label.name)
        elif p >= thresholds.get(label.category, math.inf):
            (characters if label.category == "character" and options.character_tags_first else tagged).append(
                (p, label.name))
    # by probability, highest first (a stable sort: ties keep the label order)
    chosen = [name for _, name in sorted(characters, key=lambda t: -t[0])] + \
             [name for _, name in sorted(tagged, key=lambda t: -t[0])]
    if quality is not None:
        if options.use_quality_tags_as_last_tag:
            chosen.append(quality[1])
        elif options.use_quality_tags:
            chosen.insert(0, quality[1])
    if rating is not None:
        if options.use_rating_tags_as_last_tag:
            chosen.append(rating[1])
        elif options.use_rating_tags:
            chosen.insert(0, rating[1])
    return chosen


def merge_with_existing(existing: str, tags: list[str], separator: str) -> list[str]:
    """--append_tags: the file's tags, then the new ones it lacks (kohya)."""
    old = [t.strip() for t in existing.strip("\n").split(separator.strip() or separator) if t.strip()]
    return old + [t for t in tags if t not in old]
