"""What steers gen_img.py's denoising besides the prompt: ControlNet guidance (kohya's --control_net_models,
--control_net_preps, --control_net_multipliers, --control_net_ratios, --guide_image_path).

ControlNets run through diffusers' ControlNet pipelines (`ModelFamily.controlnet_pipeline_class` and
`controlnet_img2img_pipeline_class`: StableDiffusionControlNetPipeline / ...Img2ImgPipeline, and the SDXL ones),
with `sampling.generate_images`' own conditioning, so a ControlNet image equals the diffusers pipeline's for the
same ControlNet, guide image, seed and scheduler. Per ControlNet, as in kohya:
- the guide image is resized to the image's size with LANCZOS, then preprocessed (`--control_net_preps`: kohya's
  "canny" / "canny_<low>_<high>", thresholds 63 and 191 by default; "none"), then given to the ControlNet as RGB in
  [0, 1] (diffusers' control-image processor, kohya's hint preprocessing);
- `--control_net_multipliers` scales its residuals (diffusers' controlnet_conditioning_scale);
- `--control_net_ratios` r: it guides the steps i (0-based, of the n steps run) with i / n <= r, kohya's rule,
  given to diffusers as the equivalent control_guidance_end (`guidance_end`).
Several ControlNets go through diffusers' MultiControlNetModel, which adds their residuals, each scaled by its
multiplier. kohya's gen_img differs there (SD 1.x: one ControlNet per step in turn; SDXL: their mean); the sum is
what diffusers, WebUI and ComfyUI do.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image

from library.generation_inputs import UNetStandIn

# kohya's canny preprocessor thresholds when "canny" comes without them (tools/original_control_net.py)
CANNY_DEFAULT_THRESHOLDS = (63, 191)


@dataclass(frozen=True)
class ControlNetGuide:
    """One ControlNet of a run, with its kohya settings."""

    model: torch.nn.Module  # a diffusers ControlNetModel
    multiplier: float = 1.0  # --control_net_multipliers
    ratio: float = 1.0  # --control_net_ratios: the share of the steps it guides (kohya's rule, `guidance_end`)


@dataclass(frozen=True)
class ControlGuidance:
    """The ControlNets of a batch and their guide images: images[k][i] is ControlNet k's image for prompt i, at
    the image's size, preprocessed (`guide_image`)."""

    guides: tuple[ControlNetGuide, ...]
    images: tuple[tuple[Image.Image, ...], ...]

    def pipeline_model(self):
        """What the pipeline's `controlnet` is: the model, or the list diffusers makes a MultiControlNetModel of."""
        return self.guides[0].model if len(self.guides) == 1 else [g.model for g in self.guides]

    def pipeline_kwargs(self, *, img2img: bool, steps_run: int) -> dict:
        """The ControlNet arguments of the pipeline call (single ControlNet: plain values, as diffusers asks).
        Several ControlNets get one tensor each ([n, 3, H, W] in [0, 1], what diffusers' control-image processor
        makes of the PIL images): the SDXL and img2img ControlNet pipelines take no per-image lists for them."""
        single = len(self.guides) == 1
        images = [list(i) for i in self.images] if single else [_as_tensor(i) for i in self.images]
        ends = [guidance_end(g.ratio, steps_run) for g in self.guides]
        scales = [g.multiplier for g in self.guides]
        return {"control_image" if img2img else "image": images[0] if single else images,
                "controlnet_conditioning_scale": scales[0] if single else scales,
                "control_guidance_end": ends[0] if single else ends}


def _as_tensor(images) -> torch.Tensor:
    # diffusers' VaeImageProcessor.pil_to_numpy + numpy_to_pt, without its normalisation (ControlNet images stay
    # in [0, 1])
    return torch.stack([torch.from_numpy(np.asarray(image).astype(np.float32) / 255.0).permute(2, 0, 1)
                        for image in images])


def guidance_end(ratio: float, steps_run: int) -> float:
    """diffusers' control_guidance_end for kohya's ratio. kohya guides step i (0-based, of the n steps run) while
    not `ratio < i / n`; diffusers while `(i + 1) / n <= end`. With k the last step kohya guides, end = (k + 1) / n
    selects exactly steps 0..k (both sides compare the same float quotients of small integers)."""
    if ratio < 0:
        raise ValueError(f"ControlNet ratio {ratio}: must be at least 0 (0: the first step only)")
    last = max(i for i in range(steps_run) if not ratio < i / steps_run)  # step 0 always: 0 / n <= ratio
    return (last + 1) / steps_run


