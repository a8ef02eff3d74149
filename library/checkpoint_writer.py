"""Write an `SDCheckpoint` in the layouts users load: kohya's `--save_model_as` values.

- `ckpt`: `torch.save({"state_dict": ..., "epoch": e, "global_step": s})`, original (LDM) key names;
- `safetensors`: original key names plus `modelspec.*` metadata (architecture, prediction type, resolution, ...);
- `diffusers` / `diffusers_safetensors`: a folder of the family's diffusers pipeline (`StableDiffusionPipeline`,
  `StableDiffusionXLInpaintPipeline`, ...: `ModelFamily.pipeline_class`) with `.bin` / `.safetensors` weights.

Original-layout files have the key layout WebUI and ComfyUI expect for the family (SD 1.x text encoder under
`cond_stage_model.transformer.text_model.*`, SD 2.x in the OpenCLIP layout with fused q/k/v). Diffusers folders
store the text encoder with `text_model.`-prefixed keys, which transformers 4.x and 5.x both read.

Safetensors outputs are streamed one tensor at a time (peak memory ~ one tensor); a tensor that only changes its
name (or shape) between layouts, as most do, is copied file to file without being loaded at all. Every output is
written to a temporary name and renamed into place, so a crash never leaves a half-written model.
"""

from __future__ import annotations

import enum
import importlib.metadata
import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from library.atomic_files import OutputPathError, atomic_directory, atomic_file
from library.families import TextEncoderKind
from library.key_maps import LDM_SCHEDULE_BUFFERS, join_diffusers
from library.safetensors_io import TensorEntry, write_safetensors
from library.sd_checkpoint import EXTRAS_FILE, SDCheckpoint, weight_files
from library.tensor_files import LazyTensor

logger = logging.getLogger(__name__)

MODELSPEC_VERSION = "1.0.1"
# kohya writes this implementation id for SD-format (original layout) checkpoints.
ORIGINAL_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"


class SaveFormat(enum.Enum):
    CKPT = "ckpt"
    SAFETENSORS = "safetensors"
    DIFFUSERS = "diffusers"
    DIFFUSERS_SAFETENSORS = "diffusers_safetensors"

    @property
    def is_diffusers(self) -> bool:
        return self in (SaveFormat.DIFFUSERS, SaveFormat.DIFFUSERS_SAFETENSORS)

    @classmethod
    def from_path(cls, path: Path, *, use_safetensors: bool = False) -> "SaveFormat":
        """kohya's convert tool infers the format from the output path: a file suffix, or a folder."""
        suffix = path.suffix.lower()
        if suffix == ".safetensors":
            return cls.SAFETENSORS
        if suffix in (".ckpt", ".pt", ".pth"):
            return cls.CKPT
        if suffix:
            raise ValueError(f"{path}: cannot tell the output format from the suffix {suffix!r}; use .safetensors, "
                             ".ckpt, or a folder name without a suffix for diffusers")
        return cls.DIFFUSERS_SAFETENSORS if use_safetensors else cls.DIFFUSERS


