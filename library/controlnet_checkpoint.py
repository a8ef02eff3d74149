"""ControlNet weights in the two layouts users have, read into one lazy, validated form and written back.

Layouts:
- original (lllyasviel's ControlNet release; what the WebUI ControlNet extension and ComfyUI load): one
  `.safetensors` / `.pth` / `.ckpt` with `control_model.time_embed.*`, `control_model.input_blocks.*`,
  `control_model.middle_block.*` (the U-Net encoder, LDM names), `control_model.input_hint_block.{0,2,...,14}.*`
  (the conditioning-image encoder), `control_model.zero_convs.{i}.0.*` and `control_model.middle_block_out.0.*`
  (the zero convolutions). Some files omit the `control_model.` prefix; ControlNet 1.0 files bundle a whole SD
  model beside it. Many are fp16.
- diffusers: a `ControlNetModel` folder (`config.json` + `diffusion_pytorch_model.safetensors` / `.bin`), or its
  weights as one file: how SDXL ControlNets are shared (WebUI and ComfyUI load those too), so that is the single
  file written for SDXL (`ModelFamily.controlnet_file_keys`); SDXL files in the original layout (with
  `control_model.label_emb.*`) are read as well.

The key table is data generated from the config, one table for both directions: the encoder part reuses the
U-Net table of `key_maps` (a ControlNet's encoder *is* the U-Net's encoder, same names), the parts a U-Net does
not have come from `_control_renames`. An original file does not carry its config: it is derived from the base
model family (the family's U-Net config restricted to what ControlNetModel takes, as `ControlNetModel.from_unet`
does) and checked against the file's shapes, so an SD 1.x ControlNet is not silently read as an SD 2.x one.

Every key is accounted for: an unknown tensor, a missing tensor or a wrong shape is an error naming the key.
"""

from __future__ import annotations

import copy
import enum
import inspect
import json
import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch

from library import key_maps
from library.atomic_files import OutputPathError, atomic_directory, atomic_file
from library.checkpoint_writer import modelspec_keys
from library.families import FAMILIES, ModelFamily, ModelSize

# The families whose ControlNets this module reads and writes (all that have a ControlNet pipeline: not the SDXL
# refiner).
CONTROLNET_FAMILIES: dict[str, ModelFamily] = {name: f for name, f in FAMILIES.items()
                                               if f.controlnet_pipeline_class is not None}
from library.key_maps import KeyTable, TensorMapping, key_table, shape_compatible
from library.safetensors_io import TensorEntry, write_safetensors
from library.sd_checkpoint import _listing, _load_json, _reshaped
from library.tensor_files import CheckpointError, LazyTensor, TensorSource, open_tensor_file

if TYPE_CHECKING:
    from diffusers import ControlNetModel

logger = logging.getLogger(__name__)

CONTROL_PREFIX = "control_model."
# Channels of the conditioning-image encoder (`input_hint_block`) in every released SD 1.x / 2.x ControlNet and
# ControlNetModel's default; the original code hard-codes them.
HINT_BLOCK_CHANNELS = (16, 32, 96, 256)
CONFIG_FILE = "config.json"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                # diffusers' `variant="fp16"` names, as on lllyasviel/control_v11* hub folders
                "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin")
# .safetensors is what to publish; .pth / .ckpt (a plain torch.save dict, as lllyasviel's 1.1 release and kohya's
# `--save_model_as ckpt` write) cannot hold metadata.
ORIGINAL_SUFFIXES = (".safetensors", ".pth", ".ckpt", ".pt")
ORIGINAL_IMPLEMENTATION = "https://github.com/lllyasviel/ControlNet"


class ControlNetFormatError(CheckpointError):
    """A ControlNet file or folder that cannot be used (or does not fit the base model); the message names the
    file and what to do. File-level problems (unreadable, truncated, unsafe pickle) are `CheckpointError`s, its base
    class, so catching `CheckpointError` covers both."""


@dataclass
class ControlNetCheckpoint:
    """A ControlNet as its `ControlNetModel` config and tensors under diffusers names (lazy: read when used)."""

    config: dict  # ControlNetModel config ("_class_name" kept, other private keys dropped)
    tensors: dict[str, LazyTensor]  # diffusers key -> tensor
    family: ModelFamily | None = None  # the base model family, when known (the original layout's metadata names it)
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors metadata of the source
    source: Path | None = None
    _open: list[TensorSource] = field(default_factory=list, repr=False)

    def table(self) -> KeyTable:
        return controlnet_key_table(self.config)

    def close(self) -> None:
        for source in self._open:
            source.close()
        self._open.clear()

    def __enter__(self) -> "ControlNetCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------------
# Configs


def _init_params(cls) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self"}


