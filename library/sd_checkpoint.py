"""Read a Stable Diffusion model from any layout users have, into one lazy, validated form.

`read_checkpoint(path)` accepts an original (LDM/WebUI) `.safetensors` / `.ckpt` file or a diffusers folder and
returns an `SDCheckpoint`: the family (detected from the weights: the text encoders give the architecture, the
U-Net's input width its inputs, e.g. an inpainting model; checked against `--v2` / `--v_parameterization`),
diffusers configs, and the UNet / VAE / text-encoder tensors under diffusers names, each read only when used.
Writers (`checkpoint_writer.py`) and model loading (`model_loading.py`) take it from there, so every input layout
meets every output layout through this one form.

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
from library.families import (FAMILIES, SD1, TEXT_TO_IMAGE, ModelConfigs, ModelFamily, ModelSize, PredictionType,
                              TextEncoderKind, UNetInputs, family_for, unet_inputs_of)
from library.key_maps import (KeyTable, TensorMapping, key_table, reshape_checked, shape_compatible, split_original,
                              token_embedding_key)
from library.tensor_files import CheckpointError, LazyTensor, TensorSource, open_tensor_file

logger = logging.getLogger(__name__)

@dataclass
class SDCheckpoint:
    family: ModelFamily
    prediction_type: PredictionType  # usually family.prediction_type; differs for rare v-prediction SD 1.x models
    configs: ModelConfigs
    tensors: dict[str, dict[str, LazyTensor]]  # component (family.components) -> diffusers key -> tensor
    # Tensors of an original file that have no place in the diffusers models (SD 2.x's last text-encoder layer
    # and projection, DDPM schedule buffers, unused EMA weights). Kept so that converting back restores them.
    extras: dict[str, LazyTensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors metadata of the source
    values: dict[str, object] = field(default_factory=dict)  # non-tensor entries of a .ckpt (epoch, global_step)
    source: Path | None = None
    _open: list[TensorSource] = field(default_factory=list, repr=False)

    def tables(self) -> dict[str, KeyTable]:
        """The key table of every component, in `family.components` order."""
        slots = {slot.component: slot for slot in self.family.text_encoders}
        return {c: key_table(c, self.configs.of(c), slots.get(c)) for c in self.family.components}

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
                    allow_unsafe_pickle: bool = False, variant: str | None = None) -> SDCheckpoint:
    """`variant`: a diffusers folder's weight-file variant (`diffusion_pytorch_model.<variant>.safetensors`, e.g.
    "fp16"), as diffusers' `variant=` reads it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder. Check the path.")
    if path.is_dir():
        if extract_ema:
            raise CheckpointError(f"{path}: --extract_ema applies to original checkpoints; a diffusers folder has "
                                  "no EMA weights")
        return _read_diffusers(path, hints, variant=variant)
    if variant:
        raise CheckpointError(f"{path}: a variant ({variant}) names weight files inside a diffusers folder; this is a "
                              "single file: drop --variant")
    return _read_original(path, hints, extract_ema=extract_ema, allow_unsafe_pickle=allow_unsafe_pickle)


# ----------------------------------------------------------------------------------------------------------
# Family resolution


# What each architecture is, in the words of an error message.
_ARCH_NAMES = {
    "sd1": "an SD 1.x model (CLIP ViT-L text encoder)",
    "sd2": "an SD 2.x model (OpenCLIP ViT-H text encoder)",
    "sdxl": "an SDXL base model (CLIP ViT-L + OpenCLIP ViT-bigG text encoders)",
    "sdxl-refiner": "an SDXL refiner (OpenCLIP ViT-bigG text encoder only)",
}


