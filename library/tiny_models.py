"""Tiny random-weight models of every family, for tests and the quickstart (no download ever).

They have the real block structure (same blocks, layers and key names as the full models, see
`families._TINY_OVERRIDES`), so the same key maps, conversion and loading code applies. Every tensor gets a
seeded random perturbation on top of the library's initialisation: no tensor is all-zeros or all-ones, so a
swapped or dropped tensor cannot go unnoticed in a round trip.
"""

from __future__ import annotations

import torch

from library import key_maps
from library.families import ModelFamily, ModelSize, TextEncoderKind
from library.model_loading import SDModels, checkpoint_from_models, load_tokenizer
from library.sd_checkpoint import SDCheckpoint


def build_random_models(family: ModelFamily, size: ModelSize, *, seed: int = 0, perturb: bool = True) -> SDModels:
    """Random-weight models of a family at a size (the library's initialisation, seeded). With `perturb`, every
    tensor also gets a small seeded random offset (see the module docstring); benchmarks skip that."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = family.configs(size)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(configs.unet)
    vae = AutoencoderKL.from_config(configs.vae)
    text_encoder = CLIPTextModel(CLIPTextConfig(**configs.text_encoder))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for model in (unet, vae, text_encoder):
            if perturb:
                for param in model.parameters():
                    param.add_(torch.randn(param.shape, generator=generator) * 0.02)
            model.eval()
    return SDModels(family, family.prediction_type, unet, vae, text_encoder, load_tokenizer(family),
                    dict(configs.scheduler))


def build_tiny_models(family: ModelFamily, *, seed: int = 0) -> SDModels:
    return build_random_models(family, ModelSize.TINY, seed=seed)


def original_only_tensors(family: ModelFamily, text_encoder_config: dict, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors a real original file of this family has beyond the diffusers models.

    SD 2.x: OpenCLIP's last layer (diffusers keeps only the penultimate output), text_projection, logit_scale."""
    if family.text_encoder_kind is not TextEncoderKind.OPENCLIP_H:
        return {}
    generator = torch.Generator().manual_seed(seed + 2)
    width, inner = text_encoder_config["hidden_size"], text_encoder_config["intermediate_size"]
    shapes = {
        "ln_1.weight": (width,), "ln_1.bias": (width,), "attn.in_proj_weight": (3 * width, width),
        "attn.in_proj_bias": (3 * width,), "attn.out_proj.weight": (width, width), "attn.out_proj.bias": (width,),
        "ln_2.weight": (width,), "ln_2.bias": (width,), "mlp.c_fc.weight": (inner, width), "mlp.c_fc.bias": (inner,),
        "mlp.c_proj.weight": (width, inner), "mlp.c_proj.bias": (width,),
    }
    keys = key_maps.openclip_extra_keys(text_encoder_config["num_hidden_layers"])
    out = {}
    for key in keys:
        if key.endswith("text_projection"):
            shape = (width, width)
        elif key.endswith("logit_scale"):
            shape = ()
        else:
            shape = shapes[key.split(".", 5)[-1]]
        out[key] = torch.randn(shape, generator=generator) * 0.02
    return out


def tiny_checkpoint(family: ModelFamily, *, seed: int = 0, with_original_extras: bool = True) -> SDCheckpoint:
    """A tiny model as an `SDCheckpoint`, ready for any writer. With `with_original_extras`, SD 2.x carries the
    tensors a real original file has (see `original_only_tensors`)."""
    models = build_tiny_models(family, seed=seed)
    extras = original_only_tensors(family, family.configs(ModelSize.TINY).text_encoder, seed=seed) \
        if with_original_extras else {}
    return checkpoint_from_models(models, extras=extras)