def controlnet_config(unet_config: dict, *, conditioning_channels: int = 3) -> dict:
    """The ControlNetModel config of a ControlNet for a U-Net of `unet_config`: the U-Net's settings that
    ControlNetModel takes (what `ControlNetModel.from_unet` copies) plus the conditioning-image encoder."""
    from diffusers import ControlNetModel

    params = _init_params(ControlNetModel)
    config = {k: copy.deepcopy(v) for k, v in unet_config.items() if k in params}
    config.update(_class_name="ControlNetModel", conditioning_channels=conditioning_channels,
                  conditioning_embedding_out_channels=list(HINT_BLOCK_CHANNELS),
                  controlnet_conditioning_channel_order="rgb")
    return config


def controlnet_config_for_family(family: ModelFamily, size: ModelSize = ModelSize.FULL, *,
                                 conditioning_channels: int = 3) -> dict:
    """The ControlNetModel config for a base family's U-Net (SD 2.x: linear projection and per-block head dims,
    as its U-Net; 768-v: upcast attention)."""
    return controlnet_config(family.configs(size).unet, conditioning_channels=conditioning_channels)


def _twin_unet_config(config: dict) -> dict:
    """The config of a U-Net whose encoder a ControlNet of `config` copies (the decoder side mirrors the encoder;
    it only has to exist so the U-Net key table can be built)."""
    from diffusers import UNet2DConditionModel

    params = _init_params(UNet2DConditionModel)
    unet = {k: v for k, v in config.items() if k in params}
    unet["up_block_types"] = [t.replace("Down", "Up") for t in reversed(config["down_block_types"])]
    return unet


def family_of_config(config: dict) -> ModelFamily | None:
    """The SD family a ControlNet (or U-Net) config belongs to, at full or tiny size; None if none fits.
    SD 2.x base and 768-v differ only in `upcast_attention`."""
    fits = []
    for family in CONTROLNET_FAMILIES.values():
        for size in ModelSize:
            unet = family.configs(size).unet
            if (unet["cross_attention_dim"] == config.get("cross_attention_dim")
                    and list(unet["block_out_channels"]) == list(config.get("block_out_channels", []))):
                fits.append((family, unet))
                break
    for family, unet in fits:
        if bool(unet.get("upcast_attention")) == bool(config.get("upcast_attention")):
            return family
    return fits[0][0] if fits else None


def _describe_context_dim(dim: int) -> str:
    """What kind of ControlNet a cross-attention context width points to."""
    known = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
    if dim in known:
        return f"an {known[dim]} ControlNet"
    for family in CONTROLNET_FAMILIES.values():
        if family.configs(ModelSize.TINY).unet["cross_attention_dim"] == dim:
            return f"a tiny test-size {known[family.configs().unet['cross_attention_dim']]} ControlNet"
    return "a ControlNet of an unknown family"


def _check_fits_base(where: Path, context_dim: int, width: int, base_unet: dict, base_name: str) -> None:
    expected = base_unet["cross_attention_dim"]
    if context_dim != expected:
        raise ControlNetFormatError(
            f"{where}: this ControlNet does not fit the base model ({base_name}): its cross-attention context dim "
            f"is {context_dim}, so it looks like {_describe_context_dim(context_dim)}; the base model's is "
            f"{expected} ({_describe_context_dim(expected).replace(' ControlNet', '')}). Use a ControlNet made for "
            "this base, or give the matching --base_family / --base_model.")
    if width != base_unet["block_out_channels"][0]:
        raise ControlNetFormatError(
            f"{where}: this ControlNet's first block has {width} channels, the base model's U-Net "
            f"{base_unet['block_out_channels'][0]} ({base_name}); it does not fit this base model")


# ----------------------------------------------------------------------------------------------------------
# Key table


def _control_renames(config: dict) -> list[tuple[str, str]]:
    """(diffusers module, original module) pairs for the parts of a ControlNet that a U-Net does not have."""
    # input_hint_block is an nn.Sequential of conv, SiLU, conv, SiLU, ..., zero conv: the convs sit at the even
    # indices. diffusers keeps conv_in, then two convs per channel step (same width, then stride 2), then conv_out.
    n_hint_convs = 2 * (len(config["conditioning_embedding_out_channels"]) - 1)
    renames = [("controlnet_cond_embedding.conv_in", "input_hint_block.0")]
    renames += [(f"controlnet_cond_embedding.blocks.{n}", f"input_hint_block.{2 * n + 2}") for n in range(n_hint_convs)]
    renames.append(("controlnet_cond_embedding.conv_out", f"input_hint_block.{2 * n_hint_convs + 2}"))
    # One zero conv per U-Net input block, numbered like the input blocks: conv_in, then per down block
    # `layers_per_block` resnet(+attention) entries and a downsampler, except after the last block
    # (1 + n * (lpb + 1) - 1).
    n_input_blocks = len(config["down_block_types"]) * (config["layers_per_block"] + 1)
    renames += [(f"controlnet_down_blocks.{i}", f"zero_convs.{i}.0") for i in range(n_input_blocks)]
    renames.append(("controlnet_mid_block", "middle_block_out.0"))
    return renames