def steps_run(scheduler, steps: int, strength: float | None = None) -> int:
    """How many timesteps diffusers' pipelines run for `steps` (txt2img) or img2img at `strength`: the pipelines'
    own `set_timesteps` and `get_timesteps` arithmetic, on a copy of the scheduler (Heun and DPM2 run 2 per step)."""
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(steps)
    if strength is None:
        return len(scheduler.timesteps)
    t_start = max(steps - min(int(steps * strength), steps), 0)
    return len(scheduler.timesteps[t_start * scheduler.order:])


def preprocessor(name: str | None) -> Callable[[Image.Image], Image.Image] | None:
    """kohya's --control_net_preps value -> the function applied to a guide image (None: used as it is).
    "canny", "canny_<low>", "canny_<low>_<high>": the Canny edge map (OpenCV's, bit for bit; library/canny.py)
    as an RGB image, as kohya's tools/original_control_net.py makes it and ControlNets are trained on."""
    if name is None or name.lower() == "none":
        return None
    parts = name.split("_")
    if parts[0] != "canny" or len(parts) > 3:
        raise ValueError(f"unknown preprocessor {name!r}: kohya's are canny, canny_<low>_<high> and none (other "
                         "preprocessing: make the guide images beforehand, e.g. with tools/canny.py)")
    try:
        low, high = (int(v) for v in (parts[1:] + [str(t) for t in CANNY_DEFAULT_THRESHOLDS][len(parts) - 1:]))
    except ValueError:
        raise ValueError(f"preprocessor {name!r}: canny thresholds are whole numbers, e.g. canny_63_191") from None

    def canny(image: Image.Image) -> Image.Image:
        from library.canny import canny as edges, rgb_to_gray

        gray = rgb_to_gray(np.asarray(image.convert("RGB")))
        return Image.fromarray(edges(gray, low, high), "L").convert("RGB")

    return canny


def guide_image(image: Image.Image, size: tuple[int, int], prep) -> Image.Image:
    """A guide image as its ControlNet gets it: RGB, resized to the generated image's (width, height) with LANCZOS,
    then preprocessed (kohya's order)."""
    image = image.convert("RGB")
    if image.size != tuple(size):
        image = image.resize(tuple(size), Image.Resampling.LANCZOS)
    return prep(image) if prep is not None else image


@dataclass(frozen=True)
class ControlNetRun:
    """A run's ControlNets, their preprocessors and the --guide_image_path images, paired with the generated images
    as kohya pairs them: with c ControlNets the images form groups of c in order (ControlNet k takes the k-th of a
    group), and image number j (counted over the run) takes group j modulo the number of groups. A prompt's own
    guide image (its --cn) replaces the group for its images (one ControlNet only)."""

    guides: tuple[ControlNetGuide, ...]
    preps: tuple[Callable | None, ...]
    images: tuple[Image.Image, ...] = ()

    def sources(self, index: int, own: Image.Image | None = None) -> tuple[Image.Image, ...]:
        """The guide image of each ControlNet for image number `index`, before resizing and preprocessing."""
        if own is not None:
            return (own,)
        c = len(self.guides)
        group = index % (len(self.images) // c)
        return self.images[group * c:(group + 1) * c]

    def guidance(self, sources: list[tuple[Image.Image, ...]], size: tuple[int, int]) -> ControlGuidance:
        """The ControlGuidance of a batch whose images take `sources` (one tuple per image), at `size`."""
        return ControlGuidance(self.guides, tuple(
            tuple(guide_image(images[k], size, self.preps[k]) for images in sources) for k in range(len(self.guides))))


class NegativeScaleUNet(UNetStandIn):
    """kohya's negative scale (gen_img --negative_scale, prompt option --nl) through diffusers' pipelines. kohya
    guides with three predictions, the prompt's T, the negative prompt's N and the unconditional (empty prompt) U:

        U + scale * (T - U) - negative_scale * (N - U)

    where plain CFG is N + scale * (T - N). The pipelines run the U-Net on [negative rows; prompt rows] and combine
    the halves with the plain formula; this wrapper runs it once on [negative; prompt; unconditional] (kohya's one
    batch of 3) and returns kohya's combination c in both halves, which the pipeline's formula passes through
    unchanged: c + scale * (c - c) = c exactly. `uncond`: the empty prompt's conditioning (a TextConditioning of
    the batch's size; SDXL: its pooled embedding too, and the negative rows' size ids are reused for it)."""

    def __init__(self, unet: torch.nn.Module, uncond, *, scale: float, negative_scale: float):
        super().__init__()
        self.unet = unet
        self.uncond = uncond
        self.scale, self.negative_scale = scale, negative_scale
        self.config = unet.config

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, *args,
                added_cond_kwargs: dict | None = None, return_dict: bool = True, **kwargs):
        n = sample.shape[0] // 2
        if sample.shape[0] != 2 * n or self.uncond.hidden_states.shape[0] != n:
            raise ValueError("negative scale: the pipeline must run classifier-free guidance (scale > 1) on the "
                             "batch it was set up for")
        for name in ("down_block_additional_residuals", "mid_block_additional_residual"):
            if kwargs.get(name) is not None:
                raise ValueError("negative scale: not with ControlNet residuals (they cover two branches, not three)")
        states = self.uncond.hidden_states.to(encoder_hidden_states)
        if isinstance(timestep, torch.Tensor) and timestep.ndim > 0 and timestep.shape[0] == 2 * n:
            timestep = torch.cat([timestep, timestep[:n]])
        if added_cond_kwargs:
            added_cond_kwargs = {"text_embeds": torch.cat([added_cond_kwargs["text_embeds"],
                                                           self.uncond.pooled.to(added_cond_kwargs["text_embeds"])]),
                                 "time_ids": torch.cat([added_cond_kwargs["time_ids"],
                                                        added_cond_kwargs["time_ids"][:n]])}
        out = self.unet(torch.cat([sample, sample[:n]]), timestep, torch.cat([encoder_hidden_states, states]), *args,
                        added_cond_kwargs=added_cond_kwargs, return_dict=False, **kwargs)[0]
        negative, text, uncond = out.chunk(3)
        combined = uncond + self.scale * (text - uncond) - self.negative_scale * (negative - uncond)
        result = torch.cat([combined, combined])
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=result)
        return (result,)


