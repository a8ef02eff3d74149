"""What a U-Net sees besides the noisy latents, prepared the same way in training as diffusers' pipelines prepare it
at inference: inpainting masks and masked-image latents, depth maps, and the user's own condition channels.

Two halves, one per stage:
- `ConditionImages` says what the dataset loads for each sample, through the photo's own resize, crop and flip:
  the inpainting mask (the user's, from a same-stem image, or a synthetic one drawn from the sample's random stream),
  the depth map, or the condition image's channels. Values stay in pixel space and in the bucket's size.
- An `InputFeeder` turns a batch of those into the channels concatenated after the noisy latents
  (`families.UNetInputs` names them, in diffusers' order). Inpainting: the mask binarised at 0.5 and resized to the
  latents' size (nearest), and the VAE latents of the image with the masked area blanked, sampled with the sample's
  own generator, as `StableDiffusionInpaintPipeline.prepare_mask_latents` and its SDXL twin do. Depth: bicubic to
  the latents' size, then each map scaled to [-1, 1] by its own minimum and maximum, as
  `StableDiffusionDepth2ImgPipeline.prepare_depth_map` does. Extra channels (models made with
  tools/add_input_channels.py): the condition image's bands in [-1, 1], box-averaged to the latents' size.

What is random per step (synthetic masks, the masked image's latents) is made per step from seeded streams, never
cached; the photo's own latents may still come from the latent cache.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from library.buckets import CropPlan, apply_plan_to_image
from library.families import DEPTH, EXTRA_CHANNELS, INPAINTING, TEXT_TO_IMAGE, UNetInputs
from library.images import ImageError, band_count, image_size, load_bands


class ConditionKind(enum.Enum):
    INPAINT_MASK = "inpainting mask"  # white: repaint
    DEPTH_MAP = "depth map"  # one channel, any scale (normalised per map)
    CHANNELS = "condition image"  # as many bands as the model's extra channels


@dataclass(frozen=True)
class MaskSettings:
    """Synthetic inpainting masks (the flags --inpaint_*; RunwayML trained SD inpainting with random masks and the
    whole image masked a quarter of the time, so the model keeps generating from text alone)."""

    full_mask_prob: float = 0.25  # share of samples with the whole image masked
    max_shapes: int = 3  # each mask: 1..max_shapes rectangles and ellipses
    min_size: float = 0.1  # a shape's width / height as a share of the image's, drawn from [min_size, max_size]
    max_size: float = 0.5

    def __post_init__(self):
        if not 0 <= self.full_mask_prob <= 1:
            raise ValueError(f"--inpaint_full_mask_prob {self.full_mask_prob}: must be between 0 and 1")
        if self.max_shapes < 1:
            raise ValueError(f"--inpaint_mask_max_shapes {self.max_shapes}: must be at least 1")
        if not 0 < self.min_size <= self.max_size <= 1:
            raise ValueError(f"--inpaint_mask_size {self.min_size} {self.max_size}: give MIN MAX with "
                             "0 < MIN <= MAX <= 1 (shares of the image's width and height)")


def synthetic_mask(size: tuple[int, int], rng: random.Random, settings: MaskSettings) -> np.ndarray:
    """A float32 [H, W] mask of 0 and 1 (1: repaint) for an image of `size` (width, height): the whole image with
    probability `full_mask_prob`, else 1..max_shapes random rectangles and ellipses."""
    width, height = size
    if rng.random() < settings.full_mask_prob:
        return np.ones((height, width), dtype=np.float32)
    canvas = Image.new("L", size, 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.randint(1, settings.max_shapes)):
        w = rng.uniform(settings.min_size, settings.max_size) * width
        h = rng.uniform(settings.min_size, settings.max_size) * height
        left, top = rng.uniform(0, width - w), rng.uniform(0, height - h)
        box = (round(left), round(top), round(left + w) - 1, round(top + h) - 1)
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)(box, fill=255)
    return (np.asarray(canvas) > 127).astype(np.float32)


@dataclass(frozen=True)
class ConditionImages:
    """What the dataset loads for a model with extra inputs (`for_inputs` builds it from the family's inputs)."""

    kind: ConditionKind
    channels: int  # the channels a condition image must have (CHANNELS); 1 otherwise
    masks: MaskSettings = MaskSettings()  # INPAINT_MASK: synthetic masks for images without a mask image

    @property
    def needs_pixels(self) -> bool:
        """The training step encodes the masked photo itself, so its pixels are loaded even with cached latents."""
        return self.kind is ConditionKind.INPAINT_MASK

    @property
    def required(self) -> bool:
        """Every image needs a condition image (depth maps, condition channels); inpainting masks are synthetic
        where a subset has none."""
        return self.kind is not ConditionKind.INPAINT_MASK

    def header_problem(self, path: Path, size: tuple[int, int]) -> str | None:
        """What is wrong with a condition image for a photo of `size` (width, height), read from its header: another
        aspect ratio (it would be misaligned), or (condition channels) another number of channels."""
        (w, h), (cw, ch) = size, image_size(path)
        if abs((cw / ch) / (w / h) - 1) > 0.01 + 1 / min(cw, ch):  # the rounding apply_plan_to_image allows
            return f"{path} is {cw}x{ch}, its image {w}x{h}: another aspect ratio"
        if self.kind is ConditionKind.CHANNELS and (bands := band_count(path)) != self.channels:
            return self._channel_problem(path, bands)
        return None

    def _channel_problem(self, path: Path, bands: int) -> str:
        return (f"{path}: a condition image with {bands} channel(s), but the model takes {self.channels} extra "
                f"channel(s); save the conditions as {_MODES_BY_BANDS.get(self.channels, f'{self.channels}-band')} "
                "images")

    def load(self, path: Path | None, plan: CropPlan, flip: bool, rng: random.Random, *, resample=None) -> torch.Tensor:
        """The sample's condition [C, H, W] in the bucket's size: a mask in 0..1 (`path` None: synthetic, from
        `rng`), a depth map in 0..1, or condition channels in [-1, 1]; through the photo's plan and flip."""
        if path is None:
            if self.kind is not ConditionKind.INPAINT_MASK:
                raise ValueError(f"no {self.kind.value} for this image")
            return torch.from_numpy(synthetic_mask(plan.bucket, rng, self.masks))[None]
        bands = load_bands(path)
        if self.kind is ConditionKind.CHANNELS and len(bands) != self.channels:
            raise ImageError(self._channel_problem(path, len(bands)))
        if self.kind is not ConditionKind.CHANNELS:
            # A mask or depth map is one channel: the image's luminance (white: repaint / near, as the tools draw).
            bands = [Image.merge("RGB", bands[:3]).convert("L") if len(bands) >= 3 else bands[0]]
        try:
            planes = [np.asarray(apply_plan_to_image(band, plan, resample=resample), dtype=np.float32) / 255.0
                      for band in bands]
        except ValueError as e:
            raise ImageError(f"{path}: {e}") from None
        tensor = torch.from_numpy(np.stack(planes))
        if self.kind is ConditionKind.CHANNELS:
            tensor = tensor * 2.0 - 1.0
        return tensor.flip(-1) if flip else tensor


_MODES_BY_BANDS = {1: "grayscale (L)", 2: "grayscale + alpha (LA)", 3: "RGB", 4: "RGBA"}


def condition_images_for(inputs: UNetInputs, in_channels: int, masks: MaskSettings = MaskSettings()) \
        -> ConditionImages | None:
    """The dataset's condition images for a U-Net with these inputs (None: text-to-image, nothing extra)."""
    if inputs == TEXT_TO_IMAGE:
        return None
    if inputs == INPAINTING:
        return ConditionImages(ConditionKind.INPAINT_MASK, 1, masks)
    if inputs == DEPTH:
        return ConditionImages(ConditionKind.DEPTH_MAP, 1)
    if inputs == EXTRA_CHANNELS:
        return ConditionImages(ConditionKind.CHANNELS, in_channels - inputs.fixed_channels)
    raise ValueError(f"no condition images known for U-Net inputs {inputs.name!r}")


# ----------------------------------------------------------------------------------------------------------
# The training step's side: batch -> channels after the noisy latents


class InpaintingFeeder:
    """[mask, masked-image latents] for a batch with "pixels" [B, 3, H, W] in [-1, 1] and "condition" [B, 1, H, W]
    (1: repaint), as diffusers' inpainting pipelines make them from an image and a mask image."""

    def __init__(self, vae, scaling_factor: float):
        self.vae, self.scaling_factor = vae, scaling_factor

    @torch.no_grad()
    def __call__(self, batch: dict, generators: list[torch.Generator], latent_size: tuple[int, int]) -> torch.Tensor:
        mask = (batch["condition"] >= 0.5).float()  # the pipelines' mask processor binarises at 0.5
        masked = batch["pixels"] * (mask < 0.5)
        dist = self.vae.encode(masked.to(self.vae.device, self.vae.dtype)).latent_dist
        latents = dist.sample(generators if len(generators) > 1 else generators[0]).float() * self.scaling_factor
        return torch.cat([F.interpolate(mask, size=latent_size).to(latents.device), latents], dim=1)


class DepthFeeder:
    """The depth map at the latents' size, each scaled to [-1, 1] by its own range (diffusers' depth2img)."""

    def __call__(self, batch: dict, generators: list[torch.Generator], latent_size: tuple[int, int]) -> torch.Tensor:
        depth = F.interpolate(batch["condition"].float(), size=latent_size, mode="bicubic", align_corners=False)
        low, high = depth.amin(dim=(1, 2, 3), keepdim=True), depth.amax(dim=(1, 2, 3), keepdim=True)
        flat = (high == low).flatten().tolist()
        if any(flat):
            names = [path for path, is_flat in zip(batch.get("path", ["?"] * len(flat)), flat) if is_flat]
            raise ValueError(f"the depth map of {', '.join(names)} is flat (one value everywhere at the latents' "
                             "size): it says nothing about depth; fix or remove it")
        return 2.0 * (depth - low) / (high - low) - 1.0


class ChannelsFeeder:
    """The condition image's bands, already in [-1, 1], box-averaged to the latents' size."""

    def __call__(self, batch: dict, generators: list[torch.Generator], latent_size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(batch["condition"].float(), size=latent_size, mode="area")


def feeder_for(condition: ConditionImages | None, *, vae, scaling_factor: float):
    """The training step's feeder for the dataset's condition images (None: nothing to feed)."""
    if condition is None:
        return None
    if condition.kind is ConditionKind.INPAINT_MASK:
        return InpaintingFeeder(vae, scaling_factor)
    return DepthFeeder() if condition.kind is ConditionKind.DEPTH_MAP else ChannelsFeeder()