# The modules a ControlNet adds to the U-Net encoder it copies (conditioning-image encoder, zero convolutions).
CONTROL_ONLY_MODULES = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")


def _controlnet_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of the ControlNetModel, without allocating it."""
    from diffusers import ControlNetModel

    with torch.device("meta"):
        model = ControlNetModel.from_config(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@lru_cache(maxsize=16)
def _table_cached(config_json: str) -> KeyTable:
    config = json.loads(config_json)
    shapes = _controlnet_shapes(config)
    unet = key_table("unet", _twin_unet_config(config)).by_diffusers()
    control = dict(_control_renames(config))
    mappings = []
    for key, shape in shapes.items():
        if key.startswith(CONTROL_ONLY_MODULES):
            module, param = key.rsplit(".", 1)
            if module not in control:
                raise AssertionError(f"no key-map rule for ControlNet tensor {key!r}")
            original = f"{control[module]}.{param}"
        else:
            mapping = unet.get(key)
            if mapping is None or mapping.diffusers_shapes[0] != shape:
                raise AssertionError(f"no key-map rule for ControlNet tensor {key!r}")
            original = mapping.original[len(key_maps.UNET_PREFIX):]
        mappings.append(TensorMapping(CONTROL_PREFIX + original, (key,), shape, (shape,)))
    return KeyTable("controlnet", tuple(mappings))


def controlnet_key_table(config: dict) -> KeyTable:
    """The complete original <-> diffusers key table of a ControlNet config (original keys with `control_model.`)."""
    # SDXL's size/crop embedding ("text_time": `add_embedding` <-> `label_emb.0`) is in the U-Net table; other
    # extra embeddings belong to models this suite does not know.
    if config.get("addition_embed_type") not in (None, "text_time") or config.get("class_embed_type") \
            or config.get("encoder_hid_dim_type"):
        raise ControlNetFormatError("only SD 1.x / 2.x / SDXL ControlNets have an original-layout key table; this "
                                    "config has other extra embeddings, which are not supported")
    public = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if not k.startswith("_")}
    return _table_cached(json.dumps(public, sort_keys=True))


# ----------------------------------------------------------------------------------------------------------
# Reading


def read_controlnet(path: str | Path, *, family: ModelFamily | None = None, base_unet_config: dict | None = None,
                    allow_unsafe_pickle: bool = False) -> ControlNetCheckpoint:
    """A ControlNet from a diffusers ControlNetModel folder or an original-layout file.

    `family` / `base_unet_config` describe the base model it is used with (the trainer passes both): an original
    file's config is derived from them (from the family's config at the file's size when only the family is
    given), and every input is checked to fit them. Without either, a diffusers folder's family is read from
    its config; an original file's is detected when unambiguous (SD 1.x), else the caller must say."""
    path = Path(path)
    if not path.exists():
        raise ControlNetFormatError(
            f"{path}: no such file or folder. Check the path (a hub model id must be downloaded "
            "to a local folder first).")
    if path.is_dir():
        return _read_diffusers(path, family, base_unet_config)
    return _read_original(path, family, base_unet_config, allow_unsafe_pickle)


def load_controlnet(path: str | Path, *, family: ModelFamily | None = None, base_unet_config: dict | None = None,
                    dtype: torch.dtype = torch.float32, allow_unsafe_pickle: bool = False):
    """`read_controlnet` + `instantiate_controlnet`: a ready `ControlNetModel` from any layout."""
    with read_controlnet(path, family=family, base_unet_config=base_unet_config,
                         allow_unsafe_pickle=allow_unsafe_pickle) as checkpoint:
        return instantiate_controlnet(checkpoint, dtype=dtype)