def _check_v2_hint(arch: str, hints: FamilyHints, path: Path) -> None:
    if hints.v2 is True and arch != "sd2":
        raise CheckpointError(f"{path}: --v2 was given, but the weights are {_ARCH_NAMES[arch]}. Remove --v2; "
                              "the family is detected from the file.")
    if hints.v2 is False and arch != "sd1":
        raise CheckpointError(f"{path}: --v1 was given, but the weights are {_ARCH_NAMES[arch]}. Remove --v1"
                              f"{' (or pass --v2)' if arch == 'sd2' else ''}; the family is detected from the file.")
    if hints.v2 is None and arch != "sd1":
        logger.info("%s: detected %s", path, _ARCH_NAMES[arch])


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
    if "control_model.time_embed.0.weight" in keys or any(k.startswith("controlnet_cond_embedding.") for k in keys):
        raise CheckpointError(f"{path}: this is a ControlNet, not a Stable Diffusion checkpoint")
    conv_in = source.tensors.get(key_maps.UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        if _looks_like_lora(keys, source.metadata):
            raise CheckpointError(f"{path}: this is a LoRA file, not a Stable Diffusion checkpoint. Pass the base "
                                  "model here; a LoRA is applied on top of one (or used as a network to train).")
        raise CheckpointError(f"{path}: no Stable Diffusion UNet found (missing "
                              f"{key_maps.UNET_PREFIX}input_blocks.0.0.weight); is this a full SD 1.x / 2.x / "
                              "SDXL checkpoint? (A VAE-only file goes to --vae.)")
    # Each architecture keeps its text encoders under its own prefixes (the families' slots); the one whose
    # encoders are all there is the file's. No two architectures share a prefix.
    found = [arch for arch, family in _FAMILY_OF_ARCH.items()
             if all(any(k.startswith(slot.original_prefix) for k in keys) for slot in family.text_encoders)]
    if len(found) == 1:
        return found[0]
    expected = "; ".join(f"{' + '.join(s.original_prefix + '*' for s in f.text_encoders)} ({_ARCH_NAMES[arch]})"
                         for arch, f in _FAMILY_OF_ARCH.items())
    raise CheckpointError(f"{path}: no complete set of text encoders found; expected one of: {expected}. The file "
                          "is incomplete (a U-Net-only file?) or not a Stable Diffusion checkpoint.")


_FAMILY_OF_ARCH = {family.arch: family for family in FAMILIES.values()}  # families of one arch share slots


def _conv_in_width(source: TensorSource) -> int:
    """How many input channels the U-Net's first convolution takes ([channels, input channels, 3, 3])."""
    key = key_maps.UNET_PREFIX + "input_blocks.0.0.weight"
    shape = tuple(source.tensors[key].shape)
    if len(shape) != 4:
        raise CheckpointError(f"{source.path}: {key} has shape {shape}; the U-Net's first convolution is [channels, "
                              "input channels, 3, 3]. The file is damaged or not a Stable Diffusion checkpoint.")
    return shape[1]


def _resolve_inputs(arch: str, in_channels: int, path: Path) -> UNetInputs:
    """What the U-Net's input channels hold, from their number (as WebUI, ComfyUI and diffusers tell inpainting
    models apart); refused when no family of the architecture has that width."""
    inputs = unet_inputs_of(arch, in_channels)
    if inputs is None:
        layouts = sorted({f.unet_inputs for f in FAMILIES.values() if f.arch == arch},
                         key=lambda u: (u.fixed_channels, u.name))
        widths = "; ".join(f"{u.fixed_channels}{'' if u.fixed else ' + N'} ({u.name})" for u in layouts)
        raise CheckpointError(f"{path}: the U-Net takes {in_channels} input channels, which no family of "
                              f"{_ARCH_NAMES[arch]} has (known widths: {widths}). The file is damaged or of a kind "
                              "not supported.")
    if inputs != TEXT_TO_IMAGE:
        logger.info("%s: the U-Net takes %s", path, inputs.describe(in_channels))
    return inputs


_LORA_MARKERS = ("lora_down", "lora_up", "lora_A.", "lora_B.", ".lora.down.", ".lora.up.", "hada_w1", "lokr_w1")


def _looks_like_lora(keys: set[str], metadata: dict[str, str]) -> bool:
    # kohya (lora_unet_* / lora_te_*, LyCORIS hada_/lokr_), PEFT (lora_A / lora_B) and diffusers (.lora.down) layouts.
    return ("ss_network_module" in metadata or any(k.startswith(("lora_unet_", "lora_te")) for k in keys)
            or any(marker in k for k in keys for marker in _LORA_MARKERS))


def _normalize_original_keys(source: TensorSource) -> None:
    # Some early SD 1.x files store the CLIP text model without the `text_model.` level.
    old, new = "cond_stage_model.transformer.", SD1.text_encoders[0].original_prefix
    if any(k.startswith(old) and not k.startswith(new) for k in source.tensors):
        source.tensors = {
            (new + k[len(old):] if k.startswith(old) and not k.startswith(new) else k): v
            for k, v in source.tensors.items()
        }


def _original_configs(family: ModelFamily, source: TensorSource) -> ModelConfigs:
    """The family's configs at the size the file has, adjusted to the file's layout choices."""
    t = source.tensors
    conv_in_channels = t[key_maps.UNET_PREFIX + "input_blocks.0.0.weight"].shape[0]
    te_widths = {slot.component: (t[token_embedding_key(slot)].shape[1] if token_embedding_key(slot) in t else None)
                 for slot in family.text_encoders}
    for size in ModelSize:
        configs = family.configs(size)
        if configs.unet["block_out_channels"][0] == conv_in_channels and all(
                width in (None, configs.text_encoders[c]["hidden_size"]) for c, width in te_widths.items()):
            break
    else:
        widths = ", ".join(f"{c} width {w}" for c, w in te_widths.items())
        raise CheckpointError(f"{source.path}: unrecognised model width (UNet conv_in has {conv_in_channels} "
                              f"channels, {widths}); expected a standard {family.description}")
    unet = dict(configs.unet)
    unet["in_channels"] = _conv_in_width(source)  # the family accepts it; an extra-channel model's own
    proj_in = t.get(key_maps.UNET_PREFIX + "input_blocks.1.1.proj_in.weight")
    if proj_in is not None:
        # SD 2.x files store proj_in/proj_out as Linear, older conversions as 1x1 conv: follow the file so that
        # converting back gives the same tensors.
        unet["use_linear_projection"] = len(proj_in.shape) == 2
    text_encoders = {}
    for slot in family.text_encoders:
        text_encoders[slot.component] = dict(configs.text_encoders[slot.component])
        if slot.kind is TextEncoderKind.CLIP_L:
            # Some SD 1.x merges drop the last layers (a baked-in clip skip): follow the file.
            layers = _count_layers(t, slot.original_prefix + "encoder.layers.")
            text_encoders[slot.component]["num_hidden_layers"] = layers or configs.text_encoders[slot.component][
                "num_hidden_layers"]
    scheduler = dict(configs.scheduler)
    return replace(configs, unet=unet, text_encoders=text_encoders, scheduler=scheduler)


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
        inputs = _resolve_inputs(arch, _conv_in_width(source), path)
        declared, where = _prediction_from_original(source)
        prediction = _resolve_prediction(declared, where, hints, path)
        family = family_for(arch, prediction, inputs)
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
                out[name] = LazyTensor(mapping.diffusers_shapes[i], lazy.dtype, _part_loader(mapping, lazy, i),
                                       raw=lazy.raw if mapping.same_bytes else None)
        checkpoint.tensors[component] = out
    _raise_key_problems(source.path, missing, wrong_shape, checkpoint.family)
    known_extras = set(key_maps.LDM_SCHEDULE_BUFFERS)
    for slot in checkpoint.family.text_encoders:
        layers = checkpoint.configs.text_encoders[slot.component]["num_hidden_layers"]
        known_extras |= set(key_maps.text_encoder_extra_keys(slot, layers))
    family_parts = tuple(part.prefix for part in checkpoint.family.original_parts)  # e.g. SD 2.x depth's MiDaS
    unknown = []
    for key in sorted(set(tensors) - used):
        if (key in known_extras or key.startswith(("model_ema.", *family_parts))
                or (extract_ema and key.startswith(key_maps.UNET_PREFIX))):
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


def _raise_key_problems(path: Path, missing: list[str], wrong_shape: list[str],
                        family: ModelFamily | None = None) -> None:
    detected = f"the detected family ({family.description})" if family else "the detected family"
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing: {_listing(missing)}. The file is "
                              f"incomplete or not a standard model of {detected}.")
    if wrong_shape:
        raise CheckpointError(f"{path}: {len(wrong_shape)} tensor(s) with the wrong shape: "
                              f"{_listing(wrong_shape, 4)}. The file does not match {detected}.")


