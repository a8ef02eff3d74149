"""kohya's dataset config (`--dataset_config`, TOML or JSON) and the command-line datasets, as one blueprint.

Layout: `[general]` -> `[[datasets]]` -> `[[datasets.subsets]]`. An option is looked up subset -> dataset ->
general -> command line -> default. A dataset whose subsets all have `metadata_file` is a fine-tune dataset, one
where none has it a DreamBooth dataset; mixing is an error. Unknown keys, options at the wrong level and wrong
types are errors naming the key and where it is, e.g. `datasets[0].subsets[1].keep_tokens`.

Without a dataset config the command-line flags make one dataset: DreamBooth folders (`--train_data_dir` /
`--reg_data_dir`), a kohya metadata file (`--in_json` with `--train_data_dir`), or a diffusers imagefolder
(`--train_data_dir` holding `metadata.jsonl` / `metadata.csv`).
"""

from __future__ import annotations

import json
import logging
import random
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path

from library.buckets import BucketAssigner, BucketConfig, bucket_report, format_bucket_table, resample_filter
from library.captions import CaptionOptions, caption_joiner
from library.dataset_sources import (ConditioningUse, DatasetError, ImageRecord, Subset, balance_regularization,
                                     dreambooth_subsets, imagefolder_metadata, scan_metadata_subset, scan_subset)
from library.train_dataset import DatasetGroup, assign_bucket

logger = logging.getLogger(__name__)

# Options by the levels they may appear at (kohya's schema for the features implemented here).
DATASET_LEVEL = {"batch_size": int, "resolution": (int, list), "enable_bucket": bool, "bucket_no_upscale": bool,
                 "min_bucket_reso": int, "max_bucket_reso": int, "bucket_reso_steps": int,
                 "validation_split": (float, int), "validation_seed": int}
CAPTION_OPTIONS = {f.name: f.type for f in fields(CaptionOptions)}
SUBSET_ANY_LEVEL = {"num_repeats": int, "caption_extension": str, "class_tokens": str, "flip_aug": bool,
                    "color_aug": bool, "random_crop": bool, "resize_interpolation": str, "cache_info": bool,
                    **{k: object for k in CAPTION_OPTIONS}}
SUBSET_ONLY = {"image_dir": str, "is_reg": bool, "alpha_mask": bool, "metadata_file": str, "caption_column": str,
               "conditioning_data_dir": str, "image_column": str, "conditioning_image_column": str}
# kohya keys users may have that this suite does not implement yet: refused by name, never silently ignored.
NOT_YET = {"network_multiplier", "face_crop_aug_range", "custom_attributes"}


class DatasetConfigError(ValueError):
    pass


@dataclass(frozen=True)
class DatasetSpec:
    subsets: tuple[Subset, ...]
    batch_size: int
    buckets: BucketConfig
    validation_split: float = 0.0  # share of each training subset's images held out for the validation loss
    validation_seed: int | None = None  # the hold-out's shuffle (None: the training seed)


def _check(where: str, key: str, value, expected) -> None:
    if expected is object:
        return
    types = expected if isinstance(expected, tuple) else (expected,)
    ok = any(isinstance(value, t) and not (t is int and isinstance(value, bool)) for t in types)
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        names = " or ".join(t.__name__ for t in types)
        raise DatasetConfigError(f"{where}.{key} = {value!r}: expected {names}")


def _validated(table: dict, where: str, allowed: dict) -> dict:
    if not isinstance(table, dict):
        raise DatasetConfigError(f"{where}: expected a table of options")
    for key, value in table.items():
        if key in ("datasets", "subsets"):
            continue
        if key not in allowed:
            level_hint = (" (it belongs in [[datasets]] or [general])" if key in DATASET_LEVEL else
                          " (it belongs in [[datasets.subsets]])" if key in SUBSET_ONLY else "")
            raise DatasetConfigError(f"{where}.{key}: unknown option{level_hint}" if key not in NOT_YET else
                                     f"{where}.{key}: not implemented in this suite yet; remove it")
        _check(where, key, value, allowed[key])
    return {k: v for k, v in table.items() if k not in ("datasets", "subsets")}