def instantiate_controlnet(checkpoint: ControlNetCheckpoint, *, dtype: torch.dtype = torch.float32):
    """A `ControlNetModel` holding the checkpoint's tensors (every key present, every shape checked)."""
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel

    with init_empty_weights():
        model = ControlNetModel.from_config(checkpoint.config)
    state = {k: v.load().to(dtype) for k, v in checkpoint.tensors.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    return model


def controlnet_checkpoint(model, *, family: ModelFamily | None = None, metadata: dict[str, str] | None = None,
                          state_dict: dict[str, torch.Tensor] | None = None) -> ControlNetCheckpoint:
    """The inverse of `instantiate_controlnet`: wrap a live ControlNetModel so the writers can save it. `state_dict`:
    its weights, when the module holds only a share of them (FSDP: the full weights gathered from the shards)."""
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(model.config).items()
              if not k.startswith("_")}
    config["_class_name"] = "ControlNetModel"
    weights = model.state_dict() if state_dict is None else state_dict
    tensors = {k: LazyTensor.of(v.detach()) for k, v in weights.items()}
    # A wrapped model (DDP, torch.compile) names its tensors differently: unwrap it first (accelerator.unwrap_model).
    where = Path(f"<{type(model).__name__} in memory>")
    tensors = _validated(TensorSource(where, tensors, {}, {}), _controlnet_shapes(config))
    return ControlNetCheckpoint(config, tensors, family or family_of_config(config), dict(metadata or {}))


# -- diffusers folders


def _read_diffusers(path: Path, family: ModelFamily | None, base_unet_config: dict | None) -> ControlNetCheckpoint:
    folder = path
    if not (folder / CONFIG_FILE).is_file() and (folder / "controlnet" / CONFIG_FILE).is_file():
        # A pipeline folder or a diffusers training checkpoint (checkpoint-N/controlnet/).
        logger.info("%s: reading the ControlNet in its controlnet/ subfolder", path)
        folder = folder / "controlnet"
    if not (folder / CONFIG_FILE).is_file():
        raise ControlNetFormatError(
            f"{path}: not a diffusers ControlNet folder: there is no {CONFIG_FILE}. Point at the "
            "folder holding config.json and diffusion_pytorch_model.safetensors, or at an "
            "original-layout .safetensors / .pth file.")
    config = _load_json(folder / CONFIG_FILE)
    if config.get("_class_name") not in (None, "ControlNetModel"):
        raise ControlNetFormatError(f"{folder / CONFIG_FILE}: describes a {config.get('_class_name')}, not a "
                                    "ControlNetModel")
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config["_class_name"] = "ControlNetModel"
    if base_unet_config is not None or family is not None:
        base = base_unet_config if base_unet_config is not None else family.configs(_size_of(family, config)).unet
        _check_fits_base(folder, config.get("cross_attention_dim"), config.get("block_out_channels", [0])[0], base,
                         family.description if family else "the base model")
    family = family or family_of_config(config)
    source = _open_weights(folder)
    try:
        tensors = _validated(source, _controlnet_shapes(config))
    except Exception:
        source.close()
        raise
    metadata = {k: v for k, v in source.metadata.items() if k != "format"}
    return ControlNetCheckpoint(config, tensors, family, metadata, source=path, _open=[source])


def _size_of(family: ModelFamily, config: dict) -> ModelSize:
    width = config.get("block_out_channels", [0])[0]
    for size in ModelSize:
        if family.configs(size).unet["block_out_channels"][0] == width:
            return size
    return ModelSize.FULL


def _open_weights(folder: Path) -> TensorSource:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return open_tensor_file(folder / name)
    shards = sorted(folder.glob("*.index.json"))
    if shards:
        raise ControlNetFormatError(f"{folder}: sharded weights ({shards[0].name}) are not supported for a ControlNet; "
                                    "save it unsharded")
    raise ControlNetFormatError(f"{folder}: no weight file (looked for {', '.join(WEIGHT_FILES)})")


def _validated(source: TensorSource, expected: dict[str, tuple[int, ...]]) -> dict[str, LazyTensor]:
    tensors = source.tensors
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise ControlNetFormatError(f"{source.path}: {len(missing)} ControlNet tensor(s) missing: {_listing(missing)}. "
                                    "The file is incomplete or made for a different config.")
    wrong = [f"{k}: {tuple(tensors[k].shape)} (expected {expected[k]})" for k in expected
             if not shape_compatible(tensors[k].shape, expected[k])]
    if wrong:
        raise ControlNetFormatError(f"{source.path}: {len(wrong)} tensor(s) with the wrong shape: {_listing(wrong, 4)}")
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise ControlNetFormatError(f"{source.path}: {len(unknown)} unknown tensor(s) for this ControlNet config: "
                                    f"{_listing(unknown)}")
    return {k: _reshaped(tensors[k], expected[k], k) for k in expected}


# -- original files


class _Layout(enum.Enum):
    ORIGINAL = "original"  # control_model.* names, prefix stripped
    DIFFUSERS = "diffusers"  # a diffusers-named ControlNet saved as a single file
    # kohya's sdxl_train_control_net.py: the copied U-Net encoder under its original names (input_blocks.*,
    # label_emb.*, no prefix), the added modules under diffusers' names (controlnet_cond_embedding.*, ...).
    KOHYA = "kohya"


