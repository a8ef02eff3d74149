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
