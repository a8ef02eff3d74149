"""gen_img.py's generation once everything is loaded (`Generation`): planned images made batch by batch
(`BatchMaker`: one or two stages with the highres fix, ControlNet guidance, per-image inputs), named and saved with
WebUI's PNG text; the prompt sources that come after loading (--interactive, --from_module); the input images and
ControlNets, read before the first image is made."""

from __future__ import annotations

import argparse
import logging
import random
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from library import generation_inputs as gi
from library import guidance, prompt_files, samplers, sampling
from library import textual_inversion as ti
from library.families import INPAINTING
from library.gen_img_args import (INPUT_FLAGS, check_image_inputs, check_prompts, fail, prompt_defaults,
                                  start_noise)
from library.highres_fix import FIRST_STAGE_MULTIPLE, HighresFix
from library.model_loading import SDModels
from library.prompt_files import PromptFileError, SamplePrompt
from library.sampling import ImageJob
from library.tensor_files import CheckpointError
from library.text_conditioning import CaptionEncoding
from library.text_encoding import CHUNK, fitting_token_length, token_count

logger = logging.getLogger("gen_img")


def load_controlnets(args: argparse.Namespace, models: SDModels, device: torch.device,
                     dtype: torch.dtype) -> guidance.ControlNetRun | None:
    """The ControlNets (any layout controlnet_checkpoint reads, checked to fit the model) with their settings and
    the --guide_image_path images, read before the first image is made."""
    if not args.control_net_models:
        return None
    from library.controlnet_checkpoint import load_controlnet

    count = len(args.control_net_models)

    def nth(values, i, default):
        return values[i] if values and i < len(values) else default
    guides = []
    for i, path in enumerate(args.control_net_models):
        try:
            model = load_controlnet(path, family=models.family, base_unet_config=dict(models.unet.config), dtype=dtype,
                                    allow_unsafe_pickle=args.allow_unsafe_pickle)
        except CheckpointError as e:
            raise fail(f"--control_net_models {path}: {e}") from None
        if args.opt_channels_last:
            model.to(memory_format=torch.channels_last)
        guides.append(guidance.ControlNetGuide(model.to(device), multiplier=nth(args.control_net_multipliers, i, 1.0),
                                               ratio=nth(args.control_net_ratios, i, 1.0)))
        logger.info("ControlNet %d: %s (multiplier %s, ratio %s, preprocessor %s)", i + 1, path, guides[-1].multiplier,
                    guides[-1].ratio, nth(args.control_net_preps, i, "none"))
    preps = tuple(guidance.preprocessor(nth(args.control_net_preps, i, None)) for i in range(count))
    files = []
    for path in args.guide_image_path or []:
        try:
            files += gi.image_files(path, "--guide_image_path")
        except ValueError as e:
            raise fail(str(e)) from None
    if len(files) % count:
        raise fail(f"--guide_image_path: {len(files)} images for {count} ControlNets: give a multiple of {count} (one "
                   "image per ControlNet for each generated image, in order)")
    return guidance.ControlNetRun(tuple(guides), preps, tuple(read_guide_image(file, "--guide_image_path")
                                                             for file in files))


def read_guide_image(path, flag: str) -> Image.Image:
    try:
        return Image.open(path).convert("RGB")
    except OSError as e:
        raise fail(f"{flag} {path}: cannot read the image ({e})") from None


def own_guide_images(prompts: list[SamplePrompt]) -> dict[str, Image.Image]:
    """The guide images the prompts' --cn name (text-to-image models with ControlNet), each read once."""
    return {path: read_guide_image(path, f"{where}: --cn") for path, where in
            {p.condition_image: p.where or "--prompt" for p in prompts if p.condition_image}.items()}


