"""Key maps between original (LDM, as WebUI / ComfyUI read it) and diffusers/transformers layouts.

The maps are data: for a model config we list, for every tensor of the diffusers model, the original key it
corresponds to and how the tensor changes shape on the way. One table serves both directions, so the two
directions cannot drift apart, and a table can be tested without any file.

How a table is built: module-prefix renames (the block-index arithmetic of the LDM UNet, the VAE's reversed
decoder, OpenCLIP's layer names) are generated from the config; then every key of the diffusers model
(instantiated on the meta device, so nothing is allocated) is renamed through them. A key no rename covers is a
bug in this file and raises at table-build time, so a table is always complete.

Shape changes that exist between the layouts:
- the VAE mid-block attention stores q/k/v/proj_out as 1x1 convolutions in the original, Linear in diffusers;
- OpenCLIP (SD 2.x, SDXL) fuses q, k and v into one `in_proj_weight` / `in_proj_bias`;
- OpenCLIP stores the text projection as the matrix it multiplies by (`x @ text_projection`), diffusers as a
  Linear weight: one is the transpose of the other (SDXL's `text_encoder_2`);
- SD 2.x UNet proj_in/proj_out may be 1x1 convs or Linear (the config's `use_linear_projection` follows the file).

Where a text encoder lives in an original file, and in which layout, is the family's `TextEncoderSlot`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from library.families import TextEncoderKind, TextEncoderSlot

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


@dataclass(frozen=True)
class TensorMapping:
    """One tensor of the original layout and the diffusers tensor(s) it holds."""

    original: str
    diffusers: tuple[str, ...]  # several names: fused along dim 0 in the original (q, k, v)
    original_shape: tuple[int, ...]
    diffusers_shapes: tuple[tuple[int, ...], ...]
    transposed: bool = False  # the original is the transpose of the (one) diffusers tensor

    @property
    def same_bytes(self) -> bool:
        """Whether the tensor's bytes move unchanged between the layouts (renamed, perhaps reshaped), so a writer
        may copy them from the source file; fused (q, k, v) and transposed tensors are recomputed."""
        return len(self.diffusers) == 1 and not self.transposed


@dataclass(frozen=True)
class KeyTable:
    component: str  # "unet" | "vae" | a text encoder's pipeline component ("text_encoder", "text_encoder_2")
    mappings: tuple[TensorMapping, ...]

    def by_original(self) -> dict[str, TensorMapping]:
        return {m.original: m for m in self.mappings}

    def by_diffusers(self) -> dict[str, TensorMapping]:
        return {name: m for m in self.mappings for name in m.diffusers}


# ----------------------------------------------------------------------------------------------------------
# Tensor transforms (shared by both directions)


def _same_but_singletons(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """True if two shapes differ only by trailing size-1 dims (Linear [o, i] vs 1x1 conv [o, i, 1, 1])."""
    strip = lambda s: tuple(s[:2]) if len(s) > 2 and all(d == 1 for d in s[2:]) else tuple(s)  # noqa: E731
    return strip(a) == strip(b)


def reshape_checked(tensor: torch.Tensor, shape: tuple[int, ...], name: str) -> torch.Tensor:
    if tuple(tensor.shape) == tuple(shape):
        return tensor
    if _same_but_singletons(tuple(tensor.shape), tuple(shape)):
        return tensor.reshape(shape)
    raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")


def shape_compatible(actual: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    return tuple(actual) == tuple(expected) or _same_but_singletons(tuple(actual), tuple(expected))


def split_original(mapping: TensorMapping, tensor: torch.Tensor) -> list[torch.Tensor]:
    """Original tensor -> the diffusers tensor(s) it holds, in `mapping.diffusers` order."""
    if mapping.transposed:
        return [reshape_checked(tensor.T.contiguous(), mapping.diffusers_shapes[0], mapping.original)]
    if len(mapping.diffusers) == 1:
        return [reshape_checked(tensor, mapping.diffusers_shapes[0], mapping.original)]
    sizes = [s[0] for s in mapping.diffusers_shapes]
    if tensor.shape[0] != sum(sizes):
        raise ValueError(f"tensor {mapping.original!r} has shape {tuple(tensor.shape)}, expected "
                         f"{tuple(mapping.original_shape)}")
    return [part.clone() for part in torch.split(tensor, sizes, dim=0)]


def join_diffusers(mapping: TensorMapping, tensors: list[torch.Tensor]) -> torch.Tensor:
    """The diffusers tensor(s) of a mapping -> the original tensor."""
    checked = [reshape_checked(t, s, n) for t, s, n in zip(tensors, mapping.diffusers_shapes, mapping.diffusers)]
    if mapping.transposed:
        return reshape_checked(checked[0].T.contiguous(), mapping.original_shape, mapping.diffusers[0])
    if len(checked) == 1:
        return reshape_checked(checked[0], mapping.original_shape, mapping.diffusers[0])
    return torch.cat(checked, dim=0)


# ----------------------------------------------------------------------------------------------------------
# Prefix renames, generated from the config


def _unet_renames(config: dict) -> list[tuple[str, str]]:
    """(diffusers module prefix, original module prefix) pairs for the UNet."""
    lpb = config["layers_per_block"]
    renames = [
        ("time_embedding.linear_1", "time_embed.0"),
        ("time_embedding.linear_2", "time_embed.2"),
        ("conv_in", "input_blocks.0.0"),
        ("conv_norm_out", "out.0"),
        ("conv_out", "out.2"),
        ("mid_block.resnets.0", "middle_block.0"),
        ("mid_block.attentions.0", "middle_block.1"),
        ("mid_block.resnets.1", "middle_block.2"),
        # SDXL's pooled-text + size/crop conditioning MLP (absent from SD 1.x / 2.x configs).
        ("add_embedding.linear_1", "label_emb.0.0"),
        ("add_embedding.linear_2", "label_emb.0.2"),
    ]
    resnets = ["mid_block.resnets.0", "mid_block.resnets.1"]
    # LDM numbers input blocks consecutively: conv_in is 0, then per down block `lpb` (resnet [+ attention])
    # entries and one downsampler entry.
    for i in range(len(config["down_block_types"])):
        for j in range(lpb):
            idx = 1 + i * (lpb + 1) + j
            renames.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{idx}.0"))
            renames.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{idx}.1"))
            resnets.append(f"down_blocks.{i}.resnets.{j}")
        renames.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{(i + 1) * (lpb + 1)}.0.op"))
    # Output blocks: `lpb + 1` per up block; the upsampler sits after the attention when the block has one.
    for i, block_type in enumerate(config["up_block_types"]):
        for j in range(lpb + 1):
            idx = i * (lpb + 1) + j
            renames.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{idx}.0"))
            renames.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{idx}.1"))
            resnets.append(f"up_blocks.{i}.resnets.{j}")
        upsampler_slot = 2 if "CrossAttn" in block_type else 1
        renames.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{i * (lpb + 1) + lpb}.{upsampler_slot}.conv"))
    # Inside a resnet the names differ too.
    module_of = dict(renames)
    resnet_parts = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                    ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
    for resnet in resnets:
        for d_part, o_part in resnet_parts:
            renames.append((f"{resnet}.{d_part}", f"{module_of[resnet]}.{o_part}"))
    return [(d, UNET_PREFIX + o) for d, o in renames]


def _vae_renames(config: dict) -> list[tuple[str, str]]:
    n_blocks = len(config["block_out_channels"])
    resnet_parts = [("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
                    ("conv_shortcut", "nin_shortcut")]
    renames: list[tuple[str, str]] = []
    resnets: list[tuple[str, str]] = []
    for coder in ("encoder", "decoder"):
        renames += [(f"{coder}.conv_in", f"{coder}.conv_in"), (f"{coder}.conv_out", f"{coder}.conv_out"),
                    (f"{coder}.conv_norm_out", f"{coder}.norm_out")]
        resnets += [(f"{coder}.mid_block.resnets.0", f"{coder}.mid.block_1"),
                    (f"{coder}.mid_block.resnets.1", f"{coder}.mid.block_2")]
        attn_d, attn_o = f"{coder}.mid_block.attentions.0", f"{coder}.mid.attn_1"
        renames += [(f"{attn_d}.group_norm", f"{attn_o}.norm"), (f"{attn_d}.to_q", f"{attn_o}.q"),
                    (f"{attn_d}.to_k", f"{attn_o}.k"), (f"{attn_d}.to_v", f"{attn_o}.v"),
                    (f"{attn_d}.to_out.0", f"{attn_o}.proj_out")]
    for i in range(n_blocks):
        for j in range(config["layers_per_block"]):
            resnets.append((f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}"))
        renames.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv"))
        # The original decoder numbers its up blocks from the lowest resolution upwards, diffusers the reverse.
        o = n_blocks - 1 - i
        for j in range(config["layers_per_block"] + 1):
            resnets.append((f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{o}.block.{j}"))
        renames.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{o}.upsample.conv"))
    for d_res, o_res in resnets:
        renames += [(f"{d_res}.{d}", f"{o_res}.{o}") for d, o in resnet_parts]
    renames += [("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")]
    return [(d, VAE_PREFIX + o) for d, o in renames]


def _openclip_renames(num_layers: int) -> list[tuple[str, str]]:
    """(diffusers module below the text model, OpenCLIP module) pairs."""
    renames = [("embeddings.token_embedding", "token_embedding"), ("final_layer_norm", "ln_final")]
    for i in range(num_layers):
        d, o = f"encoder.layers.{i}", f"transformer.resblocks.{i}"
        renames += [(f"{d}.layer_norm1", f"{o}.ln_1"), (f"{d}.layer_norm2", f"{o}.ln_2"),
                    (f"{d}.self_attn.out_proj", f"{o}.attn.out_proj"),
                    (f"{d}.mlp.fc1", f"{o}.mlp.c_fc"), (f"{d}.mlp.fc2", f"{o}.mlp.c_proj")]
    return renames


def _rename(key: str, renames: Sequence[tuple[str, str]]) -> str | None:
    """Rename `key` by its longest matching module prefix."""
    best = None
    for src, dst in renames:
        if (key == src or key.startswith(src + ".")) and (best is None or len(src) > len(best[0])):
            best = (src, dst)
    return None if best is None else best[1] + key[len(best[0]):]


@lru_cache(maxsize=8)
def _unet_renames_of(layers_per_block: int, down_block_types: tuple[str, ...],
                     up_block_types: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    return tuple(_unet_renames({"layers_per_block": layers_per_block, "down_block_types": down_block_types,
                                "up_block_types": up_block_types}))


def original_unet_module(config: dict, module_path: str) -> str:
    """The original (LDM / Stability) path of a diffusers U-Net module or tensor, without `model.diffusion_model.`:
    `down_blocks.1.attentions.0.proj_in` -> `input_blocks.4.1.proj_in`. The renames of the U-Net key table, so the
    path agrees with the checkpoint keys by construction (kohya's SDXL LoRA names are built from it)."""
    renames = _unet_renames_of(config["layers_per_block"], tuple(config["down_block_types"]),
                               tuple(config["up_block_types"]))
    original = _rename(module_path, renames)
    if original is None:
        raise ValueError(f"no original-layout name for the diffusers U-Net module {module_path!r}")
    return original[len(UNET_PREFIX):]


def _original_shape(diffusers_key: str, shape: tuple[int, ...], component: str) -> tuple[int, ...]:
    # The original VAE mid-block attention uses 1x1 convolutions where diffusers uses Linear layers.
    if component == "vae" and ".mid_block.attentions.0.to_" in diffusers_key and diffusers_key.endswith(".weight"):
        return (*shape, 1, 1)
    return shape


# ----------------------------------------------------------------------------------------------------------
# Tables


def _diffusers_shapes(component: str, config: dict, kind: TextEncoderKind | None) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of the diffusers model, in its state-dict order, without allocating it (built on
    the meta device once, then read from `meta_model_cache`, so that reading a checkpoint need not import diffusers)."""
    from library.meta_model_cache import cached

    inputs = {"fact": "state_dict_shapes", "component": component, "kind": kind.value if kind else None,
              "config": config}
    pairs = cached(inputs, lambda: [[k, list(s)] for k, s in _meta_model_shapes(component, config, kind).items()])
    return {key: tuple(shape) for key, shape in pairs}


def _meta_model_shapes(component: str, config: dict, kind: TextEncoderKind | None) -> dict[str, tuple[int, ...]]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    import transformers

    with torch.device("meta"):
        if component == "unet":
            model = UNet2DConditionModel.from_config(config)
        elif component == "vae":
            model = AutoencoderKL.from_config(config)
        else:
            model = getattr(transformers, kind.transformers_class)(transformers.CLIPTextConfig(**config))
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}


@lru_cache(maxsize=32)
def _table_cached(component: str, config_json: str, slot: TextEncoderSlot | None) -> KeyTable:
    import json

    config = json.loads(config_json)
    shapes = _diffusers_shapes(component, config, slot.kind if slot else None)
    if slot is not None and slot.kind is TextEncoderKind.CLIP_L:
        mappings = [TensorMapping(slot.original_prefix + k, (k,), s, (s,)) for k, s in shapes.items()]
        return KeyTable(component, tuple(mappings))
    if slot is not None:
        return _openclip_table(component, shapes, config["num_hidden_layers"], slot.original_prefix)
    renames = _unet_renames(config) if component == "unet" else _vae_renames(config)
    mappings = []
    for key, shape in shapes.items():
        original = _rename(key, renames)
        if original is None:
            raise AssertionError(f"no key-map rule for diffusers {component} tensor {key!r}")
        mappings.append(TensorMapping(original, (key,), _original_shape(key, shape, component), (shape,)))
    return KeyTable(component, tuple(mappings))


def _openclip_table(component: str, shapes: dict[str, tuple[int, ...]], num_layers: int, prefix: str) -> KeyTable:
    # CLIPTextModelWithProjection keeps the text model below `text_model.`; CLIPTextModel (transformers 5) does not.
    wrap = "text_model." if any(k.startswith("text_model.") for k in shapes) else ""
    renames = [(wrap + d, prefix + o) for d, o in _openclip_renames(num_layers)]
    mappings = []
    handled = set()
    for i in range(num_layers):
        for kind in ("weight", "bias"):
            parts = tuple(f"{wrap}encoder.layers.{i}.self_attn.{p}_proj.{kind}" for p in "qkv")
            part_shapes = tuple(shapes[p] for p in parts)
            fused_shape = (sum(s[0] for s in part_shapes), *part_shapes[0][1:])
            mappings.append(TensorMapping(f"{prefix}transformer.resblocks.{i}.attn.in_proj_{kind}",
                                          parts, fused_shape, part_shapes))
            handled.update(parts)
    # OpenCLIP stores the positional embedding as a bare parameter, not an Embedding module.
    position = wrap + "embeddings.position_embedding.weight"
    mappings.append(TensorMapping(prefix + "positional_embedding", (position,), shapes[position], (shapes[position],)))
    handled.add(position)
    if "text_projection.weight" in shapes:
        out_dim, width = shapes["text_projection.weight"]
        mappings.append(TensorMapping(prefix + "text_projection", ("text_projection.weight",), (width, out_dim),
                                      ((out_dim, width),), transposed=True))
        handled.add("text_projection.weight")
    for key, shape in shapes.items():
        if key in handled:
            continue
        original = _rename(key, renames)
        if original is None:
            raise AssertionError(f"no key-map rule for diffusers text-encoder tensor {key!r}")
        mappings.append(TensorMapping(original, (key,), shape, (shape,)))
    return KeyTable(component, tuple(mappings))


def key_table(component: str, config: dict, text_encoder: TextEncoderSlot | None = None) -> KeyTable:
    """The complete key table of one component for a diffusers config: "unet", "vae", or a text encoder (then
    `text_encoder`, the family's slot for it, says where and in which layout an original file keeps it)."""
    import json

    if component in ("unet", "vae"):
        text_encoder = None
    elif text_encoder is None or text_encoder.component != component:
        raise ValueError(f"the key table of {component!r} needs that text encoder's slot of the family")
    return _table_cached(component, json.dumps(config, sort_keys=True), text_encoder)


def token_embedding_key(slot: TextEncoderSlot) -> str:
    """The original key of a text encoder's token embedding (its width tells the model size)."""
    if slot.kind.openclip_layout:
        return slot.original_prefix + "token_embedding.weight"
    return slot.original_prefix + "embeddings.token_embedding.weight"


# ----------------------------------------------------------------------------------------------------------
# Original-layout tensors that are not part of the diffusers models


_OPENCLIP_LAYER_PARTS = ("ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias",
                         "attn.out_proj.weight", "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight",
                         "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")


def text_encoder_extra_keys(slot: TextEncoderSlot, num_diffusers_layers: int) -> tuple[str, ...]:
    """Tensors an original file may hold for a text encoder beyond the diffusers model; kept as extras:
    - CLIP ViT-L: the `position_ids` buffer (transformers recreates it);
    - OpenCLIP ViT-H (SD 2.x): the last resblock (diffusers keeps the original's penultimate layer as its last),
      the text projection and the logit scale;
    - OpenCLIP ViT-bigG (SDXL): the logit scale (diffusers keeps every layer and the projection)."""
    p = slot.original_prefix
    if slot.kind is TextEncoderKind.CLIP_L:
        return (p + "embeddings.position_ids",)
    if slot.kind is TextEncoderKind.OPENCLIP_BIGG:
        return (p + "logit_scale",)
    last = f"{p}transformer.resblocks.{num_diffusers_layers}."
    return tuple(last + part for part in _OPENCLIP_LAYER_PARTS) + (p + "text_projection", p + "logit_scale")


# The LDM training wrapper registers its DDPM schedule as buffers; many checkpoints carry them. They are
# derived from the scheduler config and are not model weights.
LDM_SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "model_ema.decay", "model_ema.num_updates",
)


def ema_key(original_unet_key: str) -> str:
    """The LitEma name of an original UNet key: `model_ema.` + the key below `model.` without dots."""
    if not original_unet_key.startswith(UNET_PREFIX):
        raise ValueError(f"not a UNet key: {original_unet_key}")
    return "model_ema." + original_unet_key[len("model."):].replace(".", "")