# Tensors from which an original file's config is derived, per key layout (after stripping `control_model.`), as
# patterns: the first attention block is input block 1 / down block 0 in SD 1.x / 2.x, input block 4 / down block 1
# in SDXL (whose first level has none). Any attention block tells the context width and the projection type.
_PROBES = {
    _Layout.ORIGINAL: {"conv_in": r"input_blocks\.0\.0\.weight", "hint": r"input_hint_block\.0\.weight",
                       "context": r"input_blocks\.\d+\.1\.transformer_blocks\.0\.attn2\.to_k\.weight",
                       "proj_in": r"input_blocks\.\d+\.1\.proj_in\.weight"},
    _Layout.DIFFUSERS: {"conv_in": r"conv_in\.weight", "hint": r"controlnet_cond_embedding\.conv_in\.weight",
                        "context": r"down_blocks\.\d+\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k\.weight",
                        "proj_in": r"down_blocks\.\d+\.attentions\.0\.proj_in\.weight"},
}
_PROBES[_Layout.KOHYA] = dict(_PROBES[_Layout.ORIGINAL], hint=_PROBES[_Layout.DIFFUSERS]["hint"])
# ControlNet 1.0 files bundle the SD model the ControlNet was trained with; those parts are not the ControlNet.
_BUNDLED_BASE_PREFIXES = (key_maps.UNET_PREFIX, key_maps.VAE_PREFIX, "cond_stage_model.", "model_ema.")


def _controlnet_part(source: TensorSource) -> tuple[_Layout, dict[str, LazyTensor]]:
    """The ControlNet's tensors of an original-layout file, `control_model.` stripped, and their key layout."""
    tensors, path = source.tensors, source.path
    if "difference" in tensors:
        raise ControlNetFormatError(f"{path}: a 'difference' ControlNet (weights stored relative to a base model, an "
                                    "old WebUI-extension format); not supported. Use the regular ControlNet file.")
    prefixed = {k[len(CONTROL_PREFIX):]: v for k, v in tensors.items() if k.startswith(CONTROL_PREFIX)}
    if prefixed:
        rest = [k for k in tensors if not k.startswith(CONTROL_PREFIX)]
        bundled = [k for k in rest if k.startswith(_BUNDLED_BASE_PREFIXES) or k in key_maps.LDM_SCHEDULE_BUFFERS]
        unknown = sorted(set(rest) - set(bundled))
        if unknown:
            raise ControlNetFormatError(f"{path}: {len(unknown)} unknown tensor(s) beside the ControlNet: "
                                        f"{_listing(unknown)}. Nothing was converted.")
        if bundled:
            logger.info("%s: the file also holds a Stable Diffusion model (%d tensors, ControlNet 1.0 release "
                        "format); only its control_model.* part is read", path, len(bundled))
        return _Layout.ORIGINAL, prefixed
    if "controlnet_cond_embedding.conv_in.weight" in tensors and "input_blocks.0.0.weight" in tensors:
        return _Layout.KOHYA, dict(tensors)
    if "input_hint_block.0.weight" in tensors or "time_embed.0.weight" in tensors:
        return _Layout.ORIGINAL, dict(tensors)
    if "controlnet_cond_embedding.conv_in.weight" in tensors:
        return _Layout.DIFFUSERS, dict(tensors)
    if key_maps.UNET_PREFIX + "input_blocks.0.0.weight" in tensors:
        raise ControlNetFormatError(f"{path}: this is a Stable Diffusion checkpoint, not a ControlNet")
    if any("lora" in k for k in tensors) or "ss_network_module" in source.metadata:
        raise ControlNetFormatError(f"{path}: this looks like a LoRA (or Control-LoRA) file, not a ControlNet")
    raise ControlNetFormatError(f"{path}: no ControlNet tensors found (expected control_model.input_hint_block.*, "
                                "control_model.zero_convs.*, ... or diffusers controlnet_cond_embedding.* names)")


def _probe(tensors: dict[str, LazyTensor], layout: _Layout, what: str, path: Path) -> LazyTensor:
    pattern = re.compile(_PROBES[layout][what])
    names = [k for k in tensors if pattern.fullmatch(k)]
    if not names:
        shown = pattern.pattern.replace("\\d+", "N").replace("\\", "")
        shown = CONTROL_PREFIX + shown if layout is _Layout.ORIGINAL else shown
        raise ControlNetFormatError(
            f"{path}: no tensor {shown!r}; the file is not a complete SD 1.x / 2.x / SDXL ControlNet")
    return tensors[min(names, key=lambda k: [int(n) for n in re.findall(r"\d+", k)])]