def input_files(args: argparse.Namespace) -> dict[str, list[Path]]:
    """--mask_path / --depth_path / --condition_path given: flag -> its files, used in turn (kohya's rule)."""
    try:
        return {flag: gi.image_files(getattr(args, flag[2:]), flag) for flag in gi.FLAG_KINDS
                if getattr(args, flag[2:])}
    except ValueError as e:
        raise fail(str(e)) from None


def job_inputs(jobs: list[ImageJob], init_files: list[Path], files: dict[str, list[Path]], family,
               in_channels: int) -> dict[int, dict[str, torch.Tensor]]:
    """Each image's mask / depth map / condition (generate_images' per-image inputs, by job index), paired with the
    images as kohya pairs --mask_path with --image_path (the n-th image takes file n modulo the count; a prompt's
    --cn comes first), at the image's size. All are loaded here, before the first image is made, so a bad file
    stops the run with nothing written; each (file, size) is loaded once."""
    own = INPUT_FLAGS.get(family.unet_inputs)
    wanted = [flag for flag in files if flag == own or (flag == "--mask_path" and own is None)]
    if own in ("--depth_path", "--condition_path") and own not in wanted:
        wanted.append(own)  # every prompt has its --cn (check_image_inputs)
    channels = in_channels - family.unet_inputs.fixed_channels if own == "--condition_path" else 1
    argument = {"--mask_path": "masks", "--depth_path": "depth_maps", "--condition_path": "conditions"}
    loaded: dict[tuple, torch.Tensor] = {}
    out = {}
    for job in jobs:
        size = (job.prompt.width, job.prompt.height)
        init = init_files[job.index % len(init_files)] if init_files else None
        goes_with = f" ({init})" if init else " (the prompt's size)"
        out[job.index] = {}
        for flag in wanted:
            cn = job.prompt.condition_image if flag != "--mask_path" else None
            path = Path(cn) if cn else files[flag][job.index % len(files[flag])]
            where = f"{job.prompt.where or '--prompt'}: --cn" if cn else flag
            if (path, size) not in loaded:
                try:
                    loaded[path, size] = gi.load_condition(path, gi.FLAG_KINDS[flag], size, flag=where,
                                                           channels=channels, goes_with=goes_with)
                except ValueError as e:
                    raise fail(str(e)) from None
            out[job.index][argument[flag]] = loaded[path, size]
    return out


# ----------------------------------------------------------------------------------------------------------
# Images in and out


