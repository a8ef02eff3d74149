"""What an image is generated from besides its prompt and seed, for models that see more than the noisy latents
(and for masked img2img): inpainting masks, depth maps and condition channels, prepared as the training dataset
prepares them (`extra_inputs.ConditionImages`), and the U-Net wrapper that feeds an extra-channel model through
diffusers' text-to-image and img2img pipelines.

Which diffusers pipeline gets what (`sampling.generate_images` builds the call):
- inpainting models: StableDiffusionInpaintPipeline / StableDiffusionXLInpaintPipeline with the image and its mask
  (white: repaint). Without an image they generate from text alone: the whole image masked, strength 1, so the
  start is pure noise and the masked image is blank, as RunwayML trained a share of samples;
- text-to-image models with a mask: the same pipelines repaint the masked area by masked img2img (with a 4-channel
  U-Net, diffusers blends the image's noised latents back in outside the mask after every step);
- SD 2.x depth: StableDiffusionDepth2ImgPipeline with the user's depth map (no depth estimator runs here). Depth2img
  is img2img; without an image it starts from a mid-gray one at strength 1, where the start is the gray image's
  latents noised to the first timestep (almost all noise), so the depth map and the prompt decide the picture;
- extra-channel models (tools/add_input_channels.py --extra_channels N): diffusers has no pipeline that feeds them;
  the text-to-image or img2img pipeline runs around `ConditionChannelsUNet`, which appends the condition channels
  to the latents, box-averaged to the latents' size exactly as the training step does (`extra_inputs.ChannelsFeeder`).

Sample images during training: an inpainting model samples from the prompt alone; a depth or extra-channel model's
prompt lines each name their image with kohya's prompt option `--cn` (its ControlNet image), resized to the
sample's size (`sample_inputs`).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from PIL import Image

from library.buckets import CropPlan
from library.extra_inputs import ChannelsFeeder, ConditionImages, ConditionKind
from library.families import DEPTH, EXTRA_CHANNELS, INPAINTING, ModelFamily, family_for
from library.images import ImageError, image_size, is_image_file

# What each input flag holds, in the words of its messages.
FLAG_KINDS = {"--mask_path": ConditionKind.INPAINT_MASK, "--depth_path": ConditionKind.DEPTH_MAP,
              "--condition_path": ConditionKind.CHANNELS}


def image_files(path: str | Path, flag: str) -> list[Path]:
    """A file, or a folder's image files in name order (kohya's --image_path / --mask_path rule: used in turn)."""
    source = Path(path)
    files = sorted(f for f in source.iterdir() if f.is_file() and is_image_file(f)) if source.is_dir() else [source]
    if not files or not files[0].is_file():
        raise ValueError(f"{flag} {path}: no image file found")
    return files


def load_condition(path: Path, kind: ConditionKind, size: tuple[int, int], *, flag: str, channels: int = 1,
                   goes_with: str = "") -> torch.Tensor:
    """The mask ([1, H, W] in 0..1, 1: repaint), depth map ([1, H, W] in 0..1) or condition channels ([N, H, W] in
    [-1, 1]) of `path` for an image of `size` (width, height), made by the training dataset's own loader
    (same bands, luminance, value ranges and resize filter), without crop or flip. A file of another pixel size is
    resized to `size` if it has the image's aspect ratio (as training resizes a half-resolution mask); another
    aspect ratio would put the condition beside its image, so it is refused, naming `flag` and the file."""
    try:
        own = image_size(path)
    except ImageError as e:
        raise ValueError(f"{flag} {e}") from None
    width, height = size
    # The same allowance as the training loader's (buckets.apply_plan_to_image): sizes rounded to whole pixels.
    if abs((own[0] / own[1]) / (width / height) - 1) > 0.01 + 1 / min(width, height):
        raise ValueError(f"{flag} {path}: {own[0]}x{own[1]}, but the image it goes with{goes_with} is "
                         f"{width}x{height}; {kind.value}s must have their image's aspect ratio (they are resized to "
                         "its size)")
    plan = CropPlan(resized_size=(width, height), crop_left=0, crop_top=0, bucket=(width, height), source_size=own)
    try:  # the random stream draws synthetic masks only, never used for a file
        return ConditionImages(kind, channels).load(path, plan, flip=False, rng=random.Random(0))
    except ImageError as e:
        raise ValueError(f"{flag} {e}") from None


def require_condition_images(prompts: list, family: ModelFamily) -> None:
    """A depth or extra-channel model's sample prompts each need their image (`--cn <file>`): refuse, naming the
    line, a prompt without one or whose file is missing. Other models take none (so ControlNet prompt files, whose
    --cn they ignore, still work)."""
    kind = _CN_KINDS.get(family.unet_inputs)
    if kind is None:
        return
    model = family.description.split(" (")[0]
    for prompt in prompts:
        where = prompt.where or "prompt"
        if not prompt.condition_image:
            raise ValueError(f"{where}: a sample of {model} needs its {kind.value}: add --cn <image file> to the "
                             "prompt (kohya's ControlNet-image option)")
        if not Path(prompt.condition_image).is_file():
            raise ValueError(f"{where}: --cn {prompt.condition_image}: no such file")


def sample_inputs(prompt, family: ModelFamily, in_channels: int) -> dict[str, torch.Tensor]:
    """`sampling.generate`'s inputs for one training sample: the depth map or condition channels of the prompt's
    --cn file at the prompt's size; nothing for other models (an inpainting model samples from the prompt alone)."""
    kind = _CN_KINDS.get(family.unet_inputs)
    if kind is None:
        return {}
    channels = in_channels - family.unet_inputs.fixed_channels if kind is ConditionKind.CHANNELS else 1
    tensor = load_condition(Path(prompt.condition_image), kind, (prompt.width, prompt.height),
                            flag=f"{prompt.where or 'prompt'}: --cn", channels=channels, goes_with=" (the sample)")
    return {"depth_map" if kind is ConditionKind.DEPTH_MAP else "condition": tensor}


