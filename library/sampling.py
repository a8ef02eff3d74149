"""Image generation shared by the trainers' sample images, train_db's class images and gen_img.py: one generation
function (`generate_images`), kohya's seed rules and WebUI's PNG text. The prompts come from `prompt_files`
(kohya's prompt-file formats), the schedulers from `samplers` (kohya's sampler names).

Sampling uses the family's diffusers pipeline with the conditioning computed by `text_encoding` (so clip skip
and 150/225-token prompts behave exactly as in training) and a scheduler chosen by kohya's sampler names. Models
with extra U-Net inputs (inpainting, depth, extra channels) and masked img2img: `generation_inputs`.
"""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from library.prompt_files import PromptFileError, SamplePrompt
from library.samplers import make_scheduler, sampler_name

logger = logging.getLogger(__name__)


@torch.no_grad()
def generate(prompt: SamplePrompt, *, models, scheduler, seed: int, encoding=None, depth_map=None, condition=None):
    """One image (PIL) for a prompt, reproducible for a seed; a depth model's `depth_map` or an extra-channel
    model's `condition` at the image's size (`generation_inputs.load_condition`)."""
    return generate_images([prompt], [seed], models=models, scheduler=scheduler, encoding=encoding,
                           depth_maps=None if depth_map is None else [depth_map],
                           conditions=None if condition is None else [condition])[0]


@torch.no_grad()
def generate_batch(prompt: SamplePrompt, *, models, scheduler, seeds: list[int], encoding=None) -> list:
    """One image per seed for the same prompt, in one batch."""
    return generate_images([prompt] * len(seeds), seeds, models=models, scheduler=scheduler, encoding=encoding)


def size_of(prompt: SamplePrompt, *, negative: bool = False):
    """The size conditioning of a generated image (SDXL): by default the image's own size, uncropped (diffusers'
    default); `--ow --oh --ct --cl` (and `--nw --nh` for the negative prompt, which else takes the prompt's) change
    it. The refiner's aesthetic score: diffusers' defaults, 6 for the prompt and 2.5 for the negative."""
    from library.text_conditioning import SizeConditioning

    height = prompt.original_height or prompt.height
    width = prompt.original_width or prompt.width
    if negative:
        height, width = prompt.negative_original_height or height, prompt.negative_original_width or width
    return SizeConditioning(original_size=(height, width), crop_top_left=(prompt.crop_top or 0, prompt.crop_left or 0),
                            target_size=(prompt.height, prompt.width), aesthetic_score=2.5 if negative else 6.0)


def check_prompt_fits(prompt: SamplePrompt, family) -> None:
    """Refuse options that would do nothing for this model (SDXL size conditioning on an SD 1.x / 2.x model)."""
    from library.families import TextConditioningKind

    if prompt.sets_size_conditioning and family.text_conditioning is TextConditioningKind.HIDDEN_STATES:
        raise PromptFileError(f"{prompt.where or 'prompt'}: SDXL size conditioning (--ow / --oh / --nw / --nh / --ct "
                              f"/ --cl, or gen_img's --original_* / --crop_* flags) does nothing for "
                              f"{family.description}: remove it")


@torch.no_grad()
def encode_prompts(texts: list[str], sizes: list, conditioner):
    """The conditioning of each (text, size); each distinct pair is encoded once."""
    unique = list(dict.fromkeys(zip(texts, sizes)))
    cond = conditioner([text for text, _ in unique], [size for _, size in unique])
    return cond.rows([unique.index(pair) for pair in zip(texts, sizes)])


