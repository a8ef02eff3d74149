"""Turn an `SDCheckpoint` into torch models (and back), and swap in a separate VAE (`--vae`).

Models are created without allocating random weights (accelerate's `init_empty_weights`) and then receive the
checkpoint's tensors with `load_state_dict(strict=True, assign=True)`: every key must be present and every shape
must match, so a model is never half-loaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from library import key_maps
from library.families import ModelFamily, PredictionType, TextEncoderKind, TextEncoderSlot
from library.key_maps import key_table, shape_compatible, split_original
from library.sd_checkpoint import SDCheckpoint, _listing, _load_json, _open_component, _validated_component
from library.tensor_files import CheckpointError, LazyTensor, open_tensor_file
from library.tokenizer import PadStyle, load_clip_tokenizer

logger = logging.getLogger(__name__)


def load_tokenizer(slot: TextEncoderSlot):
    """The tokenizer of one text encoder. OpenCLIP-trained encoders (SD 2.x, SDXL's second) saw prompts padded
    with id 0, CLIP ViT-L (SD 1.x, SDXL's first) with EOS."""
    return load_clip_tokenizer(PadStyle.ZERO if slot.kind.openclip_layout else PadStyle.EOS)


def load_tokenizers(family: ModelFamily) -> list:
    return [load_tokenizer(slot) for slot in family.text_encoders]


class TextModelShim(torch.nn.Module):
    """The text encoder seen through a `text_model` attribute, as transformers 4 laid CLIPTextModel out, so that
    module-path-based names (external LoRA modules) come out as `lora_te_text_model_encoder_...`, the names every
    loader expects. Holds the same modules (no copy)."""

    def __init__(self, text_encoder: torch.nn.Module):
        super().__init__()
        self.text_model = getattr(text_encoder, "text_model", text_encoder)


@dataclass
class SDModels:
    family: ModelFamily
    prediction_type: PredictionType
    unet: torch.nn.Module | None  # None: not loaded (instantiate_models' `components`)
    vae: torch.nn.Module | None
    text_encoders: list[torch.nn.Module | None]  # in `family.text_encoders` order
    tokenizers: list  # one per text encoder, same order
    scheduler_config: dict

    def component(self, name: str) -> torch.nn.Module:
        """A model by its pipeline component name ("unet", "vae", "text_encoder", "text_encoder_2")."""
        if name in ("unet", "vae"):
            return getattr(self, name)
        for slot, model in zip(self.family.text_encoders, self.text_encoders):
            if slot.component == name:
                return model
        raise ValueError(f"{self.family.description} has no component {name!r}")

    @property
    def text_encoder(self) -> torch.nn.Module:
        """The text encoder of a one-encoder family (SD 1.x / 2.x), for code that handles only those."""
        return self._only(self.text_encoders, "text encoder")

    @property
    def tokenizer(self):
        return self._only(self.tokenizers, "tokenizer")

    def _only(self, items: list, what: str):
        if len(items) != 1:
            raise ValueError(f"{self.family.description} has {len(items)} {what}s; this code path handles models "
                             f"with one {what} (SD 1.x / 2.x)")
        return items[0]


def new_text_encoder(kind: TextEncoderKind, config: dict) -> torch.nn.Module:
    """A randomly initialised transformers text encoder of `kind` (CLIPTextModel or CLIPTextModelWithProjection)."""
    import transformers

    return getattr(transformers, kind.transformers_class)(transformers.CLIPTextConfig(**config))


def _empty_model(checkpoint: SDCheckpoint, component: str):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel

    config = checkpoint.configs.of(component)
    with init_empty_weights():  # parameters on the meta device; buffers (position_ids) stay real
        if component == "unet":
            return UNet2DConditionModel.from_config(config)
        if component == "vae":
            return AutoencoderKL.from_config(config)
        return new_text_encoder(checkpoint.family.text_encoder_slot(component).kind, config)


def instantiate_models(checkpoint: SDCheckpoint, *, dtype: torch.dtype = torch.float32,
                       component_dtypes: dict[str, torch.dtype] | None = None,
                       components: tuple[str, ...] | None = None) -> SDModels:
    """Build the UNet, VAE and text encoders with the checkpoint's weights (in `dtype`, or per component).
    `components`: only these (e.g. the text encoders for a tool that encodes captions); the others are None."""
    wanted = checkpoint.family.components if components is None else components
    models = {component: instantiate_component(checkpoint, component, (component_dtypes or {}).get(component, dtype))
              if component in wanted else None for component in checkpoint.family.components}
    family = checkpoint.family
    return SDModels(family, checkpoint.prediction_type, models["unet"], models["vae"],
                    [models[slot.component] for slot in family.text_encoders], load_tokenizers(family),
                    dict(checkpoint.configs.scheduler))


def instantiate_component(checkpoint: SDCheckpoint, component: str, dtype: torch.dtype = torch.float32):
    """One model ("unet", "vae" or a text encoder's component name) with the checkpoint's weights, e.g. only the
    VAE for a tool that encodes latents; identical to the same component from `instantiate_models`."""
    model = _empty_model(checkpoint, component)
    tensors = checkpoint.tensors[component]
    if all(v.dtype == dtype or not v.dtype.is_floating_point for v in tensors.values()):
        state = {k: v.load() for k, v in tensors.items()}
    else:
        # Cast while reading into tensors allocated all at once beforehand: allocating each cast result right
        # after its (larger) source left the freed sources as holes the allocator did not give back, 0.22 copies of
        # the weights on top of the model when loading bf16 from an fp32 SDXL file (docs/benchmarks.md).
        state = {k: torch.empty(v.shape, dtype=dtype if v.dtype.is_floating_point else v.dtype)
                 for k, v in tensors.items()}
        for k, v in tensors.items():
            state[k].copy_(v.load())
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    return model


def checkpoint_from_models(models: SDModels, *, extras: dict[str, torch.Tensor] | None = None,
                           metadata: dict[str, str] | None = None,
                           state_dicts: dict[str, dict[str, torch.Tensor]] | None = None) -> SDCheckpoint:
    """The inverse of `instantiate_models`: wrap live models so the writers can save them. `state_dicts`: the
    weights of some components (name -> state dict) instead of their modules' own (FSDP: the full weights gathered
    from the shards)."""
    from library.families import ModelConfigs

    slots = models.family.text_encoders
    configs = ModelConfigs(
        unet=_public_config(dict(models.unet.config), "UNet2DConditionModel"),
        vae=_public_config(dict(models.vae.config), "AutoencoderKL"),
        text_encoders={slot.component: _text_encoder_config(model) for slot, model in zip(slots, models.text_encoders)},
        scheduler=dict(models.scheduler_config, prediction_type=models.prediction_type.value),
    )
    given = state_dicts or {}
    tensors = {component: {k: LazyTensor.of(v) for k, v in (given[component] if component in given else
                                                             models.component(component).state_dict()).items()
                           if not k.endswith("position_ids")}  # a buffer transformers recreates
               for component in models.family.components}
    return SDCheckpoint(models.family, models.prediction_type, configs, tensors,
                        extras={k: LazyTensor.of(v) for k, v in (extras or {}).items()},
                        metadata=dict(metadata or {}))


def _public_config(config: dict, class_name: str) -> dict:
    out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if not k.startswith("_")}
    out["_class_name"] = class_name
    return out


# The CLIPTextConfig fields that define the architecture and token ids (the rest are transformers defaults).
_TEXT_ENCODER_FIELDS = ("attention_dropout", "dropout", "hidden_act", "hidden_size", "initializer_factor",
                        "initializer_range", "intermediate_size", "layer_norm_eps", "max_position_embeddings",
                        "num_attention_heads", "num_hidden_layers", "projection_dim", "vocab_size",
                        "bos_token_id", "eos_token_id", "pad_token_id")


def _text_encoder_config(text_encoder) -> dict:
    config = text_encoder.config.to_dict()
    out = {k: config[k] for k in _TEXT_ENCODER_FIELDS if k in config}
    out.update({"architectures": [type(text_encoder).__name__], "model_type": "clip_text_model"})
    return out


# ----------------------------------------------------------------------------------------------------------
# Separate VAE (--vae)


def read_vae(path: str | Path, checkpoint: SDCheckpoint, *, allow_unsafe_pickle: bool = False) -> dict[str, LazyTensor]:
    """VAE tensors (diffusers names) from a VAE file or folder, validated against `checkpoint`'s VAE config.

    Accepts: an original VAE-only file (`encoder.*`, `decoder.*`, ... with or without `first_stage_model.`), a
    full original SD checkpoint (its `first_stage_model.*` part), a diffusers AutoencoderKL folder, or a diffusers
    pipeline folder (its `vae/`)."""
    path = Path(path)
    table = key_table("vae", checkpoint.configs.vae)
    if not path.exists():
        raise CheckpointError(f"{path}: no such VAE file or folder (--vae). Check the path.")
    if path.is_dir():
        folder = path / "vae" if (path / "model_index.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{path}: not a diffusers VAE folder (no config.json); pass a VAE file or folder")
        config = _load_json(folder / "config.json")
        if config.get("block_out_channels") != checkpoint.configs.vae.get("block_out_channels"):
            raise CheckpointError(f"{path}: VAE block_out_channels {config.get('block_out_channels')} do not match "
                                  f"the model's {checkpoint.configs.vae.get('block_out_channels')}; pass a VAE "
                                  "made for this model, or leave out --vae")
        source = _open_component(folder, "vae")
        checkpoint._open.append(source)
        return _validated_component(source, table)
    source = open_tensor_file(path, allow_unsafe_pickle=allow_unsafe_pickle)
    checkpoint._open.append(source)
    tensors = source.tensors
    if any(k.startswith(key_maps.VAE_PREFIX) for k in tensors):
        tensors = {k: v for k, v in tensors.items() if k.startswith(key_maps.VAE_PREFIX)}
    else:
        # VAE-only releases (e.g. vae-ft-mse-840000) drop the prefix and may carry their training loss module.
        ignored = [k for k in tensors if k.startswith(("loss.", "model_ema."))]
        if ignored:
            logger.info("%s: ignoring %d training-only tensors (loss.*, model_ema.*)", path, len(ignored))
        tensors = {key_maps.VAE_PREFIX + k: v for k, v in tensors.items() if not k.startswith(("loss.", "model_ema."))}
    out: dict[str, LazyTensor] = {}
    missing, wrong = [], []
    for mapping in table.mappings:
        lazy = tensors.pop(mapping.original, None)
        if lazy is None:
            missing.append(mapping.original)
        elif not shape_compatible(lazy.shape, mapping.original_shape):
            wrong.append(f"{mapping.original}: {tuple(lazy.shape)} (expected {mapping.original_shape})")
        else:
            out[mapping.diffusers[0]] = LazyTensor(mapping.diffusers_shapes[0], lazy.dtype,
                                                   lambda m=mapping, x=lazy: split_original(m, x.load())[0])
    if missing or wrong or tensors:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing ({_listing(missing)})")
        if wrong:
            problems.append(f"{len(wrong)} with the wrong shape ({_listing(wrong, 3)})")
        if tensors:
            problems.append(f"{len(tensors)} unknown ({_listing(sorted(tensors))})")
        raise CheckpointError(f"{path}: not a VAE for this model: " + "; ".join(problems) + ". Pass a VAE made "
                              f"for {checkpoint.family.description.split(' (')[0]} (an original VAE file, a full "
                              "checkpoint, or a diffusers VAE folder), or leave out --vae.")
    return out


def replace_vae(checkpoint: SDCheckpoint, vae_path: str | Path, *, allow_unsafe_pickle: bool = False) -> None:
    checkpoint.tensors["vae"] = read_vae(vae_path, checkpoint, allow_unsafe_pickle=allow_unsafe_pickle)
    logger.info("using the VAE from %s", vae_path)