_CN_KINDS = {DEPTH: ConditionKind.DEPTH_MAP, EXTRA_CHANNELS: ConditionKind.CHANNELS}  # what a prompt's --cn holds


def neutral_image(width: int, height: int) -> Image.Image:
    """The start image of a generation that has none (an inpainting model from text, depth2img without
    --image_path): mid-gray, the middle of the VAE's input range."""
    return Image.new("RGB", (width, height), (128, 128, 128))


def inpainting_pipeline_class(family: ModelFamily) -> str:
    """The diffusers pipeline that inpaints with this family: its own for an inpainting model; for a text-to-image
    model the inpainting pipeline of its architecture, which repaints by masked img2img with a 4-channel U-Net."""
    if family.unet_inputs == INPAINTING:
        return family.pipeline_class
    try:
        return family_for(family.arch, family.prediction_type, INPAINTING).pipeline_class
    except ValueError:
        raise ValueError(f"{family.description.split(' (')[0]} has no inpainting pipeline: masked img2img (a mask "
                         "with a text-to-image model) needs SD 1.x, SD 2.x or SDXL base") from None


class UNetStandIn(torch.nn.Module):
    """A module diffusers' pipelines take as their U-Net while it wraps the real one (`self.unet`): the dtype and
    device they read, and every other attribute (SDXL: add_embedding's width) are the wrapped model's."""

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("unet"), name)


class ConditionChannelsUNet(UNetStandIn):
    """An extra-channel model's U-Net as diffusers' text-to-image and img2img pipelines expect a U-Net: its config
    says 4 input channels (the pipelines read `unet.config.in_channels` to shape the latents they make), and each
    call appends the condition channels after the latents, as the training step feeds them. `condition`: [B, N, h, w]
    at the latents' size, one per image; with classifier-free guidance the pipelines run the batch twice
    (unconditional, then conditional), and each half gets the same conditions."""

    def __init__(self, unet: torch.nn.Module, condition: torch.Tensor):
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        self.unet = unet
        self.condition = condition
        self.config = FrozenDict({**unet.config, "in_channels": unet.config.in_channels - condition.shape[1]})

    @classmethod
    def from_pixels(cls, unet: torch.nn.Module, conditions: list[torch.Tensor], latent_size: tuple[int, int]):
        """From the conditions at the image's size ([N, H, W] each), box-averaged to `latent_size` (h, w)."""
        condition = ChannelsFeeder()({"condition": torch.stack(conditions)}, [], latent_size)
        return cls(unet, condition)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, *args, **kwargs):
        condition = self.condition.to(sample.device, sample.dtype)
        if sample.shape[0] != condition.shape[0]:
            condition = condition.repeat(sample.shape[0] // condition.shape[0], 1, 1, 1)
        return self.unet(torch.cat([sample, condition], dim=1), timestep, encoder_hidden_states, *args, **kwargs)
