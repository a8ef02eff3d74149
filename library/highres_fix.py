"""kohya's highres fix (gen_img.py --highres_fix_*): an image is first made small, enlarged, and made again at full
size by img2img from the enlarged one, so a model trained at a lower resolution composes the picture at the size it
knows and only adds the detail at the full size.

The stages follow kohya gen_img.py's rules, with this suite's pipelines (`sampling.generate_images`):
1. the first stage: the prompt at `int(side * scale + 0.5)` rounded down to a multiple of 32 (each side), with
   --highres_fix_steps steps (default 28) and the image's own seed; SDXL's original sizes and crop, where given
   (--ow / --oh / --nw / --nh / --ct / --cl or their flags), are scaled the same way. From text (txt2img), or with
   --image_path by img2img of the image reduced to that size (PIL's LANCZOS, as kohya resizes its inputs), at
   --highres_fix_strength (default: the image's strength);
2. enlarging to the full size: the image with PIL's LANCZOS (default), the latents by bicubic interpolation
   (--highres_fix_latents_upscaling: the first stage is never decoded), or an upscaler module
   (--highres_fix_upscaler, kohya's interface: `create_upscaler(**kwargs)` returning an object with
   `support_latents()` and `upscale(vae, images, latents, dtype, width, height, batch_size, vae_batch_size)`,
   which gives PIL images or scaled latents);
3. the second stage: img2img from the enlarged image (or latents) at full size, with the image's own steps and
   strength (--t, else --strength, else kohya's 0.8) and the seed + 1.
With diffusers' pipelines this is exactly their txt2img pipeline followed by their img2img pipeline (tested).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, replace

import torch
from PIL import Image

from library.prompt_files import SamplePrompt

# kohya rounds each first-stage side down to a multiple of 32 (its img2img sizes follow the same rule).
FIRST_STAGE_MULTIPLE = 32


@dataclass(frozen=True)
class HighresFix:
    scale: float  # --highres_fix_scale: the first stage's size as a fraction of the image's
    steps: int = 28  # --highres_fix_steps: the first stage's steps
    strength: float | None = None  # --highres_fix_strength: the first stage's img2img strength (None: the image's)
    latents_upscaling: bool = False  # --highres_fix_latents_upscaling
    upscaler: object | None = None  # --highres_fix_upscaler's object (kohya's interface), or None

    @property
    def first_stage_latents(self) -> bool:
        """Whether the first stage hands over latents (kohya: the upscaler says so, else the flag)."""
        return self.upscaler.support_latents() if self.upscaler is not None else self.latents_upscaling

    def first_stage_size(self, width: int, height: int) -> tuple[int, int]:
        return tuple(_scaled(side, self.scale) // FIRST_STAGE_MULTIPLE * FIRST_STAGE_MULTIPLE
                     for side in (width, height))

    def first_stage(self, prompt: SamplePrompt, *, from_image: bool) -> SamplePrompt:
        """The prompt of the first stage; `prompt` is the full-size image's (its strength: the second stage's).
        `from_image`: the first stage is img2img of an --image_path image (at --highres_fix_strength, else the
        image's strength); otherwise txt2img."""
        width, height = self.first_stage_size(prompt.width, prompt.height)
        scaled = {name: _scaled(getattr(prompt, name), self.scale) for name in (
            "original_width", "original_height", "negative_original_width", "negative_original_height", "crop_top",
            "crop_left") if getattr(prompt, name) is not None}
        return replace(prompt, width=width, height=height, steps=self.steps, **scaled,
                       strength=(self.strength or prompt.strength) if from_image else None)

    def enlarge(self, first, *, width: int, height: int, vae, dtype: torch.dtype, vae_batch_size: int | None):
        """The first stage's output (PIL images, or latents when `first_stage_latents`) at the full size: PIL images
        or a latent tensor, whichever the second stage starts from."""
        if self.upscaler is not None:
            n = len(first)
            out = self.upscaler.upscale(vae, None if self.first_stage_latents else first,
                                        first if self.first_stage_latents else None, dtype, width, height, n,
                                        vae_batch_size or n)
            return _checked_upscaler_output(out, n, width, height)
        if self.latents_upscaling:
            factor = 2 ** (len(vae.config.block_out_channels) - 1)
            # interpolate has no bicubic kernel for bf16 (kohya converts the same way)
            return torch.nn.functional.interpolate(first.float(), (height // factor, width // factor),
                                                   mode="bicubic").to(first.dtype)
        return [image.resize((width, height), resample=Image.Resampling.LANCZOS) for image in first]


def _scaled(value: int, scale: float) -> int:
    return int(value * scale + 0.5)  # kohya's rounding


def _checked_upscaler_output(out, n: int, width: int, height: int):
    if isinstance(out, torch.Tensor):
        if out.ndim != 4 or out.shape[0] != n:
            raise ValueError(f"--highres_fix_upscaler returned latents of shape {tuple(out.shape)} for {n} images")
        return out
    images = list(out)
    if len(images) != n or any(not isinstance(i, Image.Image) or i.size != (width, height) for i in images):
        raise ValueError(f"--highres_fix_upscaler returned {len(images)} item(s) for {n} images: expected PIL "
                         f"images of {width}x{height} or a latent tensor")
    return images


def load_upscaler(module_name: str, args_text: str | None, *, device: torch.device, dtype: torch.dtype):
    """kohya's --highres_fix_upscaler: import the module, `create_upscaler(**kwargs)` with --highres_fix_upscaler_args
    ("key=value;key=value", values as strings, as kohya passes them), moved to the run's dtype and device.
    ValueError naming the module when it cannot be imported or lacks the interface."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--highres_fix_upscaler {module_name}: cannot import it ({e}). kohya's upscaler modules "
                         "(tools/latent_upscaler.py) are not part of this suite; give an importable module with "
                         "kohya's interface (create_upscaler(**kwargs) returning an object with support_latents() "
                         "and upscale(...)), or use the default LANCZOS or --highres_fix_latents_upscaling") from None
    if not callable(getattr(module, "create_upscaler", None)):
        raise ValueError(f"--highres_fix_upscaler {module_name}: the module has no create_upscaler(**kwargs) "
                         "(kohya's upscaler interface)")
    kwargs = {}
    for item in filter(None, (args_text or "").split(";")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--highres_fix_upscaler_args {item!r}: expected key=value (several separated by ';')")
        kwargs[key.strip()] = value.strip()
    upscaler = module.create_upscaler(**kwargs)
    for method in ("support_latents", "upscale"):
        if not callable(getattr(upscaler, method, None)):
            raise ValueError(f"--highres_fix_upscaler {module_name}: create_upscaler() returned an object without "
                             f"{method}() (kohya's upscaler interface)")
    if isinstance(upscaler, torch.nn.Module):
        upscaler.to(device=device, dtype=dtype)
    return upscaler