SAVE_DTYPES = {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_save_precision(text: str | None) -> torch.dtype | None:
    if text is None:
        return None
    try:
        return SAVE_DTYPES[text]
    except KeyError:
        raise ValueError(f"--save_precision {text!r}: expected one of float, fp16, bf16") from None


def _cast(lazy: LazyTensor, dtype: torch.dtype | None) -> LazyTensor:
    if dtype is None or not lazy.dtype.is_floating_point or lazy.dtype == dtype:
        return lazy
    return LazyTensor(lazy.shape, dtype, lambda: lazy.load().to(dtype))


# ----------------------------------------------------------------------------------------------------------
# Original layout


def original_tensors(checkpoint: SDCheckpoint, dtype: torch.dtype | None = None) -> dict[str, LazyTensor]:
    """Every tensor of the original layout, in table order, then the carried-over extras."""
    out: dict[str, LazyTensor] = {}
    for component, table in checkpoint.tables().items():
        tensors = checkpoint.tensors[component]
        for mapping in table.mappings:
            parts = [tensors[name] for name in mapping.diffusers]
            lazy = LazyTensor(mapping.original_shape, parts[0].dtype,
                              lambda m=mapping, p=parts: join_diffusers(m, [x.load() for x in p]),
                              raw=parts[0].raw if mapping.same_bytes else None)
            out[mapping.original] = _cast(lazy, dtype)
    for key, lazy in checkpoint.extras.items():
        # Schedule buffers keep their precision: they are constants, and fp16 would only lose digits.
        out[key] = lazy if key in LDM_SCHEDULE_BUFFERS else _cast(lazy, dtype)
    for slot in checkpoint.family.text_encoders:
        if slot.kind is TextEncoderKind.OPENCLIP_H and slot.original_prefix + "text_projection" not in out:
            logger.info("SD 2.x text encoder written without the unused last layer and text_projection (the source "
                        "had none); WebUI and ComfyUI load such files, they use the penultimate layer")
    for part in checkpoint.family.original_parts:
        if not any(key.startswith(part.prefix) for key in checkpoint.extras):
            # e.g. an SD 2.x depth model from a diffusers folder: its MiDaS weights are in another layout, elsewhere.
            logger.warning("%s written without %s* (the source has none): %s", checkpoint.family.description.split(
                " (")[0], part.prefix, part.what)
    return out


def modelspec_date() -> str:
    """modelspec.date: when the file is written (UTC, whole seconds, ISO 8601), as kohya and SAI write it."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def modelspec_keys(family, prediction_type, *, kind: str = "", implementation: str = ORIGINAL_IMPLEMENTATION,
                   resolution: str | None = None) -> dict[str, str]:
    """The modelspec keys that describe a saved model (checkpoint, or with `kind` "lora", "textual-inversion",
    "controlnet" an add-on for that family); the resolution defaults to the family's."""
    size = family.default_resolution
    return {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": family.modelspec_architecture + (f"/{kind}" if kind else ""),
        "modelspec.implementation": implementation,
        "modelspec.prediction_type": prediction_type.modelspec_name,
        "modelspec.resolution": resolution or f"{size}x{size}",
        "modelspec.date": modelspec_date(),
    }


def modelspec_metadata(checkpoint: SDCheckpoint, *, title: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Source metadata carried over, with the modelspec keys that describe this model set anew."""
    metadata = dict(checkpoint.metadata)
    metadata.update(modelspec_keys(checkpoint.family, checkpoint.prediction_type))
    metadata.setdefault("modelspec.title", title)
    metadata.update(extra or {})
    return metadata


def save_original(checkpoint: SDCheckpoint, dest: Path, fmt: SaveFormat, *, dtype: torch.dtype | None = None,
                  epoch: int | None = None, global_step: int | None = None,
                  metadata: dict[str, str] | None = None, on_tensor=None) -> None:
    """`on_tensor`: called after each tensor is written (a progress bar)."""
    tensors = original_tensors(checkpoint, dtype)
    if fmt is SaveFormat.SAFETENSORS:
        entries = [TensorEntry(k, v.dtype, v.shape, v.load, v.raw) for k, v in tensors.items()]
        write_safetensors(dest, entries, modelspec_metadata(checkpoint, title=dest.stem, extra=metadata),
                          on_tensor=on_tensor)
        return
    if fmt is not SaveFormat.CKPT:
        raise ValueError(f"save_original cannot write {fmt.value}")
    # torch.save needs the whole dict in memory; tensors from a pickle source are memory-mapped, so this costs
    # about one copy of the model.
    state_dict = {k: _ticked(v.load(), on_tensor) for k, v in tensors.items()}
    values = dict(checkpoint.values)
    values["epoch"] = epoch if epoch is not None else values.get("epoch", 0)
    values["global_step"] = global_step if global_step is not None else values.get("global_step", 0)
    with atomic_file(dest) as tmp:
        torch.save({"state_dict": state_dict, **values}, tmp)


# ----------------------------------------------------------------------------------------------------------
# Diffusers folders


def _model_index(checkpoint: SDCheckpoint) -> dict:
    diffusers_version = importlib.metadata.version("diffusers")  # importing diffusers itself takes seconds

    family = checkpoint.family
    index = {"_class_name": family.pipeline_class, "_diffusers_version": diffusers_version,
             **{name: [None, None] for name in family.pipeline_absent}, **dict(family.pipeline_flags),
             "scheduler": ["diffusers", checkpoint.configs.scheduler["_class_name"]],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    for slot in family.text_encoders:
        index[slot.component] = ["transformers", slot.kind.transformers_class]
        index[slot.tokenizer] = ["transformers", "CLIPTokenizer"]
    return dict(sorted(index.items()))


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_config_folder(checkpoint: SDCheckpoint, folder: Path) -> None:
    """Everything of a diffusers pipeline folder except the weights: model_index, configs, tokenizer.

    Also what diffusers' `from_single_file(..., config=folder)` needs to read one of our single files offline."""
    diffusers_version = importlib.metadata.version("diffusers")  # importing diffusers itself takes seconds
    from transformers import CLIPTextConfig

    from library.model_loading import load_tokenizer
    from library.tokenizer import save_tokenizer

    _write_json(folder / "model_index.json", _model_index(checkpoint))
    for part in ("unet", "vae"):
        _write_json(folder / part / "config.json",
                    dict(_complete_config(part, getattr(checkpoint.configs, part)), _diffusers_version=diffusers_version))
    _write_json(folder / "scheduler" / "scheduler_config.json",
                dict(checkpoint.configs.scheduler, _diffusers_version=diffusers_version))
    for slot in checkpoint.family.text_encoders:
        te_config = {k: v for k, v in checkpoint.configs.text_encoders[slot.component].items() if not k.startswith("_")}
        te_config["architectures"] = [slot.kind.transformers_class]
        CLIPTextConfig(**te_config).save_pretrained(folder / slot.component)
        save_tokenizer(load_tokenizer(slot), folder / slot.tokenizer)


def _complete_config(component: str, config: dict) -> dict:
    """The config with every default spelled out, as diffusers' own save_pretrained writes it, so a folder's
    config does not depend on which layout the model came from (built once, then read from `meta_model_cache`)."""
    from library.meta_model_cache import cached

    def complete() -> dict:
        from diffusers import AutoencoderKL, UNet2DConditionModel

        cls = UNet2DConditionModel if component == "unet" else AutoencoderKL
        with torch.device("meta"):
            full = dict(cls.from_config(config).config)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in full.items()
                if not k.startswith("_") or k == "_class_name"}

    return cached({"fact": "complete_config", "component": component, "config": config}, complete)


def save_diffusers(checkpoint: SDCheckpoint, dest: Path, fmt: SaveFormat, *, dtype: torch.dtype | None = None,
                   on_tensor=None) -> None:
    use_safetensors = fmt is SaveFormat.DIFFUSERS_SAFETENSORS
    if dest.is_dir() and any(dest.iterdir()) and not (dest / "model_index.json").is_file():
        # The folder is replaced as a whole; never do that to a folder that is not a model we could have written.
        raise OutputPathError(f"{dest}: refusing to replace this folder: it is not empty and not a diffusers model "
                              "(no model_index.json). Choose a new folder name for the output.")
    with atomic_directory(dest) as tmp:
        write_config_folder(checkpoint, tmp)
        for component in checkpoint.family.components:
            tensors = {name: _cast(lazy, dtype) for name, lazy in checkpoint.tensors[component].items()}
            if component not in ("unet", "vae"):
                # transformers 4.x only reads `text_model.`-prefixed CLIPTextModel keys (5.x reads both);
                # CLIPTextModelWithProjection has that level already.
                tensors = {(name if name.startswith("text_model.") or name == "text_projection.weight"
                            else "text_model." + name): lazy for name, lazy in tensors.items()}
            safetensors_name, bin_name = weight_files(component)
            path = tmp / component / (safetensors_name if use_safetensors else bin_name)
            _write_tensors(path, tensors, use_safetensors, metadata={"format": "pt"}, on_tensor=on_tensor)
        if checkpoint.extras:
            extras = {k: (v if k in LDM_SCHEDULE_BUFFERS else _cast(v, dtype)) for k, v in checkpoint.extras.items()}
            # Not part of any diffusers model: kept beside them so converting back to a single file restores them.
            _write_tensors(tmp / EXTRAS_FILE, extras, True, metadata={
                "format": "pt", "description": "original-layout tensors without a diffusers place "
                                                "(restored when converting back to a single file)"},
                           on_tensor=on_tensor)


def _write_tensors(path: Path, tensors: dict[str, LazyTensor], use_safetensors: bool, metadata: dict[str, str],
                   on_tensor=None) -> None:
    if use_safetensors:
        write_safetensors(path, [TensorEntry(k, v.dtype, v.shape, v.load, v.raw) for k, v in tensors.items()],
                          metadata, on_tensor=on_tensor)
    else:
        torch.save({k: _ticked(v.load().contiguous(), on_tensor) for k, v in tensors.items()}, path)


def _ticked(tensor: torch.Tensor, on_tensor) -> torch.Tensor:
    if on_tensor is not None:
        on_tensor()
    return tensor


def save_checkpoint(checkpoint: SDCheckpoint, dest: str | Path, fmt: SaveFormat, *, dtype: torch.dtype | None = None,
                    epoch: int | None = None, global_step: int | None = None,
                    metadata: dict[str, str] | None = None, progress: bool = False) -> Path:
    """Write `checkpoint` to `dest` in `fmt`; returns the path written. Check the path first with
    `atomic_files.check_writable_output`. With `progress`, a bar with ETA counts the tensors written."""
    dest = Path(dest)
    started = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        total = (sum(len(t) for t in checkpoint.tensors.values()) + len(checkpoint.extras) if fmt.is_diffusers
                 else len(original_tensors(checkpoint)))  # (the original layout fuses some tensors)
        bar = tqdm(total=total, desc=f"writing {dest.name}", unit="tensor")
    tick = (lambda: bar.update(1)) if bar is not None else None  # noqa: E731
    try:
        if fmt.is_diffusers:
            save_diffusers(checkpoint, dest, fmt, dtype=dtype, on_tensor=tick)
        else:
            save_original(checkpoint, dest, fmt, dtype=dtype, epoch=epoch, global_step=global_step,
                          metadata=metadata, on_tensor=tick)
    finally:
        if bar is not None:
            bar.close()
    logger.info("wrote %s (%s) in %.1f s", dest, fmt.value, time.perf_counter() - started)
    return dest
