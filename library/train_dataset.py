"""The training dataset: one item per call, every random choice a function of (seed, epoch, step, index).

Images are expanded by their repeats into *items*; each item has a bucket and a crop plan (buckets.py). The
bucket batch sampler groups items of one bucket; `EpochBatches` turns its batches into `SampleKey`s that carry
the epoch and the optimizer step, so that `__getitem__` can seed caption shuffling, flips and random crops from
the key alone. A resumed run therefore sees exactly the samples the uninterrupted run saw, and DataLoader workers
need no shared state.

Latents come from the `LatentCache` when caching is on (computed before training), otherwise the VAE encodes
the pixels in the training step.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from library.buckets import (BucketAssigner, BucketBatchSampler, CropPlan, ImageTooSmallError, apply_plan_to_image,
                             plan_resize_and_crop, resample_filter)
from library.captions import process_caption
from library.dataset_sources import ConditioningUse, DatasetError, ImageRecord
from library.extra_inputs import ConditionImages
from library.images import load_image
from library.text_conditioning import SizeConditioning

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleKey:
    epoch: int  # 1-based, as kohya counts for caption dropout
    step: int  # optimizer step at which the sample is used (token warmup)
    index: int  # item index
    slot: int = 0  # position in the global (all-process) batch: seeds the sample's noise


@dataclass(frozen=True)
class Item:
    record: ImageRecord
    bucket: tuple[int, int]
    loss_weight: float
    group: int = 0  # which dataset group ([[datasets]] entry) the item belongs to
    validation: bool = False  # held out: never trained on, only the validation loss reads it

    @property
    def cache_id(self) -> tuple[str, int]:
        # The same image may appear in several groups at different resolutions (multi-resolution training).
        return (str(self.record.path), self.group)


@dataclass(frozen=True)
class DatasetGroup:
    """One kohya `[[datasets]]` entry: its images (with repeats), bucketing and batch size."""

    records_with_repeats: list[tuple[ImageRecord, int]]
    assigner: BucketAssigner
    batch_size: int = 1
    validation: list[ImageRecord] = field(default_factory=list)  # held out for the validation loss (once each)


def _rng(seed: int, *parts: object) -> random.Random:
    # String seeding is stable across processes and Python runs (hash() of a tuple is not).
    return random.Random(":".join(str(p) for p in (seed, *parts)))


def pixels_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor [3, H, W] in [-1, 1] (the VAE's input range)."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def assign_bucket(assigner: BucketAssigner, record: ImageRecord):
    """The record's bucket choice; an image too small for any bucket is an error naming the file."""
    try:
        return assigner.assign(record.size)
    except ImageTooSmallError as e:
        advice = ("; remove or enlarge the image, or train without --bucket_no_upscale (small images are then "
                  "upscaled to a bucket)" if assigner.config.bucket_no_upscale else "")
        raise ImageTooSmallError(f"{record.path}: {e}{advice}") from None