def load_dataset_config(path: Path) -> dict:
    if not path.is_file():
        raise DatasetConfigError(f"--dataset_config {path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise DatasetConfigError(f"--dataset_config {path}: invalid {path.suffix[1:].upper() or 'TOML'}: {e}") from None
    unknown = sorted(set(data) - {"general", "datasets"})
    if unknown:
        raise DatasetConfigError(f"--dataset_config {path}: unknown top-level key(s) {', '.join(unknown)} "
                                 "(expected [general] and [[datasets]])")
    if not data.get("datasets"):
        raise DatasetConfigError(f"--dataset_config {path}: no [[datasets]]")
    return data


def specs_from_config(data: dict, cli: dict, base: Path) -> list[DatasetSpec]:
    """Dataset specs from a loaded dataset config; `cli` holds the command-line values (kohya names) used where the
    file says nothing. Relative paths are relative to the config file's folder."""
    general = _validated(data.get("general", {}), "general", {**DATASET_LEVEL, **SUBSET_ANY_LEVEL})
    specs = []
    for d, dataset in enumerate(data["datasets"]):
        where = f"datasets[{d}]"
        level = _validated(dataset, where, {**DATASET_LEVEL, **SUBSET_ANY_LEVEL})
        subsets_data = dataset.get("subsets") or []
        if not subsets_data:
            raise DatasetConfigError(f"{where}: no [[datasets.subsets]]")
        subsets = []
        for s, subset in enumerate(subsets_data):
            own = _validated(subset, f"{where}.subsets[{s}]", {**SUBSET_ANY_LEVEL, **SUBSET_ONLY})
            merged = {**cli, **general, **level, **own}
            subsets.append(_subset(merged, f"{where}.subsets[{s}]", base))
        kinds = {sub.metadata_file is not None for sub in subsets}
        if len(kinds) > 1:
            raise DatasetConfigError(f"{where}: mixes fine-tune subsets (metadata_file) and DreamBooth subsets "
                                     "(image_dir only); put them in separate [[datasets]]")
        merged = {**cli, **general, **level}
        specs.append(DatasetSpec(tuple(subsets), merged["batch_size"], _buckets(merged, where),
                                 *_validation_split(merged, where)))
    return specs


def _subset(options: dict, where: str, base: Path) -> Subset:
    try:
        resample_filter(options.get("resize_interpolation"))
    except ValueError as e:  # on the command line the option is the flag
        raise DatasetConfigError(f"--{e}" if where == "command line" else f"{where}.{e}") from None
    caption_values = {k: options[k] for k in CAPTION_OPTIONS if k in options}
    try:
        caption = CaptionOptions(**caption_values)
    except (ValueError, TypeError) as e:
        raise DatasetConfigError(f"{where}: {e}") from None
    image_dir = Path(options["image_dir"]) if options.get("image_dir") else None
    metadata = Path(options["metadata_file"]) if options.get("metadata_file") else None
    if image_dir is not None and not image_dir.is_absolute():
        image_dir = base / image_dir
    if metadata is not None and not metadata.is_absolute():
        metadata = base / metadata
    if image_dir is None and metadata is None:
        raise DatasetConfigError(f"{where}: needs image_dir (DreamBooth) or metadata_file (fine-tune)")
    if options.get("is_reg") and metadata is not None:
        raise DatasetConfigError(f"{where}: is_reg applies to DreamBooth subsets, not metadata_file subsets")
    if options.get("num_repeats", 1) < 1:
        raise DatasetConfigError(f"{where}.num_repeats must be at least 1")
    extension = options.get("caption_extension", ".caption")
    return Subset(image_dir=image_dir, num_repeats=options.get("num_repeats", 1),
                  class_tokens=options.get("class_tokens"), is_reg=bool(options.get("is_reg", False)),
                  caption_extension=extension if extension.startswith(".") else "." + extension, caption=caption,
                  flip_aug=bool(options.get("flip_aug", False)), color_aug=bool(options.get("color_aug", False)),
                  random_crop=bool(options.get("random_crop", False)), cache_info=bool(options.get("cache_info")),
                  resize_interpolation=options.get("resize_interpolation"),
                  alpha_mask=bool(options.get("alpha_mask", False)), metadata_file=metadata,
                  caption_column=options.get("caption_column", "text"),
                  image_column=options.get("image_column"),
                  conditioning_column=options.get("conditioning_image_column"),
                  conditioning_dir=_path(options.get("conditioning_data_dir"), base))


def _path(value: str | None, base: Path) -> Path | None:
    if not value:
        return None
    path = Path(value)
    return path if path.is_absolute() else base / path


def _buckets(options: dict, where: str) -> BucketConfig:
    resolution = options["resolution"]
    if isinstance(resolution, int):
        resolution = (resolution, resolution)
    if not (isinstance(resolution, (list, tuple)) and len(resolution) == 2):
        raise DatasetConfigError(f"{where}.resolution: expected a size or [width, height]")
    return BucketConfig(resolution=tuple(resolution), enable_bucket=bool(options.get("enable_bucket", False)),
                        min_bucket_reso=options.get("min_bucket_reso", 256),
                        max_bucket_reso=options.get("max_bucket_reso", 1024),
                        bucket_reso_steps=options.get("bucket_reso_steps", 64),
                        bucket_no_upscale=bool(options.get("bucket_no_upscale", False)))


def specs_from_flags(cli: dict) -> list[DatasetSpec]:
    """The one dataset the command-line flags describe (no --dataset_config)."""
    if not cli.get("train_data_dir") and not cli.get("in_json"):
        raise DatasetConfigError("--train_data_dir is required (the parent of '<repeats>_<class>' image folders), "
                                 "or --dataset_config")
    template = _subset({**cli, "image_dir": cli.get("train_data_dir") or "."}, "command line", Path("."))
    train_dir = Path(cli["train_data_dir"]) if cli.get("train_data_dir") else None
    if cli.get("in_json"):
        subsets = [replace(template, image_dir=train_dir, metadata_file=Path(cli["in_json"]),
                           num_repeats=cli.get("dataset_repeats", 1))]
    elif train_dir is not None and imagefolder_metadata(train_dir):
        subsets = [replace(template, image_dir=train_dir, metadata_file=imagefolder_metadata(train_dir),
                           num_repeats=cli.get("dataset_repeats", 1))]
    else:
        subsets = dreambooth_subsets(train_dir, is_reg=False, template=template)
        if cli.get("reg_data_dir"):
            subsets += dreambooth_subsets(Path(cli["reg_data_dir"]), is_reg=True, template=template)
    return [DatasetSpec(tuple(subsets), cli["batch_size"], _buckets(cli, "command line"),
                        *_validation_split(cli, "command line"))]


def _validation_split(options: dict, where: str) -> tuple[float, int | None]:
    split = float(options.get("validation_split") or 0.0)
    if not 0.0 <= split < 1.0:
        name = "--validation_split" if where == "command line" else f"{where}.validation_split"
        raise DatasetConfigError(f"{name} {split}: the share of images held out for validation, from 0 (none) to "
                                 "below 1 (e.g. 0.1)")
    return split, options.get("validation_seed")


def build_groups(specs: list[DatasetSpec], *, family_step: int, seed: int = 0) -> tuple[list[DatasetGroup], dict]:
    """Scan every subset (image headers only) and make the dataset groups; also returns a summary for metadata.
    With a validation split, each training subset's held-out images go to their group's `validation` records
    (`seed`: the hold-out's shuffle when the dataset gives no validation_seed).

    Raises DatasetError listing every unreadable image at once."""
    groups, problems = [], []
    summary = {"num_train_images": 0, "num_reg_images": 0, "datasets": []}
    for d, spec in enumerate(specs):
        train: list[ImageRecord] = []
        reg: list[ImageRecord] = []
        held_out: list[ImageRecord] = []
        for subset in spec.subsets:
            if subset.metadata_file is not None:
                records, bad = scan_metadata_subset(subset, caption_joiner(subset.caption.caption_separator))
            else:
                records, bad = scan_subset(subset)
            problems += bad
            if spec.validation_split and not subset.is_reg:
                records, validation = split_validation(records, spec.validation_split,
                                                       seed if spec.validation_seed is None else spec.validation_seed)
                held_out += validation
            (reg if subset.is_reg else train).extend(records)
        if not train and not problems:
            raise DatasetError(f"dataset {d}: no training images (only regularisation images)")
        train_samples = sum(r.subset.num_repeats for r in train)
        reg_repeats = balance_regularization(train_samples, [r.subset.num_repeats for r in reg])
        if reg and 0 in reg_repeats:
            logger.warning("dataset %d: %d regularisation images are not used: there are more reg samples than "
                           "train samples", d, reg_repeats.count(0))
        records = [(r, r.subset.num_repeats) for r in train] + [(r, n) for r, n in zip(reg, reg_repeats) if n]
        for warning in spec.buckets.validate(family_step=family_step):
            logger.warning(warning)
        assigner = BucketAssigner(spec.buckets)
        for record, _ in records:
            assign_bucket(assigner, record)  # fail here, naming the file, rather than inside the bucket report
        for record in held_out:
            assign_bucket(assigner, record)
        groups.append(DatasetGroup(records, assigner, spec.batch_size, validation=held_out))
        if held_out:
            logger.info("dataset %d: %d image(s) held out for the validation loss (validation_split %g)", d,
                        len(held_out), spec.validation_split)
        if records:
            report = bucket_report(assigner, [(r.size, n) for r, n in records])
            logger.info("dataset %d: %d train images (%d samples with repeats), %d reg images, batch size %d; "
                        "buckets:\n%s", d, len(train), train_samples, len(reg), spec.batch_size,
                        format_bucket_table(report.rows, report.mean_aspect_error))
            summary["datasets"].append({"batch_size": spec.batch_size, "resolution": list(spec.buckets.resolution),
                                        "enable_bucket": spec.buckets.enable_bucket, "num_train_images": len(train),
                                        "num_reg_images": len(reg),
                                        "bucket_info": {f"{w}x{h}": n for (w, h), n in report.rows}})
        summary["num_train_images"] += len(train)
        summary["num_reg_images"] += len(reg)
        summary["num_validation_images"] = summary.get("num_validation_images", 0) + len(held_out)
    if problems:
        raise DatasetError("unreadable images (remove or fix them):\n  " + "\n  ".join(problems))
    return groups, summary


def build_training_dataset(cli: dict, dataset_config: Path | None, *, family_step: int, seed: int,
                           prior_loss_weight: float, max_train_steps: int,
                           conditioning_use: ConditioningUse = ConditioningUse.LOSS_MASK, condition=None):
    """The training dataset described by a dataset config (or, without one, by the command-line flags) and a
    summary for the metadata. `conditioning_use`: what the subsets' conditioning images are for; `condition`
    (extra_inputs.ConditionImages): a model's extra U-Net input, which they then are."""
    from library.train_dataset import TrainingDataset

    if dataset_config is not None:
        specs = specs_from_config(load_dataset_config(dataset_config), cli, dataset_config.parent)
    else:
        specs = specs_from_flags(cli)
    groups, summary = build_groups(specs, family_step=family_step, seed=seed)
    dataset = TrainingDataset(groups, seed=seed, prior_loss_weight=prior_loss_weight, max_train_steps=max_train_steps,
                              conditioning_use=conditioning_use, condition=condition)
    return dataset, summary


def split_validation(records: list[ImageRecord], split: float, seed: int) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """kohya's hold-out: the subset's images shuffled by `seed`, the last round(n * split) of them for validation
    (kohya's training part takes ceil(n * (1 - split)), which can share an image with the validation part; these
    two parts never do). A subset keeps at least one training image."""
    order = sorted(records, key=lambda r: str(r.path))
    random.Random(seed).shuffle(order)
    n_validation = min(round(len(order) * split), len(order) - 1)
    kept = set(map(id, order[:len(order) - n_validation]))
    return [r for r in records if id(r) in kept], order[len(order) - n_validation:]


def build_metadata_dataset(train_data_dir: Path, in_json: Path, buckets: BucketConfig, *, family_step: int,
                           flip_aug: bool = False, alpha_mask: bool = False):
    """The fine-tune dataset that `--train_data_dir train_data_dir --in_json in_json` with these bucket settings
    gives the trainer, built through the same path (`specs_from_flags`), so that a tool preparing its caches
    (finetune/prepare_buckets_latents.py) computes exactly the buckets, crops and cache keys training will."""
    from library.train_dataset import TrainingDataset

    cli = {"train_data_dir": str(train_data_dir), "in_json": str(in_json), "batch_size": 1,
           "resolution": tuple(buckets.resolution), "enable_bucket": buckets.enable_bucket,
           "min_bucket_reso": buckets.min_bucket_reso, "max_bucket_reso": buckets.max_bucket_reso,
           "bucket_reso_steps": buckets.bucket_reso_steps, "bucket_no_upscale": buckets.bucket_no_upscale,
           "flip_aug": flip_aug, "alpha_mask": alpha_mask}
    groups, _ = build_groups(specs_from_flags(cli), family_step=family_step)
    return TrainingDataset(groups, seed=0)
