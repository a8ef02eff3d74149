"""Image generation shared by the trainers' sample images and (later) gen_img.py: prompt files, sampler names,
and one `generate` function.

Prompt files (kohya's formats): `.txt` — one prompt per line, `#` comments, per-line options after ` --`:
`--n` negative prompt, `--w` / `--h` size, `--d` seed, `--l` CFG scale, `--s` steps, `--ss` sampler;
`.toml` — `[prompt]` defaults plus `[[prompt.subset]]` entries; `.json` — a list of strings or of dicts with the
same keys (`prompt`, `negative_prompt`, `width`, `height`, `seed`, `scale`, `sample_steps`, `sample_sampler`).

Sampling uses diffusers' StableDiffusionPipeline with the conditioning computed by `text_encoding` (so clip skip
and 150/225-token prompts behave exactly as in training) and a scheduler chosen by kohya's sampler names.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

SAMPLERS = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
}
SAMPLER_ALIASES = {"k_lms": "lms", "k_euler": "euler", "k_euler_a": "euler_a", "k_dpm_2": "dpm_2",
                   "k_dpm_2_a": "dpm_2_a"}


class PromptFileError(ValueError):
    """A malformed prompt file; the message names the file and line."""


@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    seed: int | None = None
    scale: float = 7.5
    steps: int = 30
    sampler: str | None = None  # None: the run's --sample_sampler


def sampler_name(name: str) -> str:
    key = SAMPLER_ALIASES.get(name.lower(), name.lower())
    if key not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(list(SAMPLERS) + list(SAMPLER_ALIASES))}")
    return key


def make_scheduler(name: str, prediction_type: str, *, zero_terminal_snr: bool = False):
    """A diffusers scheduler for a kohya sampler name, with SD's training noise schedule."""
    import diffusers

    class_name, extra = SAMPLERS[sampler_name(name)]
    config = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
              "beta_schedule": "scaled_linear", "prediction_type": prediction_type, **extra}
    if class_name in ("DDIMScheduler", "PNDMScheduler"):
        config.update(set_alpha_to_one=False, steps_offset=1)
    if class_name == "DDIMScheduler":
        config["clip_sample"] = False
    if zero_terminal_snr:
        config["rescale_betas_zero_snr"] = True
        config["timestep_spacing"] = "trailing"
    return getattr(diffusers, class_name).from_config(config)


def _round_size(value: int) -> int:
    # kohya rounds sample sizes down to a multiple of 8 (the VAE's factor), at least 64.
    return max(64, int(value) // 8 * 8)


_OPTION = re.compile(r"^(n|w|h|d|l|s|ss|cn|g|ctr|rcfg|fs)\s+(.*)$", re.S)


def parse_prompt_line(line: str, defaults: SamplePrompt, *, where: str) -> SamplePrompt:
    parts = line.split(" --")
    prompt = replace(defaults, prompt=parts[0].strip())
    for part in parts[1:]:
        match = _OPTION.match(part.strip())
        if not match:
            raise PromptFileError(f"{where}: unknown option '--{part.strip().split(' ')[0]}' (known: --n --w --h "
                                  "--d --l --s --ss)")
        key, value = match.group(1), match.group(2).strip()
        try:
            if key == "n":
                prompt = replace(prompt, negative_prompt=value)
            elif key == "w":
                prompt = replace(prompt, width=_round_size(int(value)))
            elif key == "h":
                prompt = replace(prompt, height=_round_size(int(value)))
            elif key == "d":
                prompt = replace(prompt, seed=int(value))
            elif key == "l":
                prompt = replace(prompt, scale=float(value))
            elif key == "s":
                prompt = replace(prompt, steps=min(max(int(value), 1), 1000))
            elif key == "ss":
                prompt = replace(prompt, sampler=sampler_name(value))
            # cn / g / ctr / rcfg / fs belong to ControlNet / other model families: accepted, ignored here.
        except ValueError as e:
            raise PromptFileError(f"{where}: bad value for --{key}: {value!r} ({e})") from None
    return prompt


def _from_dict(entry: dict, defaults: SamplePrompt, where: str) -> SamplePrompt:
    fields = {"prompt": "prompt", "negative_prompt": "negative_prompt", "width": "width", "height": "height",
              "seed": "seed", "scale": "scale", "sample_steps": "steps", "sample_sampler": "sampler"}
    unknown = sorted(set(entry) - set(fields) - {"enum"})
    if unknown:
        raise PromptFileError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(fields)})")
    values = {fields[k]: v for k, v in entry.items() if k in fields}
    if "width" in values:
        values["width"] = _round_size(values["width"])
    if "height" in values:
        values["height"] = _round_size(values["height"])
    if values.get("sampler"):
        values["sampler"] = sampler_name(values["sampler"])
    if not str(values.get("prompt", defaults.prompt)).strip():
        raise PromptFileError(f"{where}: empty prompt")
    return replace(defaults, **values)