# ----------------------------------------------------------------------------------------------------------
# Diffusers folders

def weight_files(component: str, variant: str | None = None) -> tuple[str, str]:
    """A component's weight file names in a diffusers folder, in the order diffusers / transformers look for them
    (.safetensors, then .bin): diffusers models for "unet" / "vae", transformers models for the text encoders;
    a variant goes before the suffix (`model.fp16.safetensors`)."""
    stems = ("diffusion_pytorch_model", "diffusion_pytorch_model") if component in ("unet", "vae") else \
        ("model", "pytorch_model")
    infix = f".{variant}" if variant else ""
    return (f"{stems[0]}{infix}.safetensors", f"{stems[1]}{infix}.bin")


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


def _read_diffusers(path: Path, hints: FamilyHints, variant: str | None = None) -> SDCheckpoint:
    checkpoint = diffusers_folder_configs(path, hints)
    try:
        for component, table in checkpoint.tables().items():
            source = _open_component(path / component, component, variant)
            checkpoint._open.append(source)
            checkpoint.tensors[component] = _validated_component(source, table)
        if (path / EXTRAS_FILE).is_file():
            extras = open_tensor_file(path / EXTRAS_FILE)
            checkpoint._open.append(extras)
            checkpoint.extras.update(extras.tensors)
    except Exception:
        checkpoint.close()
        raise
    return checkpoint