def load_init_images(path: str | None) -> tuple[list[Path], list]:
    """img2img inputs (their files, and the images: RGB, cut down to a multiple of 8 in each side (kohya: 32) by
    resizing)."""
    if path is None:
        return [], []
    try:
        files = gi.image_files(path, "--image_path")
    except ValueError as e:
        raise fail(str(e)) from None
    images = []
    for file in files:
        try:
            image = Image.open(file).convert("RGB")
        except OSError as e:
            raise fail(f"--image_path {file}: cannot read the image ({e})") from None
        size = (image.width // 8 * 8, image.height // 8 * 8)
        if min(size) < 64:
            raise fail(f"--image_path {file}: {image.width}x{image.height} is too small (at least 64x64)")
        if size != image.size:
            logger.warning("%s: resized to %dx%d (a multiple of 8)", file, *size)
            image = image.resize(size, Image.Resampling.LANCZOS)
        images.append(image)
    return files, images


def output_paths(outdir: Path, jobs: list[ImageJob], *, sequential: bool,
                 original_names: list[Path] | None = None) -> dict[int, Path]:
    """Each job's file (by job index). Deterministic names: `im_<number>_<seed>.png` (or `im_<number>.png`),
    numbered on from the highest `im_<number>` already in `outdir` (as WebUI numbers its outputs), so a second run
    never overwrites the first. A prompt's `--f` name is used as given, or with `original_names`
    (--use_original_file_name) the name of the job's --image_path input (its stem + .png, as kohya names it), with
    `_<number>` added when several images share a name."""
    taken = [int(m.group(1)) for f in (outdir.iterdir() if outdir.is_dir() else [])
             if (m := re.fullmatch(r"im_(\d{6})(?:_\d+)?\.png", f.name))]
    start = max(taken, default=-1) + 1

    def given_name(job: ImageJob) -> str | None:
        if job.prompt.filename:
            return job.prompt.filename
        return original_names[job.index % len(original_names)].stem + ".png" if original_names else None
    uses: dict[str, int] = {}
    for job in jobs:
        if name := given_name(job):
            uses[name] = uses.get(name, 0) + 1
    paths = {}
    for position, job in enumerate(jobs):
        number = f"{start + position:06d}"
        if name := given_name(job):
            stem, suffix = (name[:-4], ".png") if name.lower().endswith(".png") else (name, ".png")
            paths[job.index] = outdir / (f"{stem}_{number}{suffix}" if uses[name] > 1 else stem + suffix)
        else:
            paths[job.index] = outdir / (f"im_{number}.png" if sequential else f"im_{number}_{job.seed}.png")
    return paths


def preview(image, title: str) -> None:
    """--interactive: show the image in the system's image viewer (PIL's Image.show; kohya uses an OpenCV window)."""
    try:
        image.show(title=title[:128])
    except Exception as e:  # no viewer / no display: the image is saved either way
        logger.warning("cannot show the image (%s); --no_preview turns previews off", e)


def interactive(generation: "Generation", stream) -> list[Path]:
    """kohya's --interactive: a prompt per line (with its options) from the terminal until end of input, each made
    into --images_per_prompt images at once; seeds drawn from one generator seeded by --seed (kohya's
    seed_random) over the session. A line with an error is reported and the next one read."""
    args, family = generation.args, generation.models.family
    rng = random.Random(args.seed)
    written, start, number = [], 0, 0
    while True:
        print("Type prompt:", file=sys.stderr, flush=True)
        line = stream.readline()
        if not line:
            return written
        text = line.strip()
        if not text.split(" --")[0].strip():
            continue
        number += 1
        try:
            prompt = prompt_files.parse_prompt_line(text, prompt_defaults(args, family), where=f"prompt {number}")
            check_prompts(args, family, [prompt], len(generation.applied))
            check_image_inputs(args, family, [prompt])
            jobs = sampling.plan_images([prompt], images_per_prompt=args.images_per_prompt, rng=rng, start=start)
            written += generation.images(jobs)
        except (PromptFileError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        except SystemExit as e:  # a problem with this prompt (fail(...)): say it, and read the next one
            print(e, file=sys.stderr)
            continue
        start += len(jobs)


def module_prompts(args: argparse.Namespace, generation: "Generation", applied_count: int) -> list[list[SamplePrompt]]:
    """kohya's --from_module: the file's get_prompter(args, pipe, networks) gives a prompter, asked for prompt lines
    (`prompter(args, pipe, seed_random, iter_seed, prompt_index, global_step)`) until it returns None, once per
    iteration (--n_iter). `pipe` here is this run's models (kohya's is its pipeline object: a prompter that reaches
    into that fails, and says so), `networks` the applied networks; `seed_random` is a generator of the prompter's
    own (seeded by --seed), so drawing from it does not move the images' seeds, and `iter_seed` is None."""
    import importlib.util

    path = Path(args.from_module)
    spec = importlib.util.spec_from_file_location("prompt_module", path) if path.is_file() else None
    if spec is None:
        raise fail(f"--from_module {path}: no such Python file")
    module = importlib.util.module_from_spec(spec)
    where = f"--from_module {path}"
    try:
        spec.loader.exec_module(module)
        prompter = module.get_prompter(args, generation.models, [network for network, _ in generation.applied])
        seed_random = random.Random(args.seed)
        defaults = prompt_defaults(args, generation.models.family)
        iterations, global_step = [], 0
        for _ in range(args.n_iter):
            lines = []
            while (line := prompter(args, generation.models, seed_random, None, len(lines), global_step)) is not None:
                lines.append(prompt_files.parse_prompt_line(str(line), defaults,
                                                        where=f"{where} prompt {len(lines) + 1}"))
                global_step += args.images_per_prompt
            if not lines:
                raise fail(f"{where}: the prompter gave no prompts")
            iterations.append(lines)
    except SystemExit:
        raise
    except PromptFileError as e:
        raise fail(str(e)) from None
    except Exception as e:  # the module's own code failed: say where
        raise fail(f"{where}: the prompter module failed: {type(e).__name__}: {e} (its pipe is this suite's models, "
                   "not kohya's pipeline object)") from None
    for prompts in iterations:
        check_prompts(args, generation.models.family, prompts, applied_count)
        check_image_inputs(args, generation.models.family, prompts)
    return iterations


class Generation:
    """What a run has decided before its first image (models, networks, embeddings, highres fix, ControlNets,
    input images), and `images`: a planned list of images made and saved, batch by batch."""

    def __init__(self, args: argparse.Namespace, models: SDModels, applied: list, words: dict, *,
                 fix: HighresFix | None, control: guidance.ControlNetRun | None, init_files: list[Path],
                 init_images: list, files: dict[str, list[Path]]):
        self.args, self.models, self.applied, self.words = args, models, applied, words
        self.fix, self.control = fix, control
        self.init_files, self.init_images, self.files = init_files, init_images, files

    def expanded(self, p: SamplePrompt) -> SamplePrompt:  # a word with several vectors stands for all of them
        return replace(p, prompt=ti.expand_tokens(p.prompt, self.words),
                       negative_prompt=ti.expand_tokens(p.negative_prompt, self.words)) if self.words else p

    def images(self, jobs: list[ImageJob]) -> list[Path]:
        """Make and save the planned images (everything is loaded and checked before the first is made)."""
        args, models, init_images = self.args, self.models, self.init_images
        jobs = [replace(job, prompt=settle(job.prompt, init_images[job.index % len(init_images)] if init_images else
                                           None, strength=args.strength, multipliers=[m for _, m in self.applied],
                                           default_strength=1.0 if models.family.unet_inputs == INPAINTING else 0.8,
                                           img2img=self.fix is not None))
                for job in jobs]
        for p in {job.prompt for job in jobs}:
            check_steps(p, self.fix, from_image=bool(init_images))
            if args.vae_slices is not None:
                check_vae_slices(p, self.fix, args.vae_slices, vae_factor=2 ** (len(models.vae.config.block_out_channels)
                                                                                 - 1), from_image=bool(init_images))
        inputs = job_inputs(jobs, self.init_files, self.files, models.family, models.unet.config.in_channels)
        prompts = list({job.prompt: None for job in jobs})
        # (every encoder of a family shares CLIP's vocabulary: one tokenizer counts for all)
        lengths = token_lengths([self.expanded(p) for p in prompts], models.tokenizers[0], args.max_token_length or
                                (args.max_embeddings_multiples or 0) * CHUNK or None)

        def batch_key(job: ImageJob):  # what the images of one batch share
            p = self.expanded(job.prompt)
            return (p.width, p.height, p.steps, p.scale, p.negative_scale, p.strength, p.sampler,
                    p.network_multipliers, lengths[p.prompt, p.negative_prompt], sampling.size_of(p),
                    sampling.size_of(p, negative=True))

        make = BatchMaker(models, zero_terminal_snr=args.zero_terminal_snr, clip_skip=args.clip_skip, lengths=lengths,
                          init_images=init_images, inputs=inputs, fix=self.fix, keep_first=args.highres_fix_save_1st,
                          vae_batch_size=args.vae_batch_size, control=self.control,
                          own_guides=own_guide_images(prompts) if self.control else {},
                          control_second_stage=not args.highres_fix_disable_control_net,
                          start_noise=start_noise(args), weight_normalization=args.emb_normalize_mode)
        paths = output_paths(Path(args.outdir), jobs, sequential=args.sequential_file_name,
                             original_names=self.init_files if args.use_original_file_name else None)
        written = []
        with tqdm(total=len(jobs), desc="images", unit="image") as bar:
            for batch in sampling.batches(jobs, args.batch_size, batch_key):
                self.set_multipliers(batch[0].prompt.network_multipliers or ())
                images, first_images = make([replace(job, prompt=self.expanded(job.prompt)) for job in batch])
                for i, job in enumerate(batch):
                    path = paths[job.index]
                    if first_images is not None:
                        written.append(self.save(first_images[i], path.with_name(f"{path.stem}_1st{path.suffix}"),
                                                 job, first_stage=True))
                    written.append(self.save(images[i], path, job))
                    if args.interactive and not args.no_preview:
                        preview(images[i], job.prompt.prompt)
                bar.update(len(batch))
        return written

    def set_multipliers(self, multipliers) -> None:
        for (network, _), multiplier in zip(self.applied, multipliers):
            network.set_multiplier(multiplier)
        if self.args.network_pre_calc:  # kohya: out with the last batch's multipliers, in with this one's
            for network, _ in self.applied:
                network.restore_weights()
            for network, _ in self.applied:
                network.pre_calculation()

    def save(self, image, path: Path, job: ImageJob, *, first_stage: bool = False) -> Path:
        from_image = bool(self.init_images)
        if first_stage:
            text = png_text(self.fix.first_stage(job.prompt, from_image=from_image), job.seed, self.args)
        else:
            text = png_text(job.prompt, job.seed, self.args, fix=self.fix, from_image=from_image)
        return sampling.save_png(image, path, text, clip_prompt=job.prompt.clip_prompt)

    def close(self) -> None:
        """The models as loaded (for callers in Python): pre-calculated networks taken out of the weights."""
        for network, _ in self.applied if self.args.network_pre_calc else []:
            network.restore_weights()


def check_steps(prompt: SamplePrompt, fix: HighresFix | None, *, from_image: bool) -> None:
    """Every img2img stage runs at least one denoising step (diffusers' img2img runs int(steps * strength)), and the
    highres fix's first stage has a size."""
    where = prompt.where or "prompt"
    stages = [("", prompt)]
    if fix is not None:
        first = fix.first_stage(prompt, from_image=from_image)
        if min(first.width, first.height) < FIRST_STAGE_MULTIPLE:
            raise fail(f"{where}: the highres fix's first stage of a {prompt.width}x{prompt.height} image at scale "
                       f"{fix.scale} is {first.width}x{first.height} (each side rounded down to a multiple of "
                       f"{FIRST_STAGE_MULTIPLE}, kohya's rule): raise --highres_fix_scale or the size")
        stages = [("the highres fix's second stage: ", prompt), ("the highres fix's first stage: ", first)]
    for what, p in stages:
        if p.strength is not None and int(p.steps * p.strength) < 1:
            raise fail(f"{where}: {what}img2img with strength {p.strength} and {p.steps} steps runs no denoising "
                       "step (steps x strength < 1); raise the steps or the strength")


def check_vae_slices(prompt: SamplePrompt, fix: HighresFix | None, num_slices: int, *, vae_factor: int,
                     from_image: bool) -> None:
    """--vae_slices cuts the VAE's work into bands of one latent row or more: no more bands than the latent rows of
    any image the run decodes or encodes (the highres fix's first stage is the smaller one)."""
    from library.vae_row_slicing import check_slices

    heights = [prompt.height] + ([fix.first_stage(prompt, from_image=from_image).height] if fix is not None else [])
    try:
        check_slices(num_slices, min(heights) // vae_factor)
    except ValueError as e:
        where = f"{prompt.where}: " if prompt.where else ""
        stage = f" (the highres fix's first stage is {min(heights)} px high)" if min(heights) < prompt.height else ""
        raise fail(f"{where}{e}{stage}") from None


@dataclass
class BatchMaker:
    """The images of one batch (jobs that share size, steps, scale, strength, sampler, multipliers), with the run's
    fixed settings: img2img inputs, the inputs of models with extra U-Net inputs, and the highres fix (two stages,
    library/highres_fix.py). Returns the images and, with `keep_first`, the highres fix's first-stage images."""

    models: SDModels
    zero_terminal_snr: bool
    clip_skip: int | None
    lengths: dict
    init_images: list
    inputs: dict
    fix: HighresFix | None = None
    keep_first: bool = False
    vae_batch_size: float | None = None  # --vae_batch_size as given
    control: guidance.ControlNetRun | None = None
    own_guides: dict | None = None  # a prompt's --cn path -> its guide image
    control_second_stage: bool = True  # not --highres_fix_disable_control_net
    start_noise: guidance.StartNoise | None = None  # kohya's noise options, for the stages that start from noise
    weight_normalization: str = "original"  # --emb_normalize_mode

    def control_for(self, batch: list[ImageJob], size: tuple[int, int]) -> guidance.ControlGuidance | None:
        if self.control is None:
            return None
        sources = [self.control.sources(job.index, (self.own_guides or {}).get(job.prompt.condition_image))
                   for job in batch]
        return self.control.guidance(sources, size)

    def vae_chunk(self, n: int) -> int:
        """Images the VAE takes at a time in a batch of n (kohya: the batch; a fraction of it below 1)."""
        given = self.vae_batch_size
        return n if given is None else max(1, int(n * given)) if given < 1 else int(given)

    def __call__(self, batch: list[ImageJob]) -> tuple[list, list | None]:
        prompts, seeds = [job.prompt for job in batch], [job.seed for job in batch]
        init = [self.init_images[job.index % len(self.init_images)] for job in batch] if self.init_images else None
        extra = {name: [self.inputs[job.index][name] for job in batch] for name in self.inputs[batch[0].index]}
        size = (prompts[0].width, prompts[0].height)
        noise = self.start_noise if init is None else None  # (img2img starts from an image)
        if self.fix is None:
            return self.generate(prompts, seeds, init_images=init, control=self.control_for(batch, size),
                                 start_noise=noise, **extra), None
        fix, first_latents = self.fix, self.fix.first_stage_latents
        firsts = [fix.first_stage(p, from_image=init is not None) for p in prompts]
        if init is not None:  # the input reduced to the first stage's size (kohya resizes its inputs with LANCZOS)
            init = [image.resize((firsts[0].width, firsts[0].height), Image.Resampling.LANCZOS) for image in init]
        first = self.generate(firsts, seeds, init_images=init, output_type="latent" if first_latents else "pil",
                              control=self.control_for(batch, (firsts[0].width, firsts[0].height)), start_noise=noise)
        kept = None
        if self.keep_first:
            kept = sampling.latents_to_images(self.models, first, chunk=self.vae_chunk(len(batch))) if first_latents \
                else first
        width, height = prompts[0].width, prompts[0].height
        enlarged = fix.enlarge(first, width=width, height=height, vae=self.models.vae, dtype=self.models.unet.dtype,
                               vae_batch_size=self.vae_chunk(len(batch)))
        start = {"init_latents": enlarged} if isinstance(enlarged, torch.Tensor) else {"init_images": enlarged}
        control = self.control_for(batch, size) if self.control_second_stage else None
        return self.generate(prompts, [seed + 1 for seed in seeds], control=control, **start), kept  # kohya: seed + 1

    def generate(self, prompts: list[SamplePrompt], seeds: list[int], **kwargs) -> list:
        first = prompts[0]
        return sampling.generate_images(
            prompts, seeds, models=self.models,
            scheduler=samplers.make_scheduler(first.sampler, self.models.prediction_type.value,
                                              zero_terminal_snr=self.zero_terminal_snr),
            encoding=CaptionEncoding(clip_skip=self.clip_skip, weighted=True,
                                     max_token_length=self.lengths[first.prompt, first.negative_prompt],
                                     weight_normalization=self.weight_normalization),
            progress=True, vae_batch_size=self.vae_chunk(len(prompts)), **kwargs)


def settle(prompt: SamplePrompt, init_image, *, strength: float | None, multipliers: list[float],
           default_strength: float = 0.8, img2img: bool = False) -> SamplePrompt:
    """The prompt with what the run decides filled in: img2img size (the input's) and strength (`--t`, else
    `--strength`, else `default_strength`: kohya's 0.8 for img2img; 1.0, diffusers' default, for an inpainting
    model, which sees the unmasked image in its own inputs), and one multiplier per applied network (`--am` values,
    the last repeated as in kohya; else `--network_mul`). `img2img`: the image is img2img without an input image
    too (the highres fix's second stage)."""
    if init_image is not None:
        prompt = replace(prompt, width=init_image.width, height=init_image.height)
    if init_image is not None or img2img:
        prompt = replace(prompt, strength=prompt.strength or strength or default_strength)
    if multipliers:
        muls = list(prompt.network_multipliers or multipliers)
        prompt = replace(prompt, network_multipliers=tuple(muls + muls[-1:] * (len(multipliers) - len(muls))))
    return prompt


def token_lengths(prompts: list[SamplePrompt], tokenizer, fixed: int | None) -> dict[tuple[str, str], int]:
    """(prompt, negative prompt) -> the conditioning length: `fixed` (--max_token_length), or the 75 / 150 / 225
    tokens that the longer of the two needs. Part of the batch key, so an image never depends on its batch."""
    lengths = {}
    for prompt in prompts:
        texts = [prompt.prompt, prompt.negative_prompt]
        lengths[tuple(texts)] = length = fixed or fitting_token_length(tokenizer, texts, weighted=True)
        longest = max(token_count(tokenizer, text, weighted=True) for text in texts)
        if longest > length:
            logger.warning("%s: %d tokens, cut to %d (at most 225)", prompt.where or "prompt", longest, length)
    return lengths


def png_text(prompt: SamplePrompt, seed: int, args: argparse.Namespace, *, fix: HighresFix | None = None,
             from_image: bool = False) -> str:
    """WebUI's "parameters" text. A highres-fixed image is written as WebUI writes its hires fix (the first pass's
    steps and size, then "Hires resize" to the full size, "Hires steps", "Hires upscaler", and the second pass's
    "Denoising strength"), so PNG Info shows both stages."""
    extra = {}
    shown = prompt
    if fix is not None:
        shown = fix.first_stage(prompt, from_image=from_image)
        if shown.strength is not None:
            extra["First pass denoising strength"] = shown.strength
    if prompt.strength is not None:
        extra["Denoising strength"] = prompt.strength
    if prompt.negative_scale is not None:
        extra["Negative scale"] = prompt.negative_scale  # not a WebUI field (kohya's PNGs say negative-scale)
    if args.clip_skip and args.clip_skip > 1:
        extra["Clip skip"] = args.clip_skip
    if fix is not None:
        extra["Hires resize"] = f"{prompt.width}x{prompt.height}"
        extra["Hires steps"] = prompt.steps
        extra["Hires upscaler"] = (args.highres_fix_upscaler if fix.upscaler is not None else
                                   "Latent (bicubic)" if fix.latents_upscaling else "Lanczos")
    return sampling.webui_parameters(shown, sampler=samplers.WEBUI_SAMPLER_NAMES.get(prompt.sampler, prompt.sampler),
                                     seed=seed, model_name=Path(args.ckpt).stem, extra=extra)
