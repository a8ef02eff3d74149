"""Aspect-ratio bucketing: the resolution ladder, bucket choice, resize/crop geometry and a seeded batch sampler.

Everything here is a pure function of its arguments (sizes are always `(width, height)` in pixels), so the same
numbers come out in the dataset, the latent cache and the tests. Behaviour follows kohya-ss/sd-scripts'
`BucketManager` / `make_bucket_resolutions`; deliberate differences are marked "Differs from kohya".
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import Iterable, Sequence

from PIL import Image

logger = logging.getLogger(__name__)

Size = tuple[int, int]  # (width, height)

LATENT_DOWNSCALE = 8  # SD's VAE maps each 8x8 pixel block to one latent cell


class ImageTooSmallError(ValueError):
    """An image has no positive size, or yields an empty bucket (a side shorter than one bucket step)."""


def make_bucket_resolutions(max_reso: Size, min_size: int = 256, max_size: int = 1024,
                            divisible: int = 64) -> list[Size]:
    """kohya's bucket ladder for target resolution `max_reso` = (W, H).

    With area A = W*H and step d = `divisible`:
    - add the square (s, s) with s = floor(sqrt(A) / d) * d (always, even outside [min_size, max_size]);
    - for every width w = min_size, min_size + d, ... <= max_size: h = min(max_size, floor(A / w / d) * d);
      when h >= min_size add both (w, h) and (h, w).
    Return the unique pairs sorted by (width, height). Every bucket has area <= A; capping h at `max_size`
    makes the extreme buckets smaller than A. Example: (512, 512), 256..1024, 64 gives 17 buckets from
    (256, 1024) to (1024, 256).
    """
    area = max_reso[0] * max_reso[1]
    square = math.isqrt(area) // divisible * divisible  # isqrt: exact floor, same value as floor(sqrt) here
    resos = {(square, square)}
    for width in range(min_size, max_size + 1, divisible):
        height = min(max_size, area // width // divisible * divisible)
        if height >= min_size:
            resos.update(((width, height), (height, width)))
    return sorted(resos)


def adjust_min_max_bucket_reso(resolution: Size, min_bucket_reso: int, max_bucket_reso: int,
                               steps: int) -> tuple[int, int]:
    """Round min down and max up to multiples of `steps` (logged), then check they bracket `resolution`."""
    new_min = min_bucket_reso - min_bucket_reso % steps
    new_max = max_bucket_reso + (-max_bucket_reso) % steps
    if new_min <= 0:  # kohya divides by zero building the ladder from a 0-wide bucket
        raise ValueError(f"--min_bucket_reso {min_bucket_reso} is below --bucket_reso_steps {steps} (it would round "
                         f"down to {new_min}); use at least {steps}, or smaller steps")
    for flag, old, new in (("--min_bucket_reso", min_bucket_reso, new_min),
                           ("--max_bucket_reso", max_bucket_reso, new_max)):
        if old != new:
            logger.warning("%s %d is not a multiple of --bucket_reso_steps %d; using %d", flag, old, steps, new)
    reso = f"{resolution[0]},{resolution[1]}"
    if new_min > min(resolution):
        raise ValueError(f"--min_bucket_reso {new_min} is larger than the shorter side of --resolution {reso}; "
                         "lower --min_bucket_reso or raise --resolution")
    if new_max < max(resolution):
        raise ValueError(f"--max_bucket_reso {new_max} is smaller than the longer side of --resolution {reso}; "
                         "raise --max_bucket_reso or lower --resolution")
    return new_min, new_max


@dataclass(frozen=True)
class BucketConfig:
    resolution: Size
    enable_bucket: bool = False
    min_bucket_reso: int = 256  # kohya's argparse defaults
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False

    def validate(self, *, family_step: int | None = 64) -> list[str]:
        """Raise ValueError (naming the flag) for settings that cannot work; return warnings for unusual ones.

        A side that is not a multiple of 8 cannot be encoded by the VAE without dropping pixels, so that is
        an error. Differs from kohya: kohya's SD scripts *assert* bucket_reso_steps % 64 == 0 (32 for SDXL);
        we only warn when it is not a multiple of `family_step` (ModelFamily.bucket_reso_step), because
        diffusers' UNet2DConditionModel accepts latents whose size is not a multiple of its total downscale
        (it forwards the upsample sizes), so such runs train; they are merely off the grid the base model saw.
        `family_step=None` skips that warning.
        """
        width, height = self.resolution
        if width <= 0 or height <= 0:
            raise ValueError(f"--resolution must be positive, got {width},{height}")
        warnings = []
        if not self.enable_bucket:  # kohya ignores min/max/steps without bucketing; the one bucket is (W, H)
            if width % LATENT_DOWNSCALE or height % LATENT_DOWNSCALE:
                raise ValueError(f"--resolution {width},{height}: both sides must be multiples of 8 "
                                 "(the VAE works on 8x8 pixel blocks) when --enable_bucket is off")
            if family_step and (width % family_step or height % family_step):
                warnings.append(f"--resolution {width},{height} is not a multiple of {family_step}, "
                                "the size this model family was trained on")
            return warnings
        steps = self.bucket_reso_steps
        if steps <= 0 or steps % LATENT_DOWNSCALE:
            raise ValueError(f"--bucket_reso_steps must be a positive multiple of 8 (the VAE works on 8x8 "
                             f"pixel blocks), got {steps}")
        if family_step and steps % family_step:
            warnings.append(f"--bucket_reso_steps {steps} is not a multiple of {family_step}: kohya refuses this "
                            "for this model family; the UNet will see latent sizes it was not trained on")
        if self.min_bucket_reso <= 0:
            raise ValueError(f"--min_bucket_reso must be positive, got {self.min_bucket_reso}")
        adjust_min_max_bucket_reso(self.resolution, self.min_bucket_reso, self.max_bucket_reso, steps)
        return warnings


@dataclass(frozen=True)
class BucketChoice:
    bucket: Size  # the training size; a multiple of the bucket step when bucketing
    resized_size: Size  # the image is resized to this (keeping aspect) and then cropped to `bucket`
    aspect_error: float  # bucket_ar - image_ar, signed as in kohya (the log reports the mean of |error|)


def cover_size(image_size: Size, bucket: Size) -> Size:
    """Smallest aspect-keeping size that covers `bucket`: fit the side that is relatively shorter."""
    (width, height), (bucket_w, bucket_h) = image_size, bucket
    scale = bucket_h / height if width / height > bucket_w / bucket_h else bucket_w / width
    # max(): float rounding in w*scale must never leave a one-pixel gap that the crop would have to pad
    return max(bucket_w, int(width * scale + 0.5)), max(bucket_h, int(height * scale + 0.5))


class BucketAssigner:
    """Assigns a bucket and a resized size to each image size under one BucketConfig."""

    def __init__(self, config: BucketConfig):
        config.validate(family_step=None)  # errors only; the config layer reports the warnings once
        self.config = config
        self.max_area = config.resolution[0] * config.resolution[1]
        if not config.enable_bucket:
            self.buckets: tuple[Size, ...] = (tuple(config.resolution),)
        elif config.bucket_no_upscale:
            # one bucket per distinct size; kohya ignores min/max_bucket_reso here too (and warns)
            logger.warning("--min_bucket_reso / --max_bucket_reso are ignored with --bucket_no_upscale")
            self.buckets = ()
        else:
            low, high = adjust_min_max_bucket_reso(config.resolution, config.min_bucket_reso,
                                                   config.max_bucket_reso, config.bucket_reso_steps)
            self.buckets = tuple(make_bucket_resolutions(config.resolution, low, high, config.bucket_reso_steps))
        self._bucket_set = set(self.buckets)
        self._aspects = [w / h for w, h in self.buckets]
        self._choices: dict[Size, BucketChoice] = {}  # datasets repeat sizes: 100k images have a few thousand

    def assign(self, image_size: Size) -> BucketChoice:
        size = tuple(image_size)
        if size not in self._choices:
            self._choices[size] = self._assign(size)
        return self._choices[size]

    def _assign(self, image_size: Size) -> BucketChoice:
        width, height = image_size
        if width <= 0 or height <= 0:  # kohya #1836: an unreadable size became a (-128, -128) bucket
            raise ImageTooSmallError(f"image size {width}x{height} is not positive (unreadable image or metadata?)")
        aspect = width / height
        if self.config.enable_bucket and self.config.bucket_no_upscale:
            resized = self._shrink_to_area(width, height)
            steps = self.config.bucket_reso_steps
            bucket = (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps)  # crop, never pad
            if min(bucket) <= 0:
                raise ImageTooSmallError(f"image {width}x{height} (resized {resized[0]}x{resized[1]}) has a side "
                                         f"shorter than --bucket_reso_steps {steps}: its bucket would be empty")
        else:
            # Without bucketing this is kohya's latent-caching path (cover (W, H), then crop). Differs from kohya:
            # its uncached path crops without resizing and asserts on larger images; both our paths are this one.
            # An exact bucket wins over an equally-shaped one (sizes pre-bucketed with no_upscale keep theirs).
            bucket = tuple(image_size) if tuple(image_size) in self._bucket_set else self._nearest_aspect(aspect)
            resized = cover_size(image_size, bucket)  # upscales images smaller than the bucket, as kohya does
        return BucketChoice(bucket, resized, bucket[0] / bucket[1] - aspect)

    def _nearest_aspect(self, aspect: float) -> Size:
        # area is ignored; on a tie the first bucket in sorted order wins (numpy argmin in kohya)
        best = min(range(len(self.buckets)), key=lambda i: abs(self._aspects[i] - aspect))
        return self.buckets[best]

    def _shrink_to_area(self, width: int, height: int) -> Size:
        """no_upscale: keep the size, or shrink a too-large image to the target area (kohya's rounding rule)."""
        if width * height <= self.max_area:
            return width, height
        aspect, steps = width / height, self.config.bucket_reso_steps
        exact_w = math.sqrt(self.max_area * aspect)
        exact_h = self.max_area / exact_w

        def to_steps(x: float) -> int:
            # kohya's round_to_steps rounds to an int and then FLOORS to the step, so a near-square 3072x3000
            # image at 1024^2 lands in (960, 960); upstream acknowledges this (PR #2352). Kept for bucket parity.
            x = int(x + 0.5)
            return x - x % steps

        # anchor the width or the height on the step grid; keep the one whose aspect drifts less
        w_anchor = to_steps(exact_w)
        h_of_w = to_steps(w_anchor / aspect)
        h_anchor = to_steps(exact_h)
        w_of_h = to_steps(h_anchor * aspect)
        error_w = abs(w_anchor / h_of_w - aspect) if h_of_w else math.inf  # kohya divides by zero here
        error_h = abs(w_of_h / h_anchor - aspect) if h_anchor else math.inf
        if error_w < error_h:
            return w_anchor, int(w_anchor / aspect + 0.5)
        return int(h_anchor * aspect + 0.5), h_anchor


@dataclass(frozen=True)
class CropPlan:
    """Resize to `resized_size`, then crop the `bucket`-sized box at (crop_left, crop_top)."""

    resized_size: Size
    crop_left: int
    crop_top: int
    bucket: Size
    source_size: Size  # the image the plan was made for (SDXL's original_size; checks companion images)


def plan_resize_and_crop(image_size: Size, choice: BucketChoice, *, random_crop: bool,
                         rng: random.Random | None) -> CropPlan:
    """The single place that decides geometry: image, mask and conditioning image all follow one plan."""
    (resized_w, resized_h), (bucket_w, bucket_h) = choice.resized_size, choice.bucket
    spare_w, spare_h = resized_w - bucket_w, resized_h - bucket_h
    if spare_w < 0 or spare_h < 0:
        raise ValueError(f"resized size {choice.resized_size} does not cover bucket {choice.bucket}")
    if random_crop and rng is None:
        raise ValueError("random_crop needs an explicit rng (a random.Random seeded by the caller)")
    # kohya draws only for a side with overflow, width first; centre crop rounds the offset down
    left = rng.randint(0, spare_w) if random_crop and spare_w else spare_w // 2
    top = rng.randint(0, spare_h) if random_crop and spare_h else spare_h // 2
    return CropPlan(choice.resized_size, left, top, choice.bucket, tuple(image_size))


# kohya's --resize_interpolation names (cv2's among them) -> PIL's filter. None: area averaging when shrinking,
# LANCZOS when enlarging (kohya's default).
RESIZE_INTERPOLATIONS = {"lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST,
                         "bilinear": Image.Resampling.BILINEAR, "linear": Image.Resampling.BILINEAR,
                         "bicubic": Image.Resampling.BICUBIC, "cubic": Image.Resampling.BICUBIC,
                         "area": Image.Resampling.BOX, "box": Image.Resampling.BOX}


def resample_filter(name: str | None) -> int | None:
    """The PIL filter of a --resize_interpolation name (None: the default rule); ValueError lists the names."""
    if name is None:
        return None
    try:
        return RESIZE_INTERPOLATIONS[name.lower()]
    except KeyError:
        raise ValueError(f"resize_interpolation {name!r}: use one of {', '.join(RESIZE_INTERPOLATIONS)}") from None


def apply_plan_to_image(image: Image.Image, plan: CropPlan, *, resample: int | None = None) -> Image.Image:
    """Resize `image` to plan.resized_size and crop the bucket box; returns exactly plan.bucket pixels.

    `image` may have another pixel size than the planned source (a half-resolution mask), but it must have
    the same aspect ratio: differs from kohya, which stretches masks and conditioning images straight to the
    bucket and so misaligns them with the cropped photo. Default resampling follows kohya: area averaging
    (PIL BOX, as cv2.INTER_AREA) when shrinking on both sides, LANCZOS otherwise. Pass NEAREST for label masks.
    """
    (src_w, src_h), (resized_w, resized_h) = image.size, plan.resized_size
    # resized_size is rounded to whole pixels, so its aspect may drift by ~1/short side; allow 1% beyond that
    drift = abs((src_w / src_h) / (resized_w / resized_h) - 1)
    if drift > 0.01 + 1 / min(resized_w, resized_h):
        raise ValueError(f"image of size {src_w}x{src_h} does not have the aspect ratio of {plan.source_size}, "
                         "the image this crop plan was made for; it would be misaligned")
    if image.size != plan.resized_size:
        if resample is None:
            shrinking = src_w >= resized_w and src_h >= resized_h
            resample = Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS
        image = image.resize(plan.resized_size, resample=resample)
    bucket_w, bucket_h = plan.bucket
    return image.crop((plan.crop_left, plan.crop_top, plan.crop_left + bucket_w, plan.crop_top + bucket_h))


class BucketBatchSampler:
    """Same-bucket batches whose order is a pure function of (seed, epoch).

    `buckets[i]` is the bucket of dataset item i (items already expanded by repeats). Each bucket is cut into
    batches of `batch_size`, the last one possibly partial (kohya); `drop_last` drops those partial batches
    (their items are then skipped for the epoch). With `shuffle`, items within each bucket and the batch order
    are shuffled by a random.Random seeded from (seed, epoch) alone. Differs from kohya, which reseeds the global
    `random` with seed+epoch but shuffles its bucket lists in place, so its epoch e depends on epochs before it;
    here any epoch can be recomputed directly, which is what exact resume needs. `batches(epoch)` is a list of
    index lists and can be handed to torch's DataLoader as `batch_sampler`.
    """

    def __init__(self, buckets: Sequence[Size], batch_size: int, seed: int, *, shuffle: bool = True,
                 drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        groups: dict[Size, list[int]] = {}
        for index, bucket in enumerate(buckets):
            groups.setdefault(tuple(bucket), []).append(index)
        self._groups = [groups[bucket] for bucket in sorted(groups)]  # sorted: independent of item order
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last

    def num_batches(self) -> int:
        if self.drop_last:
            return sum(len(group) // self.batch_size for group in self._groups)
        return sum(-(-len(group) // self.batch_size) for group in self._groups)

    __len__ = num_batches

    def batches(self, epoch: int) -> list[list[int]]:
        # A str seed is hashed with SHA-512 by random.Random: stable across runs, processes and PYTHONHASHSEED.
        rng = random.Random(f"bucket-batches:{self.seed}:{epoch}") if self.shuffle else None
        result = []
        for group in self._groups:
            items = list(group)
            if rng is not None:
                rng.shuffle(items)
            for start in range(0, len(items), self.batch_size):
                batch = items[start:start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    result.append(batch)
        if rng is not None:
            rng.shuffle(result)
        return result


def shard(batches: Sequence[list[int]], num_processes: int, process_index: int) -> list[list[int]]:
    """This process's share of one epoch's batches: global step s runs batches s*n .. s*n+n-1 on processes 0..n-1.

    So process i takes batches i, i+n, i+2n, ... When the count is not a multiple of n the list is padded by
    cycling from its start (accelerate's even_batches), so every process runs the same number of steps and the
    first few batches are seen twice in that epoch. An empty epoch stays empty.
    """
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index {process_index} is outside 0..{num_processes - 1}")
    if not batches:
        return []
    total = -(-len(batches) // num_processes) * num_processes
    padded = [batches[k % len(batches)] for k in range(total)]
    return padded[process_index::num_processes]


@dataclass(frozen=True)
class BucketReport:
    rows: list[tuple[Size, int]]  # (bucket, images including repeats), sorted by bucket
    mean_aspect_error: float  # mean |aspect error| over distinct images (repeats not counted), as kohya logs


def bucket_report(assigner: BucketAssigner, items: Iterable[tuple[Size, int]]) -> BucketReport:
    """Bucket counts for `items` = (image size, num_repeats) pairs."""
    counts: dict[Size, int] = {}
    errors = []
    for image_size, repeats in items:
        choice = assigner.assign(image_size)
        counts[choice.bucket] = counts.get(choice.bucket, 0) + repeats
        errors.append(abs(choice.aspect_error))
    return BucketReport(sorted(counts.items()), sum(errors) / len(errors) if errors else 0.0)


def format_bucket_table(rows: Sequence[tuple[Size, int]], mean_aspect_error: float | None = None) -> str:
    """kohya's log lines; a bucket's number is its position among all rows (empty ones are numbered, not shown)."""
    lines = ["number of images (including repeats) per bucket:"]
    lines += [f"bucket {i}: resolution {bucket}, count: {count}" for i, (bucket, count) in enumerate(rows) if count]
    if mean_aspect_error is not None:
        lines.append(f"mean ar error (without repeats): {mean_aspect_error}")
    return "\n".join(lines)