def _base_unet_for(path: Path, family: ModelFamily | None, base_unet_config: dict | None, context_dim: int,
                   width: int) -> tuple[ModelFamily | None, dict]:
    if base_unet_config is not None:
        _check_fits_base(path, context_dim, width, base_unet_config,
                         family.description if family else "the given base model")
        return family or family_of_config(base_unet_config), base_unet_config
    if family is None:
        fitting = [f for f in CONTROLNET_FAMILIES.values()
                   if any(f.configs(s).unet["cross_attention_dim"] == context_dim
                          and f.configs(s).unet["block_out_channels"][0] == width for s in ModelSize)]
        if len(fitting) != 1:
            names = ", ".join(f.name for f in fitting) or ", ".join(CONTROLNET_FAMILIES)
            raise ControlNetFormatError(
                f"{path}: an original-layout ControlNet does not say which base model it belongs "
                f"to; it looks like {_describe_context_dim(context_dim)}. Give the base family "
                f"(one of {names}) or the base model (--base_family / --base_model).")
        family = fitting[0]
        logger.info("%s: %s (detected from its cross-attention width %d)", path, family.description, context_dim)
    sizes = [s for s in ModelSize if family.configs(s).unet["block_out_channels"][0] == width] or [ModelSize.FULL]
    unet = family.configs(sizes[0]).unet
    _check_fits_base(path, context_dim, width, unet, family.description)
    return family, unet


def _read_original(path: Path, family: ModelFamily | None, base_unet_config: dict | None,
                   allow_unsafe_pickle: bool) -> ControlNetCheckpoint:
    source = open_tensor_file(path, allow_unsafe_pickle=allow_unsafe_pickle)
    try:
        layout, tensors = _controlnet_part(source)
        conv_in = _probe(tensors, layout, "conv_in", path)
        context = _probe(tensors, layout, "context", path)
        hint = _probe(tensors, layout, "hint", path)
        proj_in = _probe(tensors, layout, "proj_in", path)
        family, base_unet = _base_unet_for(path, family, base_unet_config, context.shape[-1], conv_in.shape[0])
        config = controlnet_config(base_unet, conditioning_channels=hint.shape[1])
        # SD 2.x ControlNets store the transformers' proj_in/proj_out as Linear (as SD 2.x does), conversions of
        # older ones as 1x1 convs: follow the file, so converting back gives the same tensors.
        config["use_linear_projection"] = len(proj_in.shape) == 2
        if layout is _Layout.DIFFUSERS:
            mapped = _validated(TensorSource(path, tensors, {}, {}), _controlnet_shapes(config))
        else:
            mapped = _map_original(path, tensors, controlnet_key_table(config), layout)
    except Exception:
        source.close()
        raise
    metadata = {k: v for k, v in source.metadata.items() if k != "format"}  # diffusers' weight-file boilerplate
    return ControlNetCheckpoint(config, mapped, family, metadata, source=path, _open=[source])


def _file_key(mapping: TensorMapping, layout: _Layout) -> str:
    """The name of a table entry in a file of `layout` (ORIGINAL or KOHYA), `control_model.` stripped."""
    if layout is _Layout.KOHYA and mapping.diffusers[0].startswith(CONTROL_ONLY_MODULES):
        return mapping.diffusers[0]
    return mapping.original[len(CONTROL_PREFIX):]


def _map_original(path: Path, tensors: dict[str, LazyTensor], table: KeyTable, layout: _Layout) -> dict[str, LazyTensor]:
    out: dict[str, LazyTensor] = {}
    missing, wrong = [], []
    shown = (lambda key: key) if layout is _Layout.KOHYA else (lambda key: CONTROL_PREFIX + key)
    for mapping in table.mappings:
        key = _file_key(mapping, layout)
        lazy = tensors.get(key)
        if lazy is None:
            missing.append(shown(key))
        elif not shape_compatible(lazy.shape, mapping.original_shape):
            wrong.append(f"{shown(key)}: {tuple(lazy.shape)} (expected {mapping.original_shape})")
        else:
            out[mapping.diffusers[0]] = _reshaped(lazy, mapping.diffusers_shapes[0], key)
    if missing:
        raise ControlNetFormatError(
            f"{path}: {len(missing)} ControlNet tensor(s) missing: {_listing(missing)}. The file "
            "is incomplete or not a ControlNet of this base model.")
    if wrong:
        raise ControlNetFormatError(
            f"{path}: {len(wrong)} tensor(s) with the wrong shape: {_listing(wrong, 4)}. The file "
            "does not fit this base model.")
    known = {_file_key(m, layout) for m in table.mappings}
    unknown = sorted(shown(k) for k in set(tensors) - known)
    if unknown:
        raise ControlNetFormatError(
            f"{path}: {len(unknown)} unknown ControlNet tensor(s): {_listing(unknown)}. The file "
            "may be a different adapter type; nothing was converted.")
    return out