def diffusers_folder_configs(path: Path, hints: FamilyHints = FamilyHints()) -> SDCheckpoint:
    """A pipeline folder's family and configs, checked, without its tensors (no weight file is opened)."""
    if not (path / "model_index.json").is_file():
        names = set(weight_files("unet") + weight_files("text_encoder"))
        if (path / "config.json").is_file() and any((path / name).is_file() for name in names):
            what = "a single diffusers model (e.g. a VAE or UNet folder), not a whole pipeline"
            if (path.parent / "model_index.json").is_file():
                what += f"; the pipeline is probably its parent folder {path.parent}"
        else:
            what = "not a diffusers model folder"
        raise CheckpointError(f"{path}: {what}: there is no model_index.json. Point at the pipeline folder that "
                              "holds model_index.json, unet/, vae/ and text_encoder/, or at a .safetensors/.ckpt file.")
    index = _load_json(path / "model_index.json")

    def config(sub: str) -> dict:
        if not (path / sub).is_file():
            raise CheckpointError(f"{path}: missing {sub}; the diffusers folder is incomplete")
        return _strip_private(_load_json(path / sub))

    arch = _diffusers_arch(path, index, config)
    _check_v2_hint(arch, hints, path)
    unet = config("unet/config.json")
    in_channels = unet.get("in_channels", 4)  # (diffusers' default)
    if not isinstance(in_channels, int):
        raise CheckpointError(f"{path}: unet/config.json: in_channels {in_channels!r} is not a number; fix the file "
                              "or fetch the model again")
    inputs = _resolve_inputs(arch, in_channels, path / "unet" / "config.json")
    unet["in_channels"] = in_channels  # (spelled out when a hand-written config leaves diffusers' default)
    scheduler = config("scheduler/scheduler_config.json")
    declared = scheduler.get("prediction_type")
    prediction = _resolve_prediction(PredictionType.parse(declared) if declared else None,
                                     "scheduler/scheduler_config.json", hints, path)
    family = family_for(arch, prediction, inputs)
    text_encoders = {slot.component: config(f"{slot.component}/config.json") for slot in family.text_encoders}
    cross = unet.get("cross_attention_dim")
    widths = [c.get("hidden_size") for c in text_encoders.values()]
    if cross != sum(w or 0 for w in widths):
        raise CheckpointError(f"{path}: unet cross_attention_dim {cross} does not match the text encoder width "
                              f"{' + '.join(map(str, widths))}")
    model_configs = _with_prediction(ModelConfigs(unet=unet, vae=config("vae/config.json"), text_encoders=text_encoders,
                                                  scheduler=scheduler), prediction)
    return SDCheckpoint(family, prediction, model_configs, {}, source=path)


