"""Read a Stable Diffusion model from any layout users have, into one lazy, validated form.

`read_checkpoint(path)` accepts an original (LDM/WebUI) `.safetensors` / `.ckpt` file or a diffusers folder and
returns an `SDCheckpoint`: the family (detected from the weights, checked against `--v2` /
`--v_parameterization`), diffusers configs, and the UNet / VAE / text-encoder tensors under diffusers names, each
read only when used. Writers (`checkpoint_writer.py`) and model loading (`model_loading.py`) take it from
there, so every input layout meets every output layout through this one form.

Every key is accounted for: a tensor that no key map or known extra covers, a missing tensor and a wrong shape
are errors naming the key, never silently dropped.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from library import key_maps
from library.families import (FAMILIES, ModelConfigs, ModelFamily, ModelSize, PredictionType, TextEncoderKind,
                              family_for)
from library.key_maps import KeyTable, TensorMapping, key_table, reshape_checked, shape_compatible, split_original
from library.tensor_files import CheckpointError, LazyTensor, TensorSource, open_tensor_file

logger = logging.getLogger(__name__)

COMPONENTS = ("unet", "vae", "text_encoder")


@dataclass
class SDCheckpoint:
    family: ModelFamily
    prediction_type: PredictionType  # usually family.prediction_type; differs for rare v-prediction SD 1.x models
    configs: ModelConfigs
    tensors: dict[str, dict[str, LazyTensor]]  # component -> diffusers key -> tensor
    # Tensors of an original file that have no place in the diffusers models (SD 2.x's last text-encoder layer
    # and projection, DDPM schedule buffers, unused EMA weights). Kept so that converting back restores them.
    extras: dict[str, LazyTensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors metadata of the source
    values: dict[str, object] = field(default_factory=dict)  # non-tensor entries of a .ckpt (epoch, global_step)
    source: Path | None = None
    _open: list[TensorSource] = field(default_factory=list, repr=False)

    def tables(self) -> dict[str, KeyTable]:
        return {
            "unet": key_table("unet", self.configs.unet),
            "vae": key_table("vae", self.configs.vae),
            "text_encoder": key_table("text_encoder", self.configs.text_encoder, self.family.text_encoder_kind),
        }

    def close(self) -> None:
        for source in self._open:
            source.close()
        self._open.clear()

    def __enter__(self) -> "SDCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class FamilyHints:
    """What the user said about the model on the command line (kohya's flags); checked, not trusted."""

    v2: bool | None = None  # True: --v2; False: --v1 (convert tool); None: not said
    v_parameterization: bool = False


def read_checkpoint(path: str | Path, hints: FamilyHints = FamilyHints(), *, extract_ema: bool = False,
                    allow_unsafe_pickle: bool = False) -> SDCheckpoint:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder. Check the path.")
    if path.is_dir():
        if extract_ema:
            raise CheckpointError(f"{path}: --extract_ema applies to original checkpoints; a diffusers folder has "
                                  "no EMA weights")
        return _read_diffusers(path, hints)
    return _read_original(path, hints, extract_ema=extract_ema, allow_unsafe_pickle=allow_unsafe_pickle)


# ----------------------------------------------------------------------------------------------------------
# Family resolution


def _check_v2_hint(arch: str, hints: FamilyHints, path: Path) -> None:
    if hints.v2 is True and arch != "sd2":
        raise CheckpointError(f"{path}: --v2 was given, but the weights are an SD 1.x model (CLIP ViT-L text "
                              "encoder). Remove --v2; the family is detected from the file.")
    if hints.v2 is False and arch != "sd1":
        raise CheckpointError(f"{path}: --v1 was given, but the weights are an SD 2.x model (OpenCLIP ViT-H text "
                              "encoder). Remove --v1 (or pass --v2); the family is detected from the file.")
    if hints.v2 is None and arch == "sd2":
        logger.info("%s: detected an SD 2.x model", path)


def _resolve_prediction(declared: PredictionType | None, where: str, hints: FamilyHints,
                        path: Path) -> PredictionType:
    """The file's own declaration wins; the flag only fills a gap, and may not contradict it."""
    flag = PredictionType.V_PREDICTION if hints.v_parameterization else None
    if declared is not None:
        if flag is not None and declared is not flag:
            raise CheckpointError(f"{path}: --v_parameterization was given, but {where} says the model predicts "
                                  f"{declared.value}. Remove the flag (or fix {where}).")
        return declared
    return flag or PredictionType.EPSILON


def _prediction_from_original(source: TensorSource) -> tuple[PredictionType | None, str]:
    declared = source.metadata.get("modelspec.prediction_type")
    if declared:
        return PredictionType.parse(declared), "the file's modelspec.prediction_type metadata"
    # WebUI users keep the LDM config beside an SD 2.x 768-v file (`model.yaml` next to `model.safetensors`).
    yaml_path = source.path.with_suffix(".yaml")
    if yaml_path.is_file():
        match = re.search(r"^\s*parameterization:\s*[\"']?(\w+)", yaml_path.read_text(errors="replace"), re.M)
        if match:
            return PredictionType.parse(match.group(1)), f"{yaml_path.name}"
    return None, ""


# ----------------------------------------------------------------------------------------------------------
# Original (LDM) files


def _detect_original_arch(keys: set[str], source: TensorSource) -> str:
    path = source.path
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise CheckpointError(f"{path}: this is an SDXL checkpoint; SDXL is not supported yet (SD 1.x and 2.x are); "
                              "use an SD 1.x / 2.x model")
    if "control_model.time_embed.0.weight" in keys or any(k.startswith("controlnet_cond_embedding.") for k in keys):
        raise CheckpointError(f"{path}: this is a ControlNet, not a Stable Diffusion checkpoint")
    conv_in = source.tensors.get(key_maps.UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        if _looks_like_lora(keys, source.metadata):
            raise CheckpointError(f"{path}: this is a LoRA file, not a Stable Diffusion checkpoint. Pass the base "
                                  "model here; a LoRA is applied on top of one (or used as a network to train).")
        raise CheckpointError(f"{path}: no Stable Diffusion UNet found (missing "
                              f"{key_maps.UNET_PREFIX}input_blocks.0.0.weight); is this a full SD 1.x/2.x "
                              "checkpoint? (A VAE-only file goes to --vae.)")
    if len(conv_in.shape) == 4 and conv_in.shape[1] != 4:
        raise CheckpointError(f"{path}: the UNet takes {conv_in.shape[1]} input channels (an inpainting or "
                              "instruct-pix2pix model); only standard 4-channel models are supported")
    if any(k.startswith(key_maps.OPENCLIP_PREFIX + "transformer.resblocks.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    raise CheckpointError(f"{path}: no text encoder found (neither cond_stage_model.transformer.* (SD 1.x) nor "
                          "cond_stage_model.model.* (SD 2.x)); the file is incomplete")


_LORA_MARKERS = ("lora_down", "lora_up", "lora_A.", "lora_B.", ".lora.down.", ".lora.up.", "hada_w1", "lokr_w1")


def _looks_like_lora(keys: set[str], metadata: dict[str, str]) -> bool:
    # kohya (lora_unet_* / lora_te_*, LyCORIS hada_/lokr_), PEFT (lora_A / lora_B) and diffusers (.lora.down) layouts.
    return ("ss_network_module" in metadata or any(k.startswith(("lora_unet_", "lora_te")) for k in keys)
            or any(marker in k for k in keys for marker in _LORA_MARKERS))


def _normalize_original_keys(source: TensorSource) -> None:
    # Some early SD 1.x files store the CLIP text model without the `text_model.` level.
    old = "cond_stage_model.transformer."
    if any(k.startswith(old) and not k.startswith(key_maps.CLIP_L_PREFIX) for k in source.tensors):
        source.tensors = {
            (key_maps.CLIP_L_PREFIX + k[len(old):] if k.startswith(old) and not k.startswith(key_maps.CLIP_L_PREFIX)
             else k): v
            for k, v in source.tensors.items()
        }


def _original_configs(family: ModelFamily, source: TensorSource) -> ModelConfigs:
    """The family's configs at the size the file has, adjusted to the file's layout choices."""
    t = source.tensors
    conv_in_channels = t[key_maps.UNET_PREFIX + "input_blocks.0.0.weight"].shape[0]
    if family.text_encoder_kind is TextEncoderKind.CLIP_L:
        te_width = t[key_maps.CLIP_L_PREFIX + "embeddings.token_embedding.weight"].shape[1] \
            if key_maps.CLIP_L_PREFIX + "embeddings.token_embedding.weight" in t else None
    else:
        te_width = t[key_maps.OPENCLIP_PREFIX + "token_embedding.weight"].shape[1] \
            if key_maps.OPENCLIP_PREFIX + "token_embedding.weight" in t else None
    for size in ModelSize:
        configs = family.configs(size)
        if configs.unet["block_out_channels"][0] == conv_in_channels and te_width in (None, configs.text_encoder["hidden_size"]):
            break
    else:
        raise CheckpointError(f"{source.path}: unrecognised model width (UNet conv_in has {conv_in_channels} "
                              f"channels, text encoder width {te_width}); expected a standard {family.description}")
    unet = dict(configs.unet)
    proj_in = t.get(key_maps.UNET_PREFIX + "input_blocks.1.1.proj_in.weight")
    if proj_in is not None:
        # SD 2.x files store proj_in/proj_out as Linear, older conversions as 1x1 conv: follow the file so that
        # converting back gives the same tensors.
        unet["use_linear_projection"] = len(proj_in.shape) == 2
    text_encoder = dict(configs.text_encoder)
    if family.text_encoder_kind is TextEncoderKind.CLIP_L:
        layers = _count_layers(t, key_maps.CLIP_L_PREFIX + "encoder.layers.")
        text_encoder["num_hidden_layers"] = layers or text_encoder["num_hidden_layers"]
    scheduler = dict(configs.scheduler)
    return replace(configs, unet=unet, text_encoder=text_encoder, scheduler=scheduler)


def _count_layers(tensors, prefix: str) -> int:
    indices = {int(k[len(prefix):].split(".")[0]) for k in tensors if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def _read_original(path: Path, hints: FamilyHints, *, extract_ema: bool, allow_unsafe_pickle: bool) -> SDCheckpoint:
    source = open_tensor_file(path, allow_unsafe_pickle=allow_unsafe_pickle)
    try:
        _normalize_original_keys(source)
        keys = set(source.tensors)
        arch = _detect_original_arch(keys, source)
        _check_v2_hint(arch, hints, path)
        declared, where = _prediction_from_original(source)
        prediction = _resolve_prediction(declared, where, hints, path)
        family = family_for(arch, prediction)
        configs = _with_prediction(_original_configs(family, source), prediction)
        checkpoint = SDCheckpoint(family, prediction, configs, {}, metadata=dict(source.metadata),
                                  values=dict(source.values), source=path, _open=[source])
        _map_original_tensors(checkpoint, source, extract_ema=extract_ema)
        return checkpoint
    except Exception:
        source.close()
        raise


def _with_prediction(configs: ModelConfigs, prediction: PredictionType) -> ModelConfigs:
    scheduler = dict(configs.scheduler, prediction_type=prediction.value)
    return replace(configs, scheduler=scheduler)


def _map_original_tensors(checkpoint: SDCheckpoint, source: TensorSource, *, extract_ema: bool) -> None:
    tensors = source.tensors
    tables = checkpoint.tables()
    used: set[str] = set()
    missing: list[str] = []
    wrong_shape: list[str] = []
    has_ema = any(k.startswith("model_ema.") and k not in ("model_ema.decay", "model_ema.num_updates")
                  for k in tensors)
    if extract_ema and not has_ema:
        raise CheckpointError(f"{source.path}: --extract_ema was given but the file has no EMA weights "
                              "(no model_ema.* keys)")
    if has_ema and not extract_ema:
        logger.info("%s: the file also holds EMA weights; using the regular ones (pass --extract_ema for EMA)",
                    source.path)
    for component, table in tables.items():
        out: dict[str, LazyTensor] = {}
        for mapping in table.mappings:
            key = mapping.original
            if extract_ema and component == "unet":
                key = key_maps.ema_key(mapping.original)
            lazy = tensors.get(key)
            if lazy is None:
                missing.append(key)
                continue
            used.add(key)
            if not shape_compatible(lazy.shape, mapping.original_shape):
                wrong_shape.append(f"{key}: {tuple(lazy.shape)} (expected {mapping.original_shape})")
                continue
            for i, name in enumerate(mapping.diffusers):
                out[name] = LazyTensor(mapping.diffusers_shapes[i], lazy.dtype,
                                       _part_loader(mapping, lazy, i))
        checkpoint.tensors[component] = out
    _raise_key_problems(source.path, missing, wrong_shape)
    known_extras = set(key_maps.LDM_SCHEDULE_BUFFERS) | set(key_maps.CLIP_L_BUFFERS)
    if checkpoint.family.text_encoder_kind is TextEncoderKind.OPENCLIP_H:
        known_extras |= set(key_maps.openclip_extra_keys(checkpoint.configs.text_encoder["num_hidden_layers"]))
    unknown = []
    for key in sorted(set(tensors) - used):
        if key in known_extras or key.startswith("model_ema.") or (extract_ema and key.startswith(key_maps.UNET_PREFIX)):
            if not (extract_ema and (key.startswith(key_maps.UNET_PREFIX) or key.startswith("model_ema."))):
                checkpoint.extras[key] = tensors[key]
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"{source.path}: {len(unknown)} unknown tensor(s) for a {checkpoint.family.description}: "
            f"{_listing(unknown)}. The file may be a different model type or a merge with foreign parts; "
            "nothing was converted.")


def _part_loader(mapping: TensorMapping, lazy: LazyTensor, index: int):
    return lambda: split_original(mapping, lazy.load())[index]


def _listing(keys: list[str], limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (f" ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _raise_key_problems(path: Path, missing: list[str], wrong_shape: list[str]) -> None:
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing: {_listing(missing)}. The file is "
                              "incomplete or not a standard model of the detected family.")
    if wrong_shape:
        raise CheckpointError(f"{path}: {len(wrong_shape)} tensor(s) with the wrong shape: "
                              f"{_listing(wrong_shape, 4)}. The file does not match the detected family.")


# ----------------------------------------------------------------------------------------------------------
# Diffusers folders

# Weight file names in the order diffusers / transformers look for them.
_WEIGHT_FILES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin"),
}
EXTRAS_FILE = "original_extras.safetensors"


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}. Fix the file "
                              "or fetch the model again.") from e
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not a text (UTF-8) JSON file ({e}); fetch the model again") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object ({{...}}), found a {type(data).__name__}; fix the "
                              "file or fetch the model again")
    return data


def _read_diffusers(path: Path, hints: FamilyHints) -> SDCheckpoint:
    if not (path / "model_index.json").is_file():
        weight_files = {name for names in _WEIGHT_FILES.values() for name in names}
        if (path / "config.json").is_file() and any((path / name).is_file() for name in weight_files):
            what = "a single diffusers model (e.g. a VAE or UNet folder), not a whole pipeline"
            if (path.parent / "model_index.json").is_file():
                what += f"; the pipeline is probably its parent folder {path.parent}"
        else:
            what = "not a diffusers model folder"
        raise CheckpointError(f"{path}: {what}: there is no model_index.json. Point at the pipeline folder that "
                              "holds model_index.json, unet/, vae/ and text_encoder/, or at a .safetensors/.ckpt file.")
    index = _load_json(path / "model_index.json")
    if index.get("_class_name") not in (None, "StableDiffusionPipeline"):
        raise CheckpointError(f"{path}: model_index.json describes a {index.get('_class_name')}; only "
                              "StableDiffusionPipeline folders (SD 1.x / 2.x) are supported")
    configs = {}
    for part, sub in (("unet", "unet/config.json"), ("vae", "vae/config.json"),
                      ("text_encoder", "text_encoder/config.json"), ("scheduler", "scheduler/scheduler_config.json")):
        if not (path / sub).is_file():
            raise CheckpointError(f"{path}: missing {sub}; the diffusers folder is incomplete")
        configs[part] = _load_json(path / sub)
    arch = "sd2" if configs["text_encoder"].get("hidden_act") == "gelu" else "sd1"
    _check_v2_hint(arch, hints, path)
    declared = configs["scheduler"].get("prediction_type")
    prediction = _resolve_prediction(PredictionType.parse(declared) if declared else None,
                                     "scheduler/scheduler_config.json", hints, path)
    family = family_for(arch, prediction)
    cross = configs["unet"].get("cross_attention_dim")
    if cross != configs["text_encoder"].get("hidden_size"):
        raise CheckpointError(f"{path}: unet cross_attention_dim {cross} does not match the text encoder width "
                              f"{configs['text_encoder'].get('hidden_size')}")
    model_configs = _with_prediction(ModelConfigs(**{k: _strip_private(v) for k, v in configs.items()}), prediction)
    checkpoint = SDCheckpoint(family, prediction, model_configs, {}, source=path)
    try:
        tables = checkpoint.tables()
        for component in COMPONENTS:
            source = _open_component(path / component, component)
            checkpoint._open.append(source)
            checkpoint.tensors[component] = _validated_component(source, tables[component], component)
        if (path / EXTRAS_FILE).is_file():
            extras = open_tensor_file(path / EXTRAS_FILE)
            checkpoint._open.append(extras)
            checkpoint.extras.update(extras.tensors)
    except Exception:
        checkpoint.close()
        raise
    return checkpoint


def _strip_private(config: dict) -> dict:
    # Keep "_class_name" (diffusers needs it) but drop bookkeeping such as "_diffusers_version", "_name_or_path".
    return {k: v for k, v in config.items() if not k.startswith("_") or k == "_class_name"}


def _open_component(folder: Path, component: str) -> TensorSource:
    for name in _WEIGHT_FILES[component]:
        if (folder / name).is_file():
            return open_tensor_file(folder / name)
    index_files = sorted(folder.glob("*.index.json"))
    if index_files:
        raise CheckpointError(f"{folder}: sharded weights ({index_files[0].name}) are not supported for SD 1.x/2.x "
                              "components; save the component unsharded")
    raise CheckpointError(f"{folder}: no weight file (looked for {', '.join(_WEIGHT_FILES[component])})")


# diffusers before 0.14 named the VAE attention projections differently; its own loader still renames them.
_LEGACY_VAE_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def _legacy_vae_name(key: str) -> str:
    for old, new in _LEGACY_VAE_ATTENTION.items():
        if ".mid_block.attentions." in key and old in key:
            return key.replace(old, new)
    return key


def _validated_component(source: TensorSource, table: KeyTable, component: str) -> dict[str, LazyTensor]:
    tensors = source.tensors
    if component == "vae":
        tensors = {_legacy_vae_name(k): v for k, v in tensors.items()}
    if component == "text_encoder":
        # transformers 4.x writes `text_model.`-prefixed keys, 5.x does not; accept both.
        tensors = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in tensors.items()}
        tensors.pop("embeddings.position_ids", None)  # a buffer transformers recreates
    expected = {name: m.diffusers_shapes[i] for m in table.mappings for i, name in enumerate(m.diffusers)}
    missing = [k for k in expected if k not in tensors]
    wrong = [f"{k}: {tuple(tensors[k].shape)} (expected {expected[k]})" for k in expected
             if k in tensors and not shape_compatible(tensors[k].shape, expected[k])]
    _raise_key_problems(source.path, missing, wrong)
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise CheckpointError(f"{source.path}: {len(unknown)} unknown tensor(s) for this {component} config: "
                              f"{_listing(unknown)}")
    return {k: _reshaped(tensors[k], expected[k], k) for k in expected}


def _reshaped(lazy: LazyTensor, shape: tuple[int, ...], name: str) -> LazyTensor:
    if tuple(lazy.shape) == tuple(shape):
        return lazy
    return LazyTensor(shape, lazy.dtype, lambda: reshape_checked(lazy.load(), shape, name))


def family_by_name(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def with_linear_projection(checkpoint: SDCheckpoint) -> SDCheckpoint:
    """The same model with the UNet's transformer proj_in/proj_out as Linear layers (kohya's
    `--unet_use_linear_projection`; stabilityai's SD 2.x diffusers configs use Linear)."""
    if checkpoint.configs.unet.get("use_linear_projection"):
        return checkpoint
    unet_config = dict(checkpoint.configs.unet, use_linear_projection=True)
    table = key_table("unet", unet_config).by_diffusers()
    unet = {name: _reshaped(lazy, table[name].diffusers_shapes[0], name)
            for name, lazy in checkpoint.tensors["unet"].items()}
    return replace(checkpoint, configs=replace(checkpoint.configs, unet=unet_config),
                   tensors=dict(checkpoint.tensors, unet=unet))