class TrainingDataset(torch.utils.data.Dataset):
    def __init__(self, groups: list[DatasetGroup], *, seed: int, prior_loss_weight: float = 1.0,
                 max_train_steps: int = 0, conditioning_use: ConditioningUse = ConditioningUse.LOSS_MASK,
                 condition: ConditionImages | None = None):
        """`condition`: what a model with extra U-Net inputs gets from each sample (extra_inputs.py); the subsets'
        conditioning images are then those inputs."""
        self.seed = seed
        self.condition = condition
        self.conditioning_use = ConditioningUse.UNET_INPUT if condition is not None else conditioning_use
        self.groups = groups
        self.max_train_steps = max_train_steps
        self.items: list[Item] = []
        self._choices = {}
        for g, group in enumerate(groups):
            for record, repeats in group.records_with_repeats:
                choice = assign_bucket(group.assigner, record)
                weight = prior_loss_weight if record.subset.is_reg else 1.0
                item = Item(record, choice.bucket, weight, g)
                self._choices[item.cache_id] = choice
                self.items += [item] * repeats
            # Held-out images are items too (the latent and text-encoder caches then cover them), but no training
            # batch takes them (EpochBatches); validation.py batches them.
            for record in group.validation:
                choice = assign_bucket(group.assigner, record)
                item = Item(record, choice.bucket, 1.0, g, validation=True)
                self._choices[item.cache_id] = choice
                self.items.append(item)
        if condition is not None and condition.required:
            lacking = sorted({str(item.record.subset.image_dir) for item in self.items if item.record.conditioning is None})
            if lacking:
                raise DatasetError(f"{', '.join(lacking)}: this model takes a {condition.kind.value} with every image; "
                                   "give conditioning_data_dir (--conditioning_data_dir, or the key in the dataset "
                                   f"config) with one same-stem {condition.kind.value} per image")
        if condition is not None:
            check_condition_images((item.record for item in self.items), condition)
        self.latent_cache = None  # set by LatentCache.build
        # A recipe's last word on each caption (textual inversion: templates, token expansion), given its own
        # seeded random stream: (processed caption, rng) -> caption.
        self.caption_rewrite: Callable[[str, random.Random], str] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def plan(self, item: Item, rng: random.Random | None) -> CropPlan:
        return plan_resize_and_crop(item.record.size, self._choices[item.cache_id],
                                    random_crop=item.record.subset.random_crop, rng=rng)

    def sample_plan(self, item: Item, key: SampleKey | None) -> CropPlan:
        """The resize and crop of one sample: a random crop is drawn from the sample's own stream, so the photo,
        its mask, its conditioning image and its size conditioning all get the same one."""
        random_crop = item.record.subset.random_crop and key is not None
        return self.plan(item, _rng(self.seed, "crop", key.epoch, key.index) if random_crop else None)

    def mask_source(self, item: Item) -> Path | None:
        """The image whose R channel is the item's loss mask (--masked_loss), if any."""
        return item.record.conditioning if self.conditioning_use is ConditioningUse.LOSS_MASK else None

    def wants_mask(self, item: Item) -> bool:
        return item.record.subset.alpha_mask or self.mask_source(item) is not None

    def flips(self, item: Item, key: SampleKey) -> bool:
        return item.record.subset.flip_aug and _rng(self.seed, "flip", key.epoch, key.index).random() < 0.5

    def __getitem__(self, key: SampleKey) -> dict:
        item = self.items[key.index]
        subset = item.record.subset
        flip = self.flips(item, key)
        out = {"loss_weight": item.loss_weight, "path": str(item.record.path), "slot": key.slot,
               "size": size_conditioning(self.sample_plan(item, key), flip)}
        if self.latent_cache is not None:
            out["latents"] = self.latent_cache.get(item, flip)
            mask = self.latent_cache.get_mask(item, flip)
        else:
            out["pixels"], mask = self.load_pixels(item, key, flip)
        if self.wants_mask(item):
            out["mask"] = mask if mask is not None else torch.ones(1, *item.bucket[::-1])
        if self.conditioning_use is ConditioningUse.CONTROL and item.record.conditioning is not None:
            out["control"] = self.load_control(item, key, flip)
        if self.condition is not None:
            out["condition"] = self.load_condition(item, key, flip)
            if self.condition.needs_pixels and "pixels" not in out:  # inpainting: the masked photo is encoded
                out["pixels"], _ = self.load_pixels(item, key, flip)
        rng = _rng(self.seed, "caption", key.epoch, key.index)
        out["caption"] = process_caption(item.record.caption, subset.caption, rng=rng, epoch=key.epoch,
                                         step=key.step, max_train_steps=self.max_train_steps)
        if self.caption_rewrite is not None:
            out["caption"] = self.caption_rewrite(out["caption"], _rng(self.seed, "rewrite", key.epoch, key.index))
        return out

    def fixed_caption(self, item: Item) -> str:
        """The caption an item trains with when its subset's caption options do not change it from step to step
        (what --cache_text_encoder_outputs needs; `captions.per_step_caption_options` says when they do)."""
        caption = process_caption(item.record.caption, item.record.subset.caption, rng=random.Random(0), epoch=1,
                                  step=0, max_train_steps=self.max_train_steps)
        if self.caption_rewrite is not None:
            caption = self.caption_rewrite(caption, random.Random(0))
        return caption

    def load_pixels(self, item: Item, key: SampleKey | None, flip: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pixels [3, H, W] of the item's bucket size (and its alpha mask [1, H, W] through the same crop plan)."""
        subset = item.record.subset
        plan = self.sample_plan(item, key)
        loaded = load_image(item.record.path, want_alpha=subset.alpha_mask)
        image = apply_plan_to_image(loaded.rgb, plan, resample=resample_filter(subset.resize_interpolation))
        if subset.color_aug and key is not None:
            image = color_augment(image, _rng(self.seed, "color", key.epoch, key.index))
        mask = None
        if loaded.alpha is not None:
            alpha = Image.fromarray((loaded.alpha * 255).round().astype(np.uint8), "L")
            mask = torch.from_numpy(np.asarray(apply_plan_to_image(alpha, plan), dtype=np.float32) / 255.0)[None]
        if self.mask_source(item) is not None:
            # --masked_loss: the mask is the R channel of the same-stem conditioning image, through the same crop
            # plan as the photo (kohya stretches it to the bucket instead, which misaligns it).
            cropped = self._companion(item, plan).getchannel("R")
            mask = torch.from_numpy(np.asarray(cropped, dtype=np.float32) / 255.0)[None]
        pixels = pixels_to_tensor(image)
        if flip:
            pixels = pixels.flip(-1)
            mask = mask.flip(-1) if mask is not None else None
        return pixels, mask

    def load_control(self, item: Item, key: SampleKey | None, flip: bool) -> torch.Tensor:
        """The ControlNet conditioning image [3, H, W] in 0..1 (not normalised to -1..1: ControlNet takes it so),
        through exactly the photo's resize, crop and flip (the same plan, from the same random stream)."""
        array = np.asarray(self._companion(item, self.sample_plan(item, key)), dtype=np.float32) / 255.0
        control = torch.from_numpy(array).permute(2, 0, 1).contiguous()
        return control.flip(-1) if flip else control

    def load_condition(self, item: Item, key: SampleKey | None, flip: bool) -> torch.Tensor:
        """The model's extra input for the sample [C, H, W] (extra_inputs.ConditionImages.load), through the photo's
        resize, crop and flip; a synthetic inpainting mask comes from the sample's own random stream."""
        epoch, index = (key.epoch, key.index) if key is not None else (0, 0)
        return self.condition.load(item.record.conditioning, self.sample_plan(item, key), flip,
                                   _rng(self.seed, "inpaint-mask", epoch, index),
                                   resample=resample_filter(item.record.subset.resize_interpolation))

    def _companion(self, item: Item, plan: CropPlan) -> Image.Image:
        companion = load_image(item.record.conditioning).rgb
        resample = resample_filter(item.record.subset.resize_interpolation)  # the photo's filter too
        try:
            return apply_plan_to_image(companion, plan, resample=resample)
        except ValueError as e:
            raise ValueError(f"{item.record.conditioning}: {e} ({item.record.path.name})") from None


def check_condition_images(records, condition: ConditionImages) -> None:
    """Every conditioning image fits its photo (aspect ratio; channel count for condition channels), checked from the
    headers before training, so a wrong mask or depth map is named at once, not at the step that loads it."""
    wrong = [problem for record in dict.fromkeys(records) if record.conditioning is not None
             and (problem := condition.header_problem(record.conditioning, record.size))]
    if wrong:
        raise DatasetError(f"{len(wrong)} conditioning image(s) do not fit their images: {'; '.join(wrong[:5])}"
                           f"{' ...' if len(wrong) > 5 else ''}. Give each image its own {condition.kind.value}, at "
                           "its size or scaled with it")


def describe_samples(dataset: "TrainingDataset", batches: "EpochBatches", limit: int = 20) -> list[str]:
    """--debug_dataset: what the first batches of epoch 1 hold (image, bucket, crop, flip, processed caption).
    Each sample is loaded as training would load it, so a bad image shows up here too."""
    lines = []
    for b, batch in enumerate(batches.batches(1)):
        for index, slot in batch:
            if len(lines) >= limit:
                return lines
            item = dataset.items[index]
            key = SampleKey(1, b, index, slot)
            plan = dataset.plan(item, None)
            caption = dataset[key]["caption"]
            lines.append(f"batch {b} item {index}: {item.record.path.name} {item.record.size[0]}x"
                         f"{item.record.size[1]} -> bucket {item.bucket[0]}x{item.bucket[1]} (resized "
                         f"{plan.resized_size[0]}x{plan.resized_size[1]}, crop {plan.crop_left},{plan.crop_top}) "
                         f"flip={dataset.flips(item, key)} loss_weight={item.loss_weight}\n    caption: {caption!r}")
    return lines


def color_augment(image: Image.Image, rng: random.Random) -> Image.Image:
    """kohya's --color_aug: with probability 1/3, either shift the hue by up to +-8 (OpenCV's 0..180 hue scale,
    i.e. +-16 degrees) or apply a gamma in [0.95, 1.05], each half of the time. The gamma is applied to values in
    0..1 (kohya raises 0..255 values to the power, which clips the highlights: a bug we do not copy)."""
    if rng.random() > 1 / 3:
        return image
    if rng.random() < 0.5:
        shift = round(rng.uniform(-8, 8) / 180 * 256)  # PIL's hue channel runs 0..255
        hsv = np.asarray(image.convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + shift) % 256
        return Image.fromarray(hsv, "HSV").convert("RGB")
    gamma = rng.uniform(0.95, 1.05)
    values = np.asarray(image, dtype=np.float32) / 255.0
    return Image.fromarray(np.clip(np.round(values ** gamma * 255.0), 0, 255).astype(np.uint8), "RGB")


def size_conditioning(plan: CropPlan, flip: bool) -> SizeConditioning:
    """SDXL's size/crop conditioning of a sample: the image's original size, the top-left corner of the crop in the
    resized image, and the bucket; with a horizontal flip the crop's left edge is measured in the flipped image
    (kohya does the same), so the ids describe the pixels the model actually sees."""
    (width, height), (resized_w, _), (bucket_w, bucket_h) = plan.source_size, plan.resized_size, plan.bucket
    left = resized_w - plan.crop_left - bucket_w if flip else plan.crop_left
    return SizeConditioning(original_size=(height, width), crop_top_left=(plan.crop_top, left),
                            target_size=(bucket_h, bucket_w))


def collate(samples: list[dict]) -> dict:
    batch = {"caption": [s["caption"] for s in samples], "path": [s["path"] for s in samples],
             "slot": [s["slot"] for s in samples], "sizes": [s["size"] for s in samples],
             "loss_weight": torch.tensor([s["loss_weight"] for s in samples], dtype=torch.float32)}
    for key in ("latents", "pixels", "mask", "control", "condition"):
        if key in samples[0]:
            batch[key] = torch.stack([s[key] for s in samples])
    return batch


class EpochBatches:
    """One process's share of each global batch, as (item index, slot) pairs: a pure function of (seed, epoch),
    so training can resume at any step.

    Each dataset group has its own bucket sampler making global batches of `batch_size * num_processes` items; the
    groups' batches are interleaved in a seeded order. Process i takes items [i*batch_size, (i+1)*batch_size) of
    each global batch. The slot (an item's position in its global batch) seeds the item's noise, so N processes
    with batch B draw exactly what one process with batch N*B draws. When a bucket's last global batch is too short
    to give every process an item, a process without one repeats the batch's last item (its gradient then counts
    twice in that step), so all processes run the same number of steps."""

    def __init__(self, dataset: TrainingDataset, seed: int, *, num_processes: int = 1, process_index: int = 0):
        self.seed, self.num_processes, self.process_index = seed, num_processes, process_index
        self.samplers = []
        for g, group in enumerate(dataset.groups):
            indices = [i for i, item in enumerate(dataset.items) if item.group == g and not item.validation]
            sampler = BucketBatchSampler([dataset.items[i].bucket for i in indices],
                                         group.batch_size * num_processes, seed + g)
            self.samplers.append((indices, group.batch_size, sampler))

    def batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        global_batches = []
        for indices, batch_size, sampler in self.samplers:
            global_batches += [([indices[i] for i in batch], batch_size) for batch in sampler.batches(epoch)]
        if len(self.samplers) > 1:
            _rng(self.seed, "group-order", epoch).shuffle(global_batches)
        out = []
        for global_batch, batch_size in global_batches:
            start = self.process_index * batch_size
            part = list(enumerate(global_batch))[start:start + batch_size]
            if not part:
                part = [(len(global_batch) - 1, global_batch[-1])]
            out.append([(index, slot) for slot, index in part])
        return out

    def __len__(self) -> int:
        return sum(sampler.num_batches() for _, _, sampler in self.samplers)


def file_fingerprint(path) -> str:
    """Identity of an image file's content for cache keys: size + mtime (cheap; an edit changes them)."""
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def tensor_fingerprint(module: torch.nn.Module) -> str:
    """A digest of a module's weights, so a cache made with another VAE is never reused."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