def _pipeline_classes(archs: tuple[str, ...]) -> tuple[str, ...]:
    """The diffusers pipelines whose folders hold a model of these architectures (the families' records)."""
    return tuple(dict.fromkeys(name for f in FAMILIES.values() if f.arch in archs
                               for name in (f.pipeline_class, f.img2img_pipeline_class)))


_SD_PIPELINES = _pipeline_classes(("sd1", "sd2"))
_SDXL_PIPELINES = _pipeline_classes(("sdxl", "sdxl-refiner"))


def _diffusers_arch(path: Path, index: dict, config) -> str:
    """The architecture of a pipeline folder, from model_index.json (and SD 1.x / 2.x from the text encoder). The
    pipeline class does not say what the U-Net's inputs are: the U-Net's in_channels does (diffusers' inpainting
    pipelines also run plain models, and older conversions wrote inpainting models as StableDiffusionPipeline)."""
    name = index.get("_class_name")

    def present(component: str) -> bool:  # diffusers writes [null, null] for a component a pipeline does without
        entry = index.get(component)
        return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None
    if name in _SDXL_PIPELINES:
        if not present("text_encoder_2"):
            raise CheckpointError(f"{path}: model_index.json describes a {name} without text_encoder_2; the folder "
                                  "is incomplete")
        return "sdxl" if present("text_encoder") else "sdxl-refiner"
    if name not in (None, *_SD_PIPELINES):
        raise CheckpointError(f"{path}: model_index.json describes a {name}; supported are "
                              f"{', '.join(_SD_PIPELINES + _SDXL_PIPELINES)} folders (SD 1.x / 2.x / SDXL)")
    return "sd2" if config("text_encoder/config.json").get("hidden_act") == "gelu" else "sd1"


def _strip_private(config: dict) -> dict:
    # Keep "_class_name" (diffusers needs it) but drop bookkeeping such as "_diffusers_version", "_name_or_path".
    return {k: v for k, v in config.items() if not k.startswith("_") or k == "_class_name"}


def _open_component(folder: Path, component: str, variant: str | None = None) -> TensorSource:
    for name in weight_files(component, variant):
        if (folder / name).is_file():
            return open_tensor_file(folder / name)
    index_files = sorted(folder.glob("*.index.json"))
    if index_files:
        raise CheckpointError(f"{folder}: sharded weights ({index_files[0].name}) are not supported for SD 1.x/2.x "
                              "components; save the component unsharded")
    hint = "; without --variant" if variant else ""
    if variant and any((folder / name).is_file() for name in weight_files(component)):
        hint = f"; the folder has the plain files: drop --variant {variant}"
    raise CheckpointError(f"{folder}: no weight file (looked for {', '.join(weight_files(component, variant))})"
                          + (hint if variant else ""))


# diffusers before 0.14 named the VAE attention projections differently; its own loader still renames them.
_LEGACY_VAE_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def _legacy_vae_name(key: str) -> str:
    for old, new in _LEGACY_VAE_ATTENTION.items():
        if ".mid_block.attentions." in key and old in key:
            return key.replace(old, new)
    return key