@dataclass(frozen=True)
class StartNoise:
    """kohya's gen_img noise options: each image's starting noise (txt2img) gets, with probability
    `pyramid_prob`, pyramid noise (upsampled lower-resolution noise added at a discount drawn from
    `pyramid_discount_range`, then rescaled to unit std; kohya's pyramid_noise_like) and then, with probability
    `offset_prob`, a constant offset `randn() * (hi - lo) + lo` over `offset_range` (kohya's formula, a normal draw,
    as its code has it).

    The starting noise itself is what the pipeline would draw from the image's generator (diffusers'
    randn_tensor), so an image whose options do not fire is the image made without them, and the generator goes on
    to the sampler's step noise as it would. kohya draws the decisions and amounts from the process-global RNGs
    (unseeded: another image every run); here they come from a generator of their own, seeded by the image's seed,
    so a run repeats."""

    offset_prob: float | None = None
    offset_range: tuple[float, float] | None = None
    pyramid_prob: float | None = None
    pyramid_discount_range: tuple[float, float] | None = None

    def latents(self, shape: tuple[int, ...], seeds: list[int], generators: list[torch.Generator],
                dtype: torch.dtype) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        out = []
        for seed, generator in zip(seeds, generators):
            noise = randn_tensor((1, *shape[1:]), generator=generator, device=torch.device("cpu"), dtype=dtype)
            options = torch.Generator().manual_seed(_options_seed(seed))
            if self.pyramid_prob is not None and torch.rand(1, generator=options).item() < self.pyramid_prob:
                lo, hi = self.pyramid_discount_range
                discount = torch.rand(1, generator=options).item() * (hi - lo) + lo
                noise = pyramid_noise(noise.float(), options, discount).to(dtype)
            if self.offset_prob is not None and torch.rand(1, generator=options).item() < self.offset_prob:
                lo, hi = self.offset_range
                noise = noise + (torch.randn(1, generator=options).item() * (hi - lo) + lo)
            out.append(noise)
        return torch.cat(out)


def _options_seed(seed: int) -> int:
    # another stream than the image's own generator (seeded with `seed` itself), the same for the same seed
    return (seed * 0x9E3779B97F4A7C15 + 0x5EED) % 2 ** 63


def pyramid_noise(noise: torch.Tensor, generator: torch.Generator, discount: float,
                  iterations: int = 6) -> torch.Tensor:
    """kohya's pyramid_noise_like (gen_img's start code): for level i, noise at 1 / r**i of the size (r drawn in
    [2, 4) per level), upsampled bilinearly and added at discount**i, until a side reaches 1; then rescaled to
    unit std. Draws from `generator` (kohya: the global RNGs)."""
    b, c, h, w = noise.shape
    for i in range(iterations):
        r = torch.rand(1, generator=generator).item() * 2 + 2
        hn, wn = max(1, int(h / (r ** i))), max(1, int(w / (r ** i)))
        low = torch.randn((b, c, hn, wn), generator=generator, dtype=noise.dtype)
        noise = noise + torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear") * discount ** i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()