# ----------------------------------------------------------------------------------------------------------
# Writing


class ControlNetLayout(enum.Enum):
    SINGLE_FILE = "single-file"  # one file, the family's single-file key names (WebUI extension, ComfyUI)
    DIFFUSERS = "diffusers"  # a ControlNetModel folder

    @classmethod
    def from_path(cls, path: Path) -> "ControlNetLayout":
        suffix = Path(path).suffix.lower()
        if suffix in ORIGINAL_SUFFIXES:
            return cls.SINGLE_FILE
        if suffix and not Path(path).is_dir():
            raise ValueError(f"{path}: cannot tell the output layout from the suffix {suffix!r}; use .safetensors "
                             "(one file; .pth / .ckpt also work, without metadata) or a folder name without "
                             "a suffix (diffusers)")
        return cls.DIFFUSERS


def _cast(lazy: LazyTensor, dtype: torch.dtype | None) -> LazyTensor:
    if dtype is None or not lazy.dtype.is_floating_point or lazy.dtype == dtype:
        return lazy
    return LazyTensor(lazy.shape, dtype, lambda: lazy.load().to(dtype))


def _as_checkpoint(source, family: ModelFamily | None) -> ControlNetCheckpoint:
    """Writers take a `ControlNetCheckpoint` or a live `ControlNetModel` (unwrapped from accelerate / compile)."""
    return source if isinstance(source, ControlNetCheckpoint) else controlnet_checkpoint(source, family=family)


def original_controlnet_tensors(checkpoint: ControlNetCheckpoint,
                                dtype: torch.dtype | None = None) -> dict[str, LazyTensor]:
    """Every tensor of the original layout (`control_model.*`), in table order."""
    out = {}
    for mapping in checkpoint.table().mappings:
        lazy = checkpoint.tensors[mapping.diffusers[0]]
        out[mapping.original] = _cast(_reshaped(lazy, mapping.original_shape, mapping.diffusers[0]), dtype)
    return out


def controlnet_metadata(checkpoint: ControlNetCheckpoint, family: ModelFamily, *, title: str,
                        extra: dict[str, str] | None = None) -> dict[str, str]:
    """Source metadata carried over, with the modelspec keys that describe this ControlNet set anew."""
    metadata = dict(checkpoint.metadata)
    metadata.update(modelspec_keys(family, family.prediction_type, kind="controlnet",
                                   implementation=ORIGINAL_IMPLEMENTATION))
    metadata.setdefault("modelspec.title", title)
    metadata.update(extra or {})
    return metadata


def save_controlnet_original(checkpoint: ControlNetCheckpoint | ControlNetModel, dest: str | Path, *,
                             family: ModelFamily | None = None, dtype: torch.dtype | None = None,
                             metadata: dict[str, str] | None = None, progress: bool = False) -> Path:
    """Write the original layout (`control_model.*` keys), atomically: `.safetensors` with modelspec metadata
    (`modelspec.architecture` = "<family>/controlnet"; `metadata` is added last and may set the title), or a
    `.pth` / `.ckpt` state dict (no metadata)."""
    checkpoint = _as_checkpoint(checkpoint, family)
    return _write_single_file(checkpoint, original_controlnet_tensors(checkpoint, dtype), Path(dest),
                              family=family, metadata=metadata, progress=progress)


def save_controlnet_file(checkpoint: ControlNetCheckpoint | ControlNetModel, dest: str | Path, *,
                         family: ModelFamily | None = None, dtype: torch.dtype | None = None,
                         metadata: dict[str, str] | None = None, progress: bool = False) -> Path:
    """Write one file with the key names the family's users load in WebUI / ComfyUI (`ModelFamily.
    controlnet_file_keys`): the original layout for SD 1.x / 2.x, diffusers names for SDXL; same metadata and
    atomicity as `save_controlnet_original`."""
    checkpoint = _as_checkpoint(checkpoint, family)
    family = _family_of(checkpoint, family)
    if family.controlnet_file_keys == "original":
        return save_controlnet_original(checkpoint, dest, family=family, dtype=dtype, metadata=metadata,
                                        progress=progress)
    tensors = {k: _cast(v, dtype) for k, v in checkpoint.tensors.items()}
    return _write_single_file(checkpoint, tensors, Path(dest), family=family, metadata=metadata, progress=progress)


def _family_of(checkpoint: ControlNetCheckpoint, family: ModelFamily | None) -> ModelFamily:
    family = family or checkpoint.family or family_of_config(checkpoint.config)
    if family is None:
        raise ValueError("the base model family of this ControlNet is unknown; pass it (--base_family)")
    return family