@torch.no_grad()
def generate_images(prompts: list[SamplePrompt], seeds: list[int], *, models, scheduler, encoding=None,
                    init_images: list | None = None, init_latents: torch.Tensor | None = None,
                    masks: list | None = None, depth_maps: list | None = None, conditions: list | None = None,
                    control=None, start_noise=None, output_type: str = "pil", progress: bool = False,
                    vae_apart: bool | None = None, vae_batch_size: int | None = None):
    """One image per (prompt, seed), in one batch, through the family's diffusers pipeline (StableDiffusionPipeline,
    StableDiffusionXLPipeline, or their img2img pipelines when `init_images`, PIL images of the output size, are
    given) with our conditioning: the family's conditioner over `models`' encoders (`encoding`: clip skip, token
    length, weighted prompts; `text_conditioning.CaptionEncoding`), so prompts read exactly as captions do in training.

    `init_latents` ([n, C, h, w], already scaled by the VAE factor, as the pipelines' `output_type="latent"` gives
    them) start img2img from latents instead of images: the pipelines take such a tensor as their `image` without
    encoding it (gen_img's highres fix with latent upscaling). Text-to-image and extra-channel models only.

    Models that see more than the noisy latents, and masked img2img, take one input per prompt at the output size
    (made by `generation_inputs.load_condition`; which pipeline gets what: the `generation_inputs` docstring):
    `masks` ([1, H, W], 1: repaint) with `init_images` inpaint with an inpainting model and repaint by masked
    img2img with a text-to-image one; an inpainting model given neither generates from text alone (the whole image
    masked). `depth_maps` ([1, H, W]) are an SD 2.x depth model's, `conditions` ([N, H, W] in [-1, 1]) an
    extra-channel model's; both models work with or without `init_images`.

    `control` (`guidance.ControlGuidance`): ControlNet guidance through the family's ControlNet pipeline (txt2img or
    img2img), text-to-image models only. `start_noise` (`guidance.StartNoise`, kohya's noise offset / pyramid noise
    options): the starting latents of a txt2img generation with them.

    A prompt's `negative_scale` (kohya's --negative_scale / --nl) guides with the unconditional prediction too
    (`guidance.NegativeScaleUNet`); it needs CFG (scale > 1) and no ControlNet.

    The prompts may differ in text and negative prompt but must share size, steps, CFG scale and strength. Each
    image's noise (initial latents, ancestral samplers' step noise, img2img's VAE sample) comes from its own seed's
    generator, so an image depends on its seed, not on the batch it was made in. `output_type`: "pil", "np"
    (floats in [0, 1], for exact comparisons) or "latent" (the final latents, scaled, as one tensor). `vae_apart`:
    run the VAE outside the pipeline (default: when its precision differs from the U-Net's, as with --no_half_vae;
    text-to-image and img2img only: the inpainting and depth2img pipelines encode their images themselves, so their
    VAE runs inside, under autocast when precisions are mixed). `vae_batch_size` (kohya's --vae_batch_size, for
    memory): the VAE encodes and decodes at most that many images at a time: apart from the pipeline in chunks of
    that size (same results), or, for the pipelines that encode inside, one at a time (diffusers' VAE slicing)."""
    from library.text_conditioning import CaptionEncoding, SizeConditioning, conditioner_for

    first = prompts[0]
    settings = {(p.width, p.height, p.steps, p.scale, p.negative_scale, p.strength, size_of(p),
                 size_of(p, negative=True)) for p in prompts}
    if len(settings) != 1 or len(seeds) != len(prompts):
        raise ValueError("generate_images: one seed per prompt, and all prompts with the same size (and size "
                         "conditioning), steps, scale, negative scale and strength")
    if first.negative_scale is not None and (first.scale <= 1 or control is not None):
        raise ValueError("generate_images: a negative scale needs classifier-free guidance (scale > 1) and no "
                         "ControlNet")
    if init_images is not None and init_latents is not None:
        raise ValueError("generate_images: img2img starts from init images or init latents, not both")
    start = init_images if init_images is not None else init_latents
    if start is not None and (first.strength is None or len(start) != len(prompts)):
        raise ValueError("generate_images: img2img needs one init image per prompt and a strength")
    if output_type not in ("pil", "np", "latent"):
        raise ValueError(f"generate_images: output_type {output_type!r}: use pil, np or latent")
    family, n = models.family, len(prompts)
    request = _pipeline_request(models, n, first, init_images=init_images, init_latents=init_latents, masks=masks,
                                depth_maps=depth_maps, conditions=conditions, control=control, scheduler=scheduler)
    conditioner = conditioner_for(family, models.tokenizers, models.text_encoders, encoding or CaptionEncoding())
    size, negative_size = size_of(first), size_of(first, negative=True)
    # kohya's negative scale also needs the unconditional (empty prompt) conditioning: rows 2n..3n
    unconditional = [""] * n if first.negative_scale is not None else []
    cond = encode_prompts([p.prompt for p in prompts] + [p.negative_prompt for p in prompts] + unconditional,
                          [size] * n + [negative_size] * (n + len(unconditional)), conditioner).to(models.unet.dtype)
    positive, negative = cond.rows(slice(0, n)), cond.rows(slice(n, 2 * n))
    uncond = cond.rows(slice(2 * n, 3 * n)) if unconditional else None
    if dict(family.pipeline_flags).get("force_zeros_for_empty_prompt"):
        # SDXL's pipeline conditions an empty negative prompt on zeros, not on the encoded empty text.
        empty = [i for i, p in enumerate(prompts) if not p.negative_prompt]
        if empty:
            negative.hidden_states[empty] = 0
            negative.pooled[empty] = 0
        if uncond is not None:
            uncond.hidden_states.zero_()
            uncond.pooled.zero_()
    unet = request.unet
    if uncond is not None:
        from library.guidance import NegativeScaleUNet

        unet = NegativeScaleUNet(unet if unet is not None else models.unet, uncond, scale=first.scale,
                                 negative_scale=first.negative_scale)
    pipe = family_pipeline(models, scheduler, img2img=request.img2img, pipeline_class=request.pipeline_class,
                           unet=unet, controlnet=None if control is None else control.pipeline_model())
    pipe.vae.config.scaling_factor = family.vae_scale_factor
    pipe.set_progress_bar_config(disable=not progress, leave=False)
    generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
    generator = generators if n > 1 else generators[0]
    # A VAE in another precision than the U-Net (--no_half_vae: fp32 beside a half U-Net) runs on its own, in its
    # precision, outside the pipeline: the pipeline would run it under the U-Net's autocast (or fail on the dtypes).
    # So does one that may take fewer images at a time than the batch has (--vae_batch_size).
    chunk = vae_batch_size if vae_batch_size is not None and vae_batch_size < n else None
    own_vae = (models.vae.dtype != models.unet.dtype or chunk is not None) if vae_apart is None else vae_apart
    if own_vae and request.encodes_inside:
        if vae_apart:
            raise ValueError(f"generate_images: {request.pipeline_class} encodes its images itself; the VAE cannot "
                             "run apart from it")
        own_vae = False  # mixed precisions run under autocast_if_mixed, the VAE with the rest
    kwargs = dict(request.kwargs)
    if init_images is not None and not request.encodes_inside:
        kwargs["image"] = encode_init_images(pipe, init_images, generator, chunk=chunk) if own_vae else init_images
    if init_latents is not None:
        kwargs["image"] = init_latents.to(models.unet.device, models.unet.dtype)
    if start_noise is not None:
        if request.img2img or request.pipeline_class is not None:
            raise ValueError("generate_images: start-noise options are for txt2img generations of text-to-image and "
                             "extra-channel models (img2img, inpainting and depth2img start from an image)")
        factor = 2 ** (len(models.vae.config.block_out_channels) - 1)
        channels = (request.unet or models.unet).config.in_channels
        kwargs["latents"] = start_noise.latents((n, channels, first.height // factor, first.width // factor), seeds,
                                                generators, models.unet.dtype).to(models.unet.device)
    embeds = {"prompt_embeds": positive.hidden_states, "negative_prompt_embeds": negative.hidden_states}
    if positive.pooled is not None:
        embeds.update(pooled_prompt_embeds=positive.pooled, negative_pooled_prompt_embeds=negative.pooled)
    embeds.update(SizeConditioning.pipeline_kwargs(family.text_conditioning, size, negative_size))
    latents_out = own_vae or output_type == "latent"
    with autocast_if_mixed(models.unet, *models.text_encoders, *([] if own_vae else [models.vae])), \
            vae_slicing(models.vae, chunk is not None and not own_vae):
        images = pipe(**embeds, num_inference_steps=first.steps, guidance_scale=first.scale, generator=generator,
                      output_type="latent" if latents_out else output_type, **kwargs).images
    if output_type == "latent":
        return images
    return decode_latents(pipe, images, output_type, chunk=chunk) if own_vae else images


@contextlib.contextmanager
def vae_slicing(vae, enabled: bool):
    """diffusers' VAE slicing (encode and decode one image at a time) for the duration, then as it was: what
    --vae_batch_size gives the pipelines that VAE-encode their images themselves."""
    if not enabled:
        yield
        return
    was = getattr(vae, "use_slicing", False)
    vae.use_slicing = True
    try:
        yield
    finally:
        vae.use_slicing = was


@dataclass(frozen=True)
class _PipelineRequest:
    """Which pipeline a batch runs through, and with what besides the prompts (`_pipeline_request`)."""

    pipeline_class: str | None  # None: the family's text-to-image / img2img pipeline
    img2img: bool
    kwargs: dict  # the pipeline call's image arguments (img2img's `image` is added by generate_images)
    encodes_inside: bool = False  # the pipeline VAE-encodes images itself (inpainting, depth2img)
    unet: object = None  # the U-Net the pipeline sees (None: the model's own)


def _pipeline_request(models, n: int, first: SamplePrompt, *, init_images, masks, depth_maps,
                      conditions, init_latents=None, control=None, scheduler=None) -> _PipelineRequest:
    """The pipeline and image arguments for the family's U-Net inputs and the inputs given (the rules: the
    `generation_inputs` docstring). Inputs the model does not take, or missing ones it needs, are refused."""
    from library import generation_inputs as gi
    from library.families import DEPTH, EXTRA_CHANNELS, INPAINTING, TEXT_TO_IMAGE
    from library.guidance import steps_run

    family = models.family
    inputs, width, height = family.unet_inputs, first.width, first.height
    model = family.description.split(" (")[0]
    if control is not None:
        if inputs != TEXT_TO_IMAGE or masks is not None or family.controlnet_pipeline_class is None:
            raise ValueError(f"generate_images: ControlNet guidance runs through the text-to-image and img2img "
                             f"ControlNet pipelines of SD 1.x, 2.x and SDXL base; not "
                             f"{'masked img2img' if masks is not None else model}")
        if any(len(images) != n for images in control.images) or len(control.images) != len(control.guides):
            raise ValueError(f"generate_images: one guide image per ControlNet ({len(control.guides)}) and prompt "
                             f"({n})")
    given = {"masks": masks, "depth maps": depth_maps, "conditions": conditions}
    takes = {"masks": inputs in (INPAINTING, TEXT_TO_IMAGE), "depth maps": inputs == DEPTH,
             "conditions": inputs == EXTRA_CHANNELS}
    for what, value in given.items():
        if value is not None and len(value) != n:
            raise ValueError(f"generate_images: {len(value)} {what} for {n} prompts")
        if value is not None and not takes[what]:
            raise ValueError(f"generate_images: {model} takes no {what}")
    if init_latents is not None and (inputs in (INPAINTING, DEPTH) or masks is not None):
        raise ValueError(f"generate_images: init latents start img2img of a text-to-image model; {model} "
                         f"{'with masks ' if masks is not None else ''}encodes its images itself")
    if inputs == INPAINTING or masks is not None:
        strength = first.strength
        if init_images is None:
            if masks is not None:
                raise ValueError("generate_images: masks need init images (the images they repaint)")
            # From text alone: everything repainted from pure noise (strength 1); the image never reaches the U-Net.
            init_images, strength = [gi.neutral_image(width, height)] * n, 1.0
            masks = [torch.ones(1, height, width)] * n
        elif masks is None:
            raise ValueError(f"generate_images: {model} inpaints: init images need masks")
        return _PipelineRequest(gi.inpainting_pipeline_class(family), img2img=True, encodes_inside=True, kwargs=dict(
            image=init_images, mask_image=torch.stack(masks), strength=strength, width=width, height=height))
    if inputs == DEPTH:
        if depth_maps is None:
            raise ValueError(f"generate_images: {model} needs a depth map per image")
        image, strength = (init_images, first.strength) if init_images is not None else \
            ([gi.neutral_image(width, height)] * n, 1.0)
        return _PipelineRequest(family.pipeline_class, img2img=True, encodes_inside=True, kwargs=dict(
            image=image, depth_map=torch.cat(depth_maps), strength=strength))
    wrapped = None
    if inputs == EXTRA_CHANNELS:
        if conditions is None:
            raise ValueError(f"generate_images: {model} needs condition channels per image")
        scale = 2 ** (len(models.vae.config.block_out_channels) - 1)  # the VAE's downsampling, as pipelines compute it
        wrapped = gi.ConditionChannelsUNet.from_pixels(models.unet, conditions, (height // scale, width // scale))
    img2img = init_images is not None or init_latents is not None
    kwargs = {"strength": first.strength} if img2img else {"width": width, "height": height}
    if control is not None:
        kwargs.update(control.pipeline_kwargs(img2img=img2img, steps_run=steps_run(
            scheduler, first.steps, first.strength if img2img else None)))
    return _PipelineRequest(None, img2img=img2img, kwargs=kwargs, unet=wrapped)


def encode_init_images(pipe, images: list, generator, *, chunk: int | None = None) -> torch.Tensor:
    """img2img's starting latents, made as the img2img pipelines make them (a posterior sample drawn from each
    image's generator, then scaled) but with the VAE in its own precision; the pipelines take them as `image`.
    Several images (one generator each) are encoded one at a time, as the pipelines do, so `chunk`
    (--vae_batch_size) holds already."""
    vae = pipe.vae
    pixels = pipe.image_processor.preprocess(images).to(vae.device, vae.dtype)
    if isinstance(generator, list):
        latents = torch.cat([vae.encode(pixels[i:i + 1]).latent_dist.sample(g) for i, g in enumerate(generator)])
    else:
        latents = vae.encode(pixels).latent_dist.sample(generator)
    return (latents * vae.config.scaling_factor).to(pipe.unet.dtype)


def decode_latents(pipe, latents: torch.Tensor, output_type: str, *, chunk: int | None = None) -> list:
    """The pipelines' last step (unscale, VAE decode, postprocess) with the VAE in its own precision, `chunk`
    latents at a time (--vae_batch_size; default: all at once)."""
    vae = pipe.vae
    scaled = latents.to(vae.dtype) / vae.config.scaling_factor
    step = chunk or len(scaled)
    pixels = torch.cat([vae.decode(scaled[i:i + step], return_dict=False)[0] for i in range(0, len(scaled), step)])
    return pipe.image_processor.postprocess(pixels, output_type=output_type)


@torch.no_grad()
def latents_to_images(models, latents: torch.Tensor, output_type: str = "pil", *, chunk: int | None = None) -> list:
    """Images of latents a pipeline gave with output_type="latent" (the pipelines' own last step)."""
    pipe = family_pipeline(models, make_scheduler("ddim", models.prediction_type.value))
    pipe.vae.config.scaling_factor = models.family.vae_scale_factor
    return decode_latents(pipe, latents, output_type, chunk=chunk)


def family_pipeline(models, scheduler, *, img2img: bool = False, controlnet=None, pipeline_class: str | None = None,
                    unet=None):
    """The family's diffusers pipeline (txt2img, img2img, or either guided by `controlnet`) around our models,
    built from the family record. `pipeline_class`: another pipeline of the family's components (an inpainting
    pipeline for masked img2img); `unet`: what the pipeline sees as its U-Net (default: the model's own)."""
    import inspect

    import diffusers

    family = models.family
    if controlnet is not None:
        name = family.controlnet_img2img_pipeline_class if img2img else family.controlnet_pipeline_class
        if name is None or pipeline_class is not None:
            raise ValueError(f"no ControlNet {'img2img ' if img2img else ''}pipeline for "
                             f"{pipeline_class or family.description}")
    else:
        name = pipeline_class or (family.img2img_pipeline_class if img2img else family.pipeline_class)
    cls = getattr(diffusers, name)
    parts = {"unet": models.unet if unet is None else unet, "vae": models.vae, "scheduler": scheduler,
             "controlnet": controlnet, **{absent: None for absent in family.pipeline_absent}}
    for slot, encoder, tokenizer in zip(family.text_encoders, models.text_encoders, models.tokenizers):
        parts.update({slot.component: encoder, slot.tokenizer: tokenizer})
    accepted = inspect.signature(cls.__init__).parameters
    parts.update({key: value for key, value in family.pipeline_flags if key in accepted})
    if "add_watermarker" in accepted:
        parts["add_watermarker"] = False  # an invisible watermark would make images differ from the model's output
    return cls(**{key: value for key, value in parts.items() if key in accepted})


def autocast_if_mixed(*models):
    """Models of different dtypes (during training: an fp32 U-Net or ControlNet beside a bf16 VAE and text encoder)
    run under autocast to the half dtype, as in the training step; diffusers' pipelines would otherwise hand fp32
    latents to a bf16 VAE. Models of one dtype run as they are (gen_img stays equal to diffusers' pipelines)."""
    dtypes = {m.dtype for m in models}
    half = next((d for d in (torch.bfloat16, torch.float16) if d in dtypes), None)
    if len(dtypes) == 1 or half is None:
        return contextlib.nullcontext()
    return torch.autocast(models[0].device.type, dtype=half)


# ----------------------------------------------------------------------------------------------------------
# gen_img.py: which image gets which seed, and which images share a batch (kohya's rules)


@dataclass(frozen=True)
class ImageJob:
    index: int  # position in the run: numbers the output file, picks the img2img input image
    prompt: SamplePrompt
    seed: int


def plan_images(prompts: list[SamplePrompt], *, images_per_prompt: int = 1, n_iter: int = 1, seed: int | None = None,
                iter_same_seed: bool = False, shuffle: random.Random | None = None,
                iterations: list[list[SamplePrompt]] | None = None, rng: random.Random | None = None,
                start: int = 0) -> list[ImageJob]:
    """kohya gen_img.py's seeds: a prompt's `--d` list gives its images' seeds in order (the last one repeats when
    the list is shorter); other images draw theirs from `random.Random(--seed)` in image order (with
    `--iter_same_seed`, one draw per iteration for all of them). A single image with `--seed` uses it directly.

    `shuffle` (kohya's --shuffle_prompts): this generator reorders the prompt list in place at the start of every
    iteration (so each iteration shuffles the last one's order), and the seeds are drawn in the new order.
    `iterations`: each iteration's own prompts (kohya's --from_module prompter is asked again every iteration),
    instead of `prompts` n_iter times. `rng` / `start`: the seed generator to draw from and the first image's index,
    for a run that plans prompt by prompt (--interactive): it continues both."""
    single_image = (seed is not None and rng is None and iterations is None and len(prompts) == 1
                    and images_per_prompt == 1)
    rng = rng if rng is not None else random.Random(seed)

    def draw() -> int:
        return seed if single_image else rng.randint(0, 2 ** 32 - 1)

    order = list(prompts)
    jobs = []
    for iteration in iterations if iterations is not None else [None] * n_iter:
        if iteration is not None:
            order = list(iteration)
        if shuffle is not None:
            shuffle.shuffle(order)
        iteration_seed = draw() if iter_same_seed else None
        for prompt in order:
            given = list(prompt.seeds)
            image_seed = None
            for _ in range(images_per_prompt):
                if given:
                    image_seed = given.pop(0)
                elif not prompt.seeds:
                    image_seed = iteration_seed if iter_same_seed else draw()
                jobs.append(ImageJob(start + len(jobs), prompt, image_seed))
    return jobs


def batches(jobs: list[ImageJob], batch_size: int, key) -> list[list[ImageJob]]:
    """Consecutive jobs with equal `key(job)` (everything a batch must share), at most `batch_size` at a time."""
    out: list[list[ImageJob]] = []
    for job in jobs:
        if out and len(out[-1]) < batch_size and key(out[-1][-1]) == key(job):
            out[-1].append(job)
        else:
            out.append([job])
    return out


def webui_parameters(prompt: SamplePrompt, *, sampler: str, seed: int, model_name: str = "",
                     extra: dict[str, object] | None = None) -> str:
    """The PNG "parameters" text WebUI's PNG Info reads. `extra`: more "Key: value" fields in WebUI's names
    (e.g. "Denoising strength", "Clip skip"), written after the standard ones."""
    lines = [prompt.prompt]
    if prompt.negative_prompt:
        lines.append(f"Negative prompt: {prompt.negative_prompt}")
    fields = [f"Steps: {prompt.steps}", f"Sampler: {sampler}", f"CFG scale: {prompt.scale}", f"Seed: {seed}",
              f"Size: {prompt.width}x{prompt.height}"]
    if model_name:
        fields.append(f"Model: {model_name}")
    fields += [f"{key}: {value}" for key, value in (extra or {}).items()]
    lines.append(", ".join(fields))
    return "\n".join(lines)


def save_png(image, path: Path, parameters: str, *, clip_prompt: str | None = None) -> Path:
    """The image as PNG (atomically) with WebUI's "parameters" text, and kohya's "clip-prompt" text when the prompt
    has a --c."""
    from PIL.PngImagePlugin import PngInfo

    from library.atomic_files import atomic_file

    info = PngInfo()
    info.add_text("parameters", parameters)
    if clip_prompt is not None:
        info.add_text("clip-prompt", clip_prompt)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


class TrainingSampler:
    """Sample images during training: every prompt of the prompt file, saved as
    `<output_dir>/sample/<name>_<e000005|000500>_<idx>_<time>_<seed>.png` (kohya's names) and sent to
    TensorBoard. Prompts without `--d` get the seed (run seed + index), so samples are comparable across saves.
    Models with extra inputs: an inpainting model samples from the prompt alone (the whole image masked), a depth
    or extra-channel model with the image its prompt's `--cn` names (`generation_inputs.sample_inputs`)."""

    def __init__(self, prompts: list[SamplePrompt], *, models, default_sampler: str, prediction_type: str,
                 output_dir: Path, output_name: str, seed: int, encoding, zero_terminal_snr: bool = False,
                 model_name: str = ""):
        self.prompts, self.models = prompts, models
        self.default_sampler = sampler_name(default_sampler)
        self.prediction_type, self.zero_terminal_snr = prediction_type, zero_terminal_snr
        self.output_dir, self.output_name, self.seed = Path(output_dir), output_name, seed
        self.encoding = encoding  # the run's caption encoding (clip skip, token length): prompts read as captions
        self.model_name = model_name
        from library.generation_inputs import sample_inputs

        # A depth / extra-channel model's map or condition per prompt (its --cn), loaded once, before training.
        self.inputs = [sample_inputs(prompt, models.family, models.unet.config.in_channels) for prompt in prompts]

    def __call__(self, *, epoch: int | None, step: int, run_log=None, trainable=None) -> list[Path]:
        import time

        tag = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
        stamp = time.strftime("%Y%m%d%H%M%S")
        was_training = trainable.training if trainable is not None else False
        if trainable is not None:
            trainable.eval()  # no dropout while sampling
        paths = []
        try:
            for index, prompt in enumerate(self.prompts):
                seed = prompt.seed if prompt.seed is not None else self.seed + index
                name = prompt.sampler or self.default_sampler
                image = generate(prompt, models=self.models, seed=seed, encoding=self.encoding,
                                 scheduler=make_scheduler(name, self.prediction_type,
                                                          zero_terminal_snr=self.zero_terminal_snr),
                                 **self.inputs[index])
                path = self.output_dir / "sample" / f"{self.output_name}_{tag}_{index:02d}_{stamp}_{seed}.png"
                paths.append(save_png(image, path, webui_parameters(prompt, sampler=name, seed=seed,
                                                                    model_name=self.model_name),
                                      clip_prompt=prompt.clip_prompt))
                if run_log is not None:
                    import numpy as np

                    run_log.add_image(f"sample/{index:02d}", np.asarray(image), step)
        finally:
            if trainable is not None and was_training:
                trainable.train()
        return paths