def _text_model_name(key: str, expected: dict) -> str:
    # transformers 4.x writes CLIPTextModel keys below `text_model.`, 5.x does not (CLIPTextModelWithProjection
    # keeps the level in both); accept either spelling.
    if key in expected:
        return key
    other = key[len("text_model."):] if key.startswith("text_model.") else "text_model." + key
    return other if other in expected else key


def _validated_component(source: TensorSource, table: KeyTable) -> dict[str, LazyTensor]:
    """A diffusers folder's component tensors, checked against the component's key table."""
    tensors = source.tensors
    expected = {name: m.diffusers_shapes[i] for m in table.mappings for i, name in enumerate(m.diffusers)}
    if table.component == "vae":
        tensors = {_legacy_vae_name(k): v for k, v in tensors.items()}
    elif table.component != "unet":
        tensors = {_text_model_name(k, expected): v for k, v in tensors.items() if not k.endswith("position_ids")}
    missing = [k for k in expected if k not in tensors]
    wrong = [f"{k}: {tuple(tensors[k].shape)} (expected {expected[k]})" for k in expected
             if k in tensors and not shape_compatible(tensors[k].shape, expected[k])]
    _raise_key_problems(source.path, missing, wrong)
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise CheckpointError(f"{source.path}: {len(unknown)} unknown tensor(s) for this {table.component} config: "
                              f"{_listing(unknown)}")
    return {k: _reshaped(tensors[k], expected[k], k) for k in expected}


def _reshaped(lazy: LazyTensor, shape: tuple[int, ...], name: str) -> LazyTensor:
    if tuple(lazy.shape) == tuple(shape):
        return lazy
    return LazyTensor(shape, lazy.dtype, lambda: reshape_checked(lazy.load(), shape, name), raw=lazy.raw)


SD_ARCHS = ("sd1", "sd2")


def require_arch(checkpoint: SDCheckpoint, tool: str, archs: tuple[str, ...] = SD_ARCHS, *,
                 elsewhere: dict[str, str] | None = None, inputs: tuple[UNetInputs, ...] = (TEXT_TO_IMAGE,)) -> None:
    """Refuse, by name, a model a tool does not handle: e.g. SDXL in a tool made for SD 1.x / 2.x. `elsewhere`: the
    tool that does handle an architecture (kohya's split: train_network.py for SD 1.x / 2.x, sdxl_train_network.py
    for SDXL), named in the message. `inputs`: the U-Net inputs the tool feeds (the LoRA, DreamBooth and fine-tune
    trainers and gen_img.py feed every kind; the others the noisy latents only). Closes the checkpoint's files before
    raising."""
    arch = checkpoint.family.arch
    if arch in archs and checkpoint.family.unet_inputs in inputs:
        return
    checkpoint.close()
    if arch in archs:
        in_channels = checkpoint.configs.unet["in_channels"]
        raise CheckpointError(
            f"{checkpoint.source or 'the model'}: this is {checkpoint.family.description.split(' (')[0]} (U-Net "
            f"{checkpoint.family.unet_inputs.describe(in_channels)}); {tool} does not feed such a U-Net yet. "
            "train_network.py, train_db.py, fine_tune.py, sdxl_train.py and sdxl_train_network.py train them, "
            "gen_img.py generates with them, tools/convert_diffusers20_original_sd.py converts them and "
            "tools/add_input_channels.py makes them.")
    handled = " / ".join(_ARCH_NAMES[a].split(" (")[0].removeprefix("an ").removesuffix(" model") for a in archs)
    where = (f"use {elsewhere[arch]} for it (same flags)" if arch in (elsewhere or {}) else
             "does not support it yet (tools/convert_diffusers20_original_sd.py and tools/merge_models.py do)")
    raise CheckpointError(f"{checkpoint.source or 'the model'}: this is {_ARCH_NAMES[arch]}; "
                          f"{tool} handles {handled} models: {where}.")


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