def _write_single_file(checkpoint: ControlNetCheckpoint, tensors: dict[str, LazyTensor], dest: Path, *,
                       family: ModelFamily | None, metadata: dict[str, str] | None, progress: bool) -> Path:
    if dest.suffix.lower() not in ORIGINAL_SUFFIXES:
        raise ValueError(f"{dest}: a single-file ControlNet is written as {' / '.join(ORIGINAL_SUFFIXES)}")
    family = _family_of(checkpoint, family)
    with _progress(tensors, enabled=progress, desc=f"writing {dest.name}") as counted:
        if dest.suffix.lower() == ".safetensors":
            file_metadata = controlnet_metadata(checkpoint, family, title=dest.stem, extra=metadata)
            write_safetensors(dest, [TensorEntry(k, v.dtype, v.shape, v.load) for k, v in counted.items()],
                              file_metadata)
        else:
            if metadata:
                logger.warning("%s: a %s file cannot hold metadata; use .safetensors to keep it", dest, dest.suffix)
            state_dict = {k: v.load().cpu().contiguous() for k, v in counted.items()}
            with atomic_file(dest) as tmp:
                torch.save(state_dict, tmp)
    return dest


def _full_config(config: dict) -> dict:
    """The config with every default spelled out, as diffusers' save_pretrained writes it."""
    from diffusers import ControlNetModel
    from diffusers import __version__ as diffusers_version

    with torch.device("meta"):
        full = dict(ControlNetModel.from_config(config).config)
    out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in full.items() if not k.startswith("_")}
    return {"_class_name": "ControlNetModel", "_diffusers_version": diffusers_version, **out}


def save_controlnet_diffusers(checkpoint: ControlNetCheckpoint | ControlNetModel, dest: str | Path, *,
                              dtype: torch.dtype | None = None, progress: bool = False) -> Path:
    """Write a diffusers ControlNetModel folder (config.json + diffusion_pytorch_model.safetensors), atomically
    as a whole folder. The source metadata rides along in the weights file."""
    checkpoint = _as_checkpoint(checkpoint, None)
    dest = Path(dest)
    if dest.is_dir() and any(dest.iterdir()) and not (dest / CONFIG_FILE).is_file():
        # The folder is replaced as a whole; never do that to a folder that is not a model we could have written.
        raise OutputPathError(f"{dest}: refusing to replace this folder: it is not empty and not a diffusers model "
                              "(no config.json). Choose a new folder name for the output.")
    tensors = {k: _cast(v, dtype) for k, v in checkpoint.tensors.items()}
    with atomic_directory(dest) as tmp, _progress(tensors, enabled=progress, desc=f"writing {dest.name}") as counted:
        (tmp / CONFIG_FILE).write_text(json.dumps(_full_config(checkpoint.config), indent=2, sort_keys=True) + "\n")
        write_safetensors(tmp / WEIGHT_FILES[0], [TensorEntry(k, v.dtype, v.shape, v.load) for k, v in counted.items()],
                          {**checkpoint.metadata, "format": "pt"})
    return dest


def save_controlnet(checkpoint: ControlNetCheckpoint | ControlNetModel, dest: str | Path, *,
                    family: ModelFamily | None = None, dtype: torch.dtype | None = None,
                    metadata: dict[str, str] | None = None, progress: bool = False) -> Path:
    """Write in the layout the path asks for: `.safetensors` (or `.pth` / `.ckpt`) = one file with the family's
    single-file key names (`save_controlnet_file`), a folder = diffusers."""
    checkpoint = _as_checkpoint(checkpoint, family)
    if ControlNetLayout.from_path(Path(dest)) is ControlNetLayout.SINGLE_FILE:
        return save_controlnet_file(checkpoint, dest, family=family, dtype=dtype, metadata=metadata,
                                    progress=progress)
    if metadata:
        checkpoint = replace(checkpoint, metadata={**checkpoint.metadata, **metadata})
    return save_controlnet_diffusers(checkpoint, dest, dtype=dtype, progress=progress)


@contextmanager
def _progress(tensors: dict[str, LazyTensor], *, enabled: bool, desc: str) -> Iterator[dict[str, LazyTensor]]:
    """The same tensors, whose loads tick a progress bar (with ETA) when enabled."""
    if not enabled:
        yield tensors
        return
    from tqdm import tqdm

    bar = tqdm(total=len(tensors), desc=desc, unit="tensor")

    def ticking(lazy: LazyTensor) -> LazyTensor:
        def load() -> torch.Tensor:
            tensor = lazy.load()
            bar.update(1)
            return tensor
        return LazyTensor(lazy.shape, lazy.dtype, load)

    try:
        yield {k: ticking(v) for k, v in tensors.items()}
    finally:
        bar.close()