def load_prompts(path: str | Path, defaults: SamplePrompt = SamplePrompt("")) -> list[SamplePrompt]:
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"{path}: no such prompt file")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        import toml

        try:
            data = toml.loads(text)
        except toml.TomlDecodeError as e:
            raise PromptFileError(f"{path}: invalid TOML: {e}") from None
        section = data.get("prompt", {})
        subsets = section.pop("subset", [])
        base = _from_dict({**section, "prompt": section.get("prompt", "x")}, defaults, f"{path} [prompt]")
        return [_from_dict(entry, base, f"{path} subset {i + 1}") for i, entry in enumerate(subsets)]
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        if not isinstance(data, list):
            raise PromptFileError(f"{path}: expected a JSON list of prompts")
        return [replace(defaults, prompt=entry) if isinstance(entry, str) else
                _from_dict(entry, defaults, f"{path} entry {i + 1}") for i, entry in enumerate(data)]
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            prompts.append(parse_prompt_line(line, defaults, where=f"{path} line {number}"))
    return prompts


@torch.no_grad()
def generate(prompt: SamplePrompt, *, unet, vae, text_encoder, tokenizer, scheduler, seed: int,
             clip_skip: int | None = None, max_token_length: int | None = None, vae_scale_factor: float = 0.18215):
    """One image (PIL) for a prompt, reproducible for a seed."""
    return generate_batch(prompt, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          scheduler=scheduler, seeds=[seed], clip_skip=clip_skip, max_token_length=max_token_length,
                          vae_scale_factor=vae_scale_factor)[0]


@torch.no_grad()
def generate_batch(prompt: SamplePrompt, *, unet, vae, text_encoder, tokenizer, scheduler, seeds: list[int],
                   clip_skip: int | None = None, max_token_length: int | None = None,
                   vae_scale_factor: float = 0.18215) -> list:
    """One image per seed for the same prompt, in one batch. Each image's noise comes from its own seed's
    generator, so an image depends on its seed, not on which batch it was made in."""
    from diffusers import StableDiffusionPipeline

    from library.text_encoding import encode, tokenize

    device = unet.device
    ids = tokenize(tokenizer, [prompt.prompt, prompt.negative_prompt], max_token_length)
    states = encode(text_encoder, ids, clip_skip=clip_skip).to(device, unet.dtype)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.vae.config.scaling_factor = vae_scale_factor
    pipe.set_progress_bar_config(disable=True)
    n = len(seeds)
    generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
    return pipe(prompt_embeds=states[:1].expand(n, -1, -1), negative_prompt_embeds=states[1:].expand(n, -1, -1),
                width=prompt.width, height=prompt.height, num_inference_steps=prompt.steps,
                guidance_scale=prompt.scale, generator=generators if n > 1 else generators[0]).images


def webui_parameters(prompt: SamplePrompt, *, sampler: str, seed: int, model_name: str = "") -> str:
    """The PNG "parameters" text WebUI's PNG Info reads."""
    lines = [prompt.prompt]
    if prompt.negative_prompt:
        lines.append(f"Negative prompt: {prompt.negative_prompt}")
    fields = [f"Steps: {prompt.steps}", f"Sampler: {sampler}", f"CFG scale: {prompt.scale}", f"Seed: {seed}",
              f"Size: {prompt.width}x{prompt.height}"]
    if model_name:
        fields.append(f"Model: {model_name}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def save_png(image, path: Path, parameters: str) -> Path:
    from PIL.PngImagePlugin import PngInfo

    from library.atomic_files import atomic_file

    info = PngInfo()
    info.add_text("parameters", parameters)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


class TrainingSampler:
    """Sample images during training: every prompt of the prompt file, saved as
    `<output_dir>/sample/<name>_<e000005|000500>_<idx>_<time>_<seed>.png` (kohya's names) and sent to
    TensorBoard. Prompts without `--d` get the seed (run seed + index), so samples are comparable across saves."""

    def __init__(self, prompts: list[SamplePrompt], *, models, default_sampler: str, prediction_type: str,
                 output_dir: Path, output_name: str, seed: int, clip_skip: int | None, max_token_length: int | None,
                 vae_scale_factor: float, zero_terminal_snr: bool = False, model_name: str = ""):
        self.prompts, self.models = prompts, models
        self.default_sampler = sampler_name(default_sampler)
        self.prediction_type, self.zero_terminal_snr = prediction_type, zero_terminal_snr
        self.output_dir, self.output_name, self.seed = Path(output_dir), output_name, seed
        self.clip_skip, self.max_token_length, self.vae_scale_factor = clip_skip, max_token_length, vae_scale_factor
        self.model_name = model_name

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
                image = generate(prompt, unet=self.models.unet, vae=self.models.vae,
                                 text_encoder=self.models.text_encoder, tokenizer=self.models.tokenizer,
                                 scheduler=make_scheduler(name, self.prediction_type,
                                                          zero_terminal_snr=self.zero_terminal_snr),
                                 seed=seed, clip_skip=self.clip_skip, max_token_length=self.max_token_length,
                                 vae_scale_factor=self.vae_scale_factor)
                path = self.output_dir / "sample" / f"{self.output_name}_{tag}_{index:02d}_{stamp}_{seed}.png"
                paths.append(save_png(image, path, webui_parameters(prompt, sampler=name, seed=seed,
                                                                    model_name=self.model_name)))
                if run_log is not None:
                    import numpy as np

                    run_log.add_image(f"sample/{index:02d}", np.asarray(image), step)
        finally:
            if trainable is not None and was_training:
                trainable.train()
        return paths
