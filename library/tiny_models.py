"""Tiny random-weight models of every family, for tests and the quickstart (no download ever).

They have the real block structure (same blocks, layers and key names as the full models, see
`families._TINY_OVERRIDES`), so the same key maps, conversion and loading code applies. Every tensor gets a
seeded random perturbation on top of the library's initialisation: no tensor is all-zeros or all-ones, so a
swapped or dropped tensor cannot go unnoticed in a round trip.
"""

from __future__ import annotations

import copy
import functools

import torch

from library import key_maps
from library.families import ModelFamily, ModelSize, TextEncoderKind
from library.model_loading import SDModels, checkpoint_from_models, load_tokenizers, new_text_encoder
from library.sd_checkpoint import SDCheckpoint


def build_random_models(family: ModelFamily, size: ModelSize, *, seed: int = 0, perturb: bool = True) -> SDModels:
    """Random-weight models of a family at a size (the library's initialisation, seeded). With `perturb`, every
    tensor also gets a small seeded random offset (see the module docstring); benchmarks skip that."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    configs = family.configs(size)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(configs.unet)
    vae = AutoencoderKL.from_config(configs.vae)
    text_encoders = [new_text_encoder(slot.kind, configs.text_encoders[slot.component]) for slot in family.text_encoders]
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for model in (unet, vae, *text_encoders):
            if perturb:
                for param in model.parameters():
                    param.add_(torch.randn(param.shape, generator=generator) * 0.02)
            model.eval()
        if size is ModelSize.TINY:
            _calibrate_like_a_trained_model(unet, vae)
    return SDModels(family, family.prediction_type, unet, vae, text_encoders, load_tokenizers(family),
                    dict(configs.scheduler))


# A random tiny model differs from a trained one in two ways that hide whole features from the golden losses
# (tests/golden/README.md), so the tiny models are rescaled where it matters (measured on the synthetic images):
# - Its VAE encodes to latents of std ~0.3 (x scale factor: ~0.05, where a trained VAE gives ~1) with a posterior
#   std of ~1 (a trained VAE's is far smaller): the noisy latents were nearly all noise and the images barely reached the
#   loss. Means are scaled up to unit std after the scale factor, log-variances shifted down to a std of ~0.02;
#   the decoder's first convolution is scaled back, so decoded images are as before.
# - Its cross-attention attends nearly uniformly over 77 token states with small values, so the prompt barely
#   reaches the U-Net output (two unrelated prompts: 7 % apart). Sharper keys and larger values: 35 %.
# - SDXL's added conditioning (pooled text embedding and size/crop ids) barely reaches its time embedding: another
#   original size and crop moved the U-Net output by 4 %; a larger first projection: 17 % (a trained SDXL draws
#   visibly different images for another original size).
TINY_LATENT_GAIN = 18.0
TINY_LOGVAR_SHIFT = -8.0
TINY_CROSS_ATTENTION_KEY_GAIN = 4.0
TINY_CROSS_ATTENTION_VALUE_GAIN = 8.0
TINY_ADDED_CONDITION_GAIN = 4.0


def _calibrate_like_a_trained_model(unet: torch.nn.Module, vae: torch.nn.Module) -> None:
    latent_channels = vae.config.latent_channels
    mean_rows, logvar_rows = slice(0, latent_channels), slice(latent_channels, 2 * latent_channels)
    vae.quant_conv.weight[mean_rows].mul_(TINY_LATENT_GAIN)
    vae.quant_conv.bias[mean_rows].mul_(TINY_LATENT_GAIN)
    vae.quant_conv.bias[logvar_rows].add_(TINY_LOGVAR_SHIFT)
    vae.post_quant_conv.weight.div_(TINY_LATENT_GAIN)
    for name, module in unet.named_modules():
        if name.endswith(".attn2"):
            module.to_k.weight.mul_(TINY_CROSS_ATTENTION_KEY_GAIN)
            module.to_v.weight.mul_(TINY_CROSS_ATTENTION_VALUE_GAIN)
    if getattr(unet, "add_embedding", None) is not None:  # SDXL: text_embeds + time_ids
        unet.add_embedding.linear_1.weight.mul_(TINY_ADDED_CONDITION_GAIN)


def build_tiny_models(family: ModelFamily, *, seed: int = 0) -> SDModels:
    return build_random_models(family, ModelSize.TINY, seed=seed)


@functools.lru_cache(maxsize=None)
def _tiny_models_once(family_name: str, seed: int) -> SDModels:
    from library.families import FAMILIES

    return build_tiny_models(FAMILIES[family_name], seed=seed)


def fresh_tiny_models(family_name: str, seed: int = 0) -> SDModels:
    """A fresh copy of the family's tiny models, free to change: built once per process, then copied (a copy is
    much cheaper than a build)."""
    return copy.deepcopy(_tiny_models_once(family_name, seed))


def _tiny_midas_shapes(width: int = 8, features: int = 8) -> dict[str, tuple[int, ...]]:
    """A tiny stand-in for SD 2.x depth's MiDaS part (`families.SD2_512_DEPTH.original_parts`), which is carried
    through byte for byte and never interpreted. The DPT-Hybrid head and neck have the key names of Stability's file
    (ldm/modules/midas: `DPTDepthModel` as `depth_model.model`; WebUI and SwarmUI recognise the model by
    `...pretrained.act_postprocess3.0.project.0.bias`); of its timm ViT-hybrid backbone (`pretrained.model.*`,
    hundreds of tensors) a few stand for the rest."""
    p = "depth_model.model."
    shapes = {p + "pretrained.model.cls_token": (1, 1, width), p + "pretrained.model.pos_embed": (1, 5, width),
              p + "pretrained.model.patch_embed.backbone.stem.conv.weight": (4, 3, 3, 3),
              p + "pretrained.model.patch_embed.proj.weight": (width, 4, 1, 1),
              p + "pretrained.model.patch_embed.proj.bias": (width,),
              p + "pretrained.model.blocks.0.norm1.weight": (width,),
              p + "pretrained.model.blocks.0.attn.qkv.weight": (3 * width, width),
              p + "pretrained.model.norm.weight": (width,)}
    for hook in (3, 4):  # the readout projections and reassembly convolutions of the two ViT hooks
        post = f"{p}pretrained.act_postprocess{hook}."
        shapes |= {post + "0.project.0.weight": (width, 2 * width), post + "0.project.0.bias": (width,),
                   post + "3.weight": (features, width, 1, 1), post + "3.bias": (features,)}
    shapes |= {f"{p}pretrained.act_postprocess4.4.weight": (features, features, 3, 3),
               f"{p}pretrained.act_postprocess4.4.bias": (features,)}
    for i in range(1, 5):
        shapes[f"{p}scratch.layer{i}_rn.weight"] = (features, features, 3, 3)
        fusion = f"{p}scratch.refinenet{i}."
        shapes |= {fusion + "out_conv.weight": (features, features, 1, 1), fusion + "out_conv.bias": (features,)}
        for unit in ("resConfUnit1", "resConfUnit2"):
            for conv in ("conv1", "conv2"):
                shapes |= {f"{fusion}{unit}.{conv}.weight": (features, features, 3, 3),
                           f"{fusion}{unit}.{conv}.bias": (features,)}
    for index, (out_c, in_c, k) in {0: (features // 2, features, 3), 2: (4, features // 2, 3), 4: (1, 4, 1)}.items():
        shapes |= {f"{p}scratch.output_conv.{index}.weight": (out_c, in_c, k, k),
                   f"{p}scratch.output_conv.{index}.bias": (out_c,)}
    return shapes


# The tiny stand-ins of the families' `original_parts`, by key prefix.
_TINY_ORIGINAL_PARTS = {"depth_model.": _tiny_midas_shapes}


def original_only_tensors(family: ModelFamily, configs, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors a real original file of this family has beyond the diffusers models (`key_maps.
    text_encoder_extra_keys`): SD 2.x's OpenCLIP last layer, text projection and logit scale; SDXL's OpenCLIP
    logit scale; the family's `original_parts` (SD 2.x depth's MiDaS, as a tiny stand-in). (CLIP ViT-L's
    `position_ids` buffer is left out, as many real files do.)"""
    generator = torch.Generator().manual_seed(seed + 2)
    out = {}
    for part in family.original_parts:
        for key, shape in _TINY_ORIGINAL_PARTS[part.prefix]().items():
            out[key] = torch.randn(shape, generator=generator) * 0.02
    for slot in family.text_encoders:
        if slot.kind is TextEncoderKind.CLIP_L:
            continue
        config = configs.text_encoders[slot.component]
        width, inner = config["hidden_size"], config["intermediate_size"]
        shapes = {
            "ln_1.weight": (width,), "ln_1.bias": (width,), "attn.in_proj_weight": (3 * width, width),
            "attn.in_proj_bias": (3 * width,), "attn.out_proj.weight": (width, width), "attn.out_proj.bias": (width,),
            "ln_2.weight": (width,), "ln_2.bias": (width,), "mlp.c_fc.weight": (inner, width),
            "mlp.c_fc.bias": (inner,), "mlp.c_proj.weight": (width, inner), "mlp.c_proj.bias": (width,),
        }
        for key in key_maps.text_encoder_extra_keys(slot, config["num_hidden_layers"]):
            if key.endswith("text_projection"):
                shape = (width, width)
            elif key.endswith("logit_scale"):
                shape = ()
            else:
                shape = shapes[key[len(slot.original_prefix):].split(".", 3)[-1]]
            out[key] = torch.randn(shape, generator=generator) * 0.02
    return out


def tiny_checkpoint(family: ModelFamily, *, seed: int = 0, with_original_extras: bool = True) -> SDCheckpoint:
    """A tiny model as an `SDCheckpoint`, ready for any writer. With `with_original_extras`, it carries the
    tensors a real original file has (see `original_only_tensors`)."""
    models = build_tiny_models(family, seed=seed)
    extras = original_only_tensors(family, family.configs(ModelSize.TINY), seed=seed) if with_original_extras else {}
    return checkpoint_from_models(models, extras=extras)
