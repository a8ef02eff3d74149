"""Model families as data: one record per Stable Diffusion family.

Everything that differs between SD 1.x, SD 2.x 512-base and SD 2.x 768-v lives here (configs, text-encoder
kind, prediction type, VAE scale, default resolution, metadata names), so code elsewhere asks the record
instead of testing `v2` / `v_parameterization` booleans. Every family here has exactly one text encoder, and
most of the suite assumes that too (`ModelConfigs.text_encoder`, `SDModels.text_encoder`, the key maps and LoRA
handle one encoder); SDXL, with two, needs those to become lists first. The training loop already does not: it
gets a `text_conditioning.TextConditioner` (tokenizers and encoders as lists) and passes its `TextConditioning`
(hidden states, pooled output, the U-Net's added conditioning) on.

Each family ships its diffusers component configs in `library/model_configs/<family>/`. Besides the real
("full") size, every family has a "tiny" size with the same block structure and much smaller widths, used by
tests and the quickstart: the key maps, conversion and loading code treat both sizes identically.
"""

from __future__ import annotations

import copy
import enum
import json
from dataclasses import dataclass
from pathlib import Path

CONFIG_ROOT = Path(__file__).parent / "model_configs"


class TextEncoderKind(enum.Enum):
    # HF CLIP ViT-L/14 text tower; original checkpoints store it under `cond_stage_model.transformer.`
    CLIP_L = "clip_l"
    # OpenCLIP ViT-H/14 text tower; original checkpoints store it under `cond_stage_model.model.` with fused
    # q/k/v, one more layer than diffusers keeps (SD 2.x conditions on the penultimate layer), and a projection.
    OPENCLIP_H = "openclip_h"


class PredictionType(enum.Enum):
    EPSILON = "epsilon"
    V_PREDICTION = "v_prediction"

    @property
    def modelspec_name(self) -> str:
        # modelspec.prediction_type spells v-prediction as "v" (kohya, OneTrainer, SAI).
        return "epsilon" if self is PredictionType.EPSILON else "v"

    @classmethod
    def parse(cls, text: str) -> "PredictionType":
        value = text.strip().lower()
        if value in ("epsilon", "eps"):
            return cls.EPSILON
        if value in ("v", "v_prediction", "v-prediction", "v_parameterization"):
            return cls.V_PREDICTION
        raise ValueError(f"unknown prediction type {text!r} (expected 'epsilon' or 'v' / 'v_prediction')")


class ModelSize(enum.Enum):
    FULL = "full"
    TINY = "tiny"


@dataclass(frozen=True)
class ModelConfigs:
    """Diffusers/transformers config dicts of one model (deep copies: callers may not mutate shared data)."""

    unet: dict
    vae: dict
    text_encoder: dict
    scheduler: dict


@dataclass(frozen=True)
class ModelFamily:
    name: str  # our id, also the config folder name
    arch: str  # "sd1" | "sd2": families with one architecture share key maps and detection
    text_encoder_kind: TextEncoderKind
    prediction_type: PredictionType
    default_resolution: int
    vae_scale_factor: float
    bucket_reso_step: int
    modelspec_architecture: str  # modelspec.architecture of a full checkpoint
    ss_base_model_version: str  # kohya's ss_base_model_version
    description: str

    @property
    def is_v2(self) -> bool:
        return self.arch == "sd2"

    def configs(self, size: ModelSize = ModelSize.FULL) -> ModelConfigs:
        folder = CONFIG_ROOT / self.name
        loaded = {part: json.loads((folder / f"{part}.json").read_text()) for part in _PARTS}
        if size is ModelSize.TINY:
            for part, overrides in _TINY_OVERRIDES[self.arch].items():
                loaded[part].update(copy.deepcopy(overrides))
        return ModelConfigs(**loaded)


_PARTS = ("unet", "vae", "text_encoder", "scheduler")

# Tiny sizes keep every block, layer type and key of the real models (4 down/up blocks, 2 res blocks each,
# cross-attention in the same places, the real 49,408-token vocabulary) and shrink only widths and depths.
_TINY_OVERRIDES = {
    "sd1": {
        "unet": {"block_out_channels": [32, 64, 64, 64], "attention_head_dim": 8, "cross_attention_dim": 32,
                 "sample_size": 8},
        "vae": {"block_out_channels": [8, 16, 32, 32], "norm_num_groups": 8, "sample_size": 64},
        "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                         "num_hidden_layers": 2, "projection_dim": 32},
    },
    "sd2": {
        "unet": {"block_out_channels": [32, 64, 64, 64], "attention_head_dim": [2, 4, 4, 4],
                 "cross_attention_dim": 48, "sample_size": 8},
        "vae": {"block_out_channels": [8, 16, 32, 32], "norm_num_groups": 8, "sample_size": 64},
        "text_encoder": {"hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 4,
                         "num_hidden_layers": 2, "projection_dim": 32},
    },
}

SD1 = ModelFamily(
    name="sd1", arch="sd1", text_encoder_kind=TextEncoderKind.CLIP_L, prediction_type=PredictionType.EPSILON,
    default_resolution=512, vae_scale_factor=0.18215, bucket_reso_step=64,
    modelspec_architecture="stable-diffusion-v1", ss_base_model_version="sd_v1",
    description="Stable Diffusion 1.x (CLIP ViT-L text encoder, epsilon prediction, 512 px)",
)
SD2_512 = ModelFamily(
    name="sd2-512", arch="sd2", text_encoder_kind=TextEncoderKind.OPENCLIP_H, prediction_type=PredictionType.EPSILON,
    default_resolution=512, vae_scale_factor=0.18215, bucket_reso_step=64,
    modelspec_architecture="stable-diffusion-v2-512", ss_base_model_version="sd_v2",
    description="Stable Diffusion 2.x base (OpenCLIP ViT-H text encoder, epsilon prediction, 512 px)",
)
SD2_768_V = ModelFamily(
    name="sd2-768-v", arch="sd2", text_encoder_kind=TextEncoderKind.OPENCLIP_H,
    prediction_type=PredictionType.V_PREDICTION,
    default_resolution=768, vae_scale_factor=0.18215, bucket_reso_step=64,
    modelspec_architecture="stable-diffusion-v2-768-v", ss_base_model_version="sd_v2_v",
    description="Stable Diffusion 2.x 768-v (OpenCLIP ViT-H text encoder, v-prediction, 768 px)",
)

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (SD1, SD2_512, SD2_768_V)}


def family_for(arch: str, prediction_type: PredictionType) -> ModelFamily:
    """The family record of an architecture with a prediction type.

    SD 1.x has no v-prediction family of its own: rare v-prediction SD 1.x fine-tunes keep the SD 1.x record and
    carry their own prediction type beside the family (see `SDCheckpoint.prediction_type`)."""
    if arch == "sd1":
        return SD1
    if arch == "sd2":
        return SD2_768_V if prediction_type is PredictionType.V_PREDICTION else SD2_512
    raise ValueError(f"unknown architecture {arch!r}")
