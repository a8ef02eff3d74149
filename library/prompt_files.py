"""Sample-prompt files in kohya's formats, read into `SamplePrompt`s for the trainers' sample images and gen_img.py.

`.txt` — one prompt per line, `#` comments, per-line options after ` --`:
`--n` negative prompt, `--w` / `--h` size, `--d` seed (gen_img: a comma list, one per image), `--l` CFG scale,
`--nl` kohya's negative scale, `--s` steps, `--ss` sampler, and gen_img's `--t` img2img strength, `--am` network
multipliers, `--f` file name, `--c` kohya's CLIP prompt (recorded in the PNG, as kohya's gen_img does),
SDXL's `--ow` / `--oh` original size, `--nw` / `--nh` the negative prompt's original size, `--ct` / `--cl` crop,
and `--cn` (kohya's ControlNet image): gen_img's ControlNet guide image, or the depth map / condition image of a
depth or extra-channel model's image;
`.toml` — `[prompt]` defaults plus `[[prompt.subset]]` entries; `.json` — a list of strings or of dicts with the
same keys (`prompt`, `negative_prompt`, `width`, `height`, `seed`, `scale`, `sample_steps`, `sample_sampler`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from library.samplers import sampler_name

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
    sampler: str | None = None  # None: the run's --sample_sampler / gen_img's --sampler
    # gen_img.py's per-prompt options (the trainers ignore them)
    extra_seeds: tuple[int, ...] = ()  # `--d 1,2,3`: the seeds after `seed`, one per further image of the prompt
    strength: float | None = None  # `--t`: img2img denoising strength (None: the run's --strength)
    network_multipliers: tuple[float, ...] | None = None  # `--am`: one per network (None: the run's --network_mul)
    filename: str | None = None  # `--f`: output file name
    # `--nl`: kohya's negative scale (None: plain CFG with the negative prompt); `--nl none` turns the run's off
    negative_scale: float | None = None
    # `--c`: kohya's CLIP-guidance prompt; its gen_img only records it in the PNG ("clip-prompt"), and so do we
    clip_prompt: str | None = None
    # `--cn`: kohya's ControlNet image option: gen_img's ControlNet guide image, or the image of a model with
    # condition inputs: a depth model's depth map, an extra-channel model's condition image (gen_img and training
    # samples; gen_img refuses it where nothing takes it)
    condition_image: str | None = None
    # SDXL's size conditioning (None: the image size; crop 0): `--ow --oh`, `--nw --nh` (negative), `--ct --cl`
    original_width: int | None = None
    original_height: int | None = None
    negative_original_width: int | None = None
    negative_original_height: int | None = None
    crop_top: int | None = None
    crop_left: int | None = None
    where: str = field(default="", compare=False)  # "prompts.txt line 3", for messages about this prompt

    @property
    def sets_size_conditioning(self) -> bool:
        return any(v is not None for v in (self.original_width, self.original_height, self.negative_original_width,
                                           self.negative_original_height, self.crop_top, self.crop_left))

    @property
    def seeds(self) -> tuple[int, ...]:
        """The seeds `--d` gave (empty: none)."""
        return () if self.seed is None else (self.seed, *self.extra_seeds)


def _round_size(value: int) -> int:
    # kohya rounds sample sizes down to a multiple of 8 (the VAE's factor), at least 64.
    return max(64, int(value) // 8 * 8)


_OPTION = re.compile(r"^(\w+)(?:\s+(.*))?$", re.S)
# Options of kohya's gen_img.py / other model families that this suite does not implement: refused, naming the
# feature, rather than silently giving another image than the file asks for.
_UNSUPPORTED = {"dsd1": "Deep Shrink", "dst1": "Deep Shrink", "dsd2": "Deep Shrink", "dst2": "Deep Shrink",
                "dsr": "Deep Shrink", "glt": "Gradual Latent", "glr": "Gradual Latent", "gle": "Gradual Latent",
                "gls": "Gradual Latent", "glsn": "Gradual Latent", "glus": "Gradual Latent"}
# Options of other model families' sample prompts (guidance, ...): accepted, ignored here.
_IGNORED = ("g", "ctr", "rcfg", "fs")
KNOWN_OPTIONS = "--n --w --h --d --l --nl --s --ss --t --am --f --c --cn --ow --oh --nw --nh --ct --cl"
_SIZE_OPTIONS = {"ow": "original_width", "oh": "original_height", "nw": "negative_original_width",
                 "nh": "negative_original_height", "ct": "crop_top", "cl": "crop_left"}


def parse_prompt_line(line: str, defaults: SamplePrompt, *, where: str) -> SamplePrompt:
    parts = line.split(" --")
    prompt = replace(defaults, prompt=parts[0].strip(), where=where)
    for part in parts[1:]:
        match = _OPTION.match(part.strip())
        key = match.group(1).lower() if match else part.strip().split(" ")[0]
        value = (match.group(2) or "").strip() if match else ""
        if key in _UNSUPPORTED:
            raise PromptFileError(f"{where}: --{key} ({_UNSUPPORTED[key]}, a kohya gen_img option) is not "
                                  f"supported here; remove it (supported: {KNOWN_OPTIONS})")
        if key in _IGNORED:
            continue
        if not match or key not in ("n", "w", "h", "d", "l", "nl", "s", "ss", "t", "am", "f", "c", "cn",
                                    *_SIZE_OPTIONS):
            raise PromptFileError(f"{where}: unknown option '--{key}' (known: {KNOWN_OPTIONS})")
        if not value:
            raise PromptFileError(f"{where}: --{key} needs a value")
        try:
            prompt = replace(prompt, **_option_fields(key, value))
        except ValueError as e:
            raise PromptFileError(f"{where}: bad value for --{key}: {value!r} ({e})") from None
    if prompt.negative_scale is not None and prompt.scale <= 1 and any(
            p.strip().lower().startswith("nl ") for p in parts[1:]):
        # checked here, where the line is read (a training run's samples would otherwise fail mid-run)
        raise PromptFileError(f"{where}: --nl (negative scale) works through classifier-free guidance, which a CFG "
                              f"scale of {prompt.scale} turns off; give --l above 1")
    return prompt


def _option_fields(key: str, value: str) -> dict:
    """The SamplePrompt fields one per-line option sets."""
    if key == "n":
        return {"negative_prompt": value}
    if key in ("w", "h"):
        return {"width" if key == "w" else "height": _round_size(int(value))}
    if key == "d":  # kohya's gen_img takes a comma list: one seed per image of the prompt
        seeds = [int(v) for v in value.split(",")]
        return {"seed": seeds[0], "extra_seeds": tuple(seeds[1:])}
    if key == "l":
        return {"scale": float(value)}
    if key == "nl":  # kohya: a number, or none (no negative scale for this prompt)
        return {"negative_scale": None if value.lower() == "none" else float(value)}
    if key == "c":
        return {"clip_prompt": value}
    if key == "s":
        return {"steps": min(max(int(value), 1), 1000)}
    if key == "ss":
        return {"sampler": sampler_name(value)}
    if key == "t":
        return {"strength": _strength(float(value))}
    if key == "am":
        return {"network_multipliers": tuple(float(v) for v in value.split(","))}
    if key in _SIZE_OPTIONS:
        number = int(value)
        if number < 0:
            raise ValueError("sizes and crops are pixel counts, not negative")
        return {_SIZE_OPTIONS[key]: number}
    if key == "cn":
        return {"condition_image": value}
    return {"filename": value}  # "f"


def _strength(value: float) -> float:
    if not 0.0 < value <= 1.0:
        raise ValueError("img2img strength must be in (0, 1]")
    return value


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
    return replace(defaults, **values, where=where)


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
