"""Model families as data: one record per Stable Diffusion family.

Everything that differs between SD 1.x, SD 2.x 512-base, SD 2.x 768-v, SDXL base and the SDXL refiner lives here
(configs, text encoders, prediction type, VAE scale, default resolution, bucket step, metadata names, the diffusers
pipeline class), so code elsewhere asks the record instead of testing `v2` / `v_parameterization` / `sdxl` flags.
Checkpoint I/O, conversion, gen_img.py, the LoRA network and the LoRA tools handle every family; the sdxl_* trainers
(LoRA, full model, textual inversion) train SDXL base, while ControlNet training and the ControlNet converter handle
SD 1.x / 2.x so far and refuse SDXL by name (`sd_checkpoint.require_arch`, `training_setup.TrainedArchs`).

A family owns a *list* of text encoders (`ModelFamily.text_encoders`, one `TextEncoderSlot` each: its diffusers
pipeline component, its tokenizer, where an original file keeps it, its LoRA prefix), because SDXL has two.
Checkpoint I/O, key maps and model loading iterate over `family.components`; the training loop never sees an
encoder at all: it gets a `text_conditioning.TextConditioner` and passes its `TextConditioning` (hidden states,
pooled output, the U-Net's added conditioning) on.

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
    # HF CLIP ViT-L/14 text tower; original checkpoints store it in the transformers layout.
    CLIP_L = "clip_l"
    # OpenCLIP ViT-H/14 text tower (SD 2.x); original checkpoints store it in the OpenCLIP layout (fused q/k/v)
    # with one more layer than diffusers keeps (SD 2.x conditions on the penultimate layer) and a projection.
    OPENCLIP_H = "openclip_h"
    # OpenCLIP ViT-bigG/14 text tower (SDXL); OpenCLIP layout, but diffusers keeps every layer and the
    # projection (`CLIPTextModelWithProjection`): SDXL also conditions on the projected pooled output.
    OPENCLIP_BIGG = "openclip_bigg"

    @property
    def openclip_layout(self) -> bool:
        return self is not TextEncoderKind.CLIP_L

    @property
    def with_projection(self) -> bool:
        return self is TextEncoderKind.OPENCLIP_BIGG

    @property
    def transformers_class(self) -> str:
        return "CLIPTextModelWithProjection" if self.with_projection else "CLIPTextModel"


@dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder of a family and everything that names it in the formats users have."""

    component: str  # diffusers pipeline component: "text_encoder" | "text_encoder_2"
    tokenizer: str  # its tokenizer's pipeline component: "tokenizer" | "tokenizer_2"
    kind: TextEncoderKind
    original_prefix: str  # where an original (WebUI / ComfyUI) single file keeps its tensors
    lora_prefix: str  # kohya's LoRA module-name prefix: "lora_te" (one encoder), "lora_te1" / "lora_te2" (SDXL)
    # The key of this encoder's vectors in a textual-inversion file that holds one tensor per encoder: WebUI and
    # ComfyUI read SDXL embeddings as {"clip_l": ..., "clip_g": ...} (ComfyUI also "clip_l" / "clip_h" for SD 1.x
    # / 2.x, whose usual files hold one `emb_params` tensor).
    embedding_key: str = ""


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


class TextConditioningKind(enum.Enum):
    """What a family's U-Net is conditioned on (`text_conditioning.conditioner_for` builds the matching conditioner)."""

    HIDDEN_STATES = "hidden_states"  # SD 1.x / 2.x: the one encoder's last (or clip-skipped) hidden states
    # SDXL: both encoders' penultimate states side by side, bigG's pooled output, 6 time ids (size, crop, target)
    SDXL = "sdxl"
    # SDXL refiner: bigG's penultimate states and pooled output, 5 time ids (size, crop, aesthetic score)
    SDXL_REFINER = "sdxl_refiner"


class ModelSize(enum.Enum):
    FULL = "full"
    TINY = "tiny"


@dataclass(frozen=True)
class ModelConfigs:
    """Diffusers/transformers config dicts of one model (deep copies: callers may not mutate shared data)."""

    unet: dict
    vae: dict
    text_encoders: dict[str, dict]  # pipeline component ("text_encoder", "text_encoder_2") -> CLIPTextConfig dict
    scheduler: dict

    def of(self, component: str) -> dict:
        """The config of a model component ("unet", "vae" or a text encoder's component name)."""
        if component in ("unet", "vae"):
            return getattr(self, component)
        try:
            return self.text_encoders[component]
        except KeyError:
            raise ValueError(f"no model component {component!r} (have unet, vae, "
                             f"{', '.join(self.text_encoders)})") from None


@dataclass(frozen=True)
class ModelFamily:
    name: str  # our id, also the config folder name
    arch: str  # "sd1" | "sd2" | "sdxl" | "sdxl-refiner": families of one architecture share detection
    text_encoders: tuple[TextEncoderSlot, ...]
    prediction_type: PredictionType
    default_resolution: int
    vae_scale_factor: float
    bucket_reso_step: int
    modelspec_architecture: str  # modelspec.architecture of a full checkpoint
    ss_base_model_version: str  # kohya's ss_base_model_version
    description: str
    # The diffusers pipeline a folder of this family is (model_index.json): its class, its optional components
    # that we leave empty, and its flags.
    pipeline_class: str = "StableDiffusionPipeline"
    img2img_pipeline_class: str = "StableDiffusionImg2ImgPipeline"
    pipeline_absent: tuple[str, ...] = ("feature_extractor", "image_encoder", "safety_checker")
    pipeline_flags: tuple[tuple[str, bool], ...] = (("requires_safety_checker", False),)
    text_conditioning: TextConditioningKind = TextConditioningKind.HIDDEN_STATES
    # ControlNets for this family: the diffusers pipeline that runs one (None: no ControlNet support), and the key
    # names of the single-file ControlNets its users share and load in WebUI / ComfyUI: "original" (lllyasviel's
    # `control_model.*`, every SD 1.x / 2.x release) or "diffusers" (ControlNetModel's own names, in which every
    # public SDXL ControlNet ships; both UIs detect them by `controlnet_cond_embedding.conv_in.weight`).
    controlnet_pipeline_class: str | None = "StableDiffusionControlNetPipeline"
    controlnet_file_keys: str = "original"

    @property
    def is_v2(self) -> bool:
        return self.arch == "sd2"

    @property
    def components(self) -> tuple[str, ...]:
        """The model components with weights, in the order they are built and written."""
        return ("unet", "vae", *(slot.component for slot in self.text_encoders))

    def text_encoder_slot(self, component: str) -> TextEncoderSlot:
        for slot in self.text_encoders:
            if slot.component == component:
                return slot
        raise ValueError(f"{self.description} has no text encoder {component!r}")

    def configs(self, size: ModelSize = ModelSize.FULL) -> ModelConfigs:
        folder = CONFIG_ROOT / self.name
        loaded = {part: json.loads((folder / f"{part}.json").read_text()) for part in self.components + ("scheduler",)}
        if size is ModelSize.TINY:
            for part, overrides in _TINY_OVERRIDES[self.arch].items():
                loaded[part].update(copy.deepcopy(overrides))
        return ModelConfigs(unet=loaded["unet"], vae=loaded["vae"], scheduler=loaded["scheduler"],
                            text_encoders={slot.component: loaded[slot.component] for slot in self.text_encoders})

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
    # SDXL: 3 U-Net levels with 1 / 2 / 10 transformer layers per attention block (tiny: 1 / 2 / 2), context width
    # = the two encoders' widths side by side, the size/crop MLP's input = pooled width + 6 time ids x 256 (tiny: 8).
    "sdxl": {
        "unet": {"block_out_channels": [32, 64, 64], "attention_head_dim": [2, 4, 4],
                 "transformer_layers_per_block": [1, 2, 2], "cross_attention_dim": 32 + 48,
                 "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 48 + 6 * 8, "sample_size": 8},
        "vae": {"block_out_channels": [8, 16, 32, 32], "norm_num_groups": 8, "sample_size": 64},
        "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                         "num_hidden_layers": 2, "projection_dim": 32},
        "text_encoder_2": {"hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 4,
                           "num_hidden_layers": 2, "projection_dim": 48},
    },
    # The refiner: 4 levels, 4 transformer layers per attention block (tiny: 2), bigG only, 5 time ids (size, crop,
    # aesthetic score).
    "sdxl-refiner": {
        "unet": {"block_out_channels": [32, 64, 64, 64], "attention_head_dim": [2, 4, 4, 4],
                 "transformer_layers_per_block": 2, "cross_attention_dim": 48, "addition_time_embed_dim": 8,
                 "projection_class_embeddings_input_dim": 48 + 5 * 8, "sample_size": 8},
        "vae": {"block_out_channels": [8, 16, 32, 32], "norm_num_groups": 8, "sample_size": 64},
        "text_encoder_2": {"hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 4,
                           "num_hidden_layers": 2, "projection_dim": 48},
    },
}

# SD 1.x / 2.x keep their one text encoder under `cond_stage_model.`: the HF layout below `transformer.` (SD 1.x),
# the OpenCLIP layout below `model.` (SD 2.x).
_SD1_TEXT_ENCODER = TextEncoderSlot("text_encoder", "tokenizer", TextEncoderKind.CLIP_L,
                                    "cond_stage_model.transformer.text_model.", "lora_te", "clip_l")
_SD2_TEXT_ENCODER = TextEncoderSlot("text_encoder", "tokenizer", TextEncoderKind.OPENCLIP_H,
                                    "cond_stage_model.model.", "lora_te", "clip_h")

SD1 = ModelFamily(
    name="sd1", arch="sd1", text_encoders=(_SD1_TEXT_ENCODER,), prediction_type=PredictionType.EPSILON,
    default_resolution=512, vae_scale_factor=0.18215, bucket_reso_step=64,
    modelspec_architecture="stable-diffusion-v1", ss_base_model_version="sd_v1",
    description="Stable Diffusion 1.x (CLIP ViT-L text encoder, epsilon prediction, 512 px)",
)
SD2_512 = ModelFamily(
    name="sd2-512", arch="sd2", text_encoders=(_SD2_TEXT_ENCODER,), prediction_type=PredictionType.EPSILON,
    default_resolution=512, vae_scale_factor=0.18215, bucket_reso_step=64,
    modelspec_architecture="stable-diffusion-v2-512", ss_base_model_version="sd_v2",
    description="Stable Diffusion 2.x base (OpenCLIP ViT-H text encoder, epsilon prediction, 512 px)",
)
SD2_768_V = ModelFamily(
    name="sd2-768-v", arch="sd2", text_encoders=(_SD2_TEXT_ENCODER,),
    prediction_type=PredictionType.V_PREDICTION,
    default_resolution=768, vae_scale_factor=0.18215, bucket_reso_step=64,
    modelspec_architecture="stable-diffusion-v2-768-v", ss_base_model_version="sd_v2_v",
    description="Stable Diffusion 2.x 768-v (OpenCLIP ViT-H text encoder, v-prediction, 768 px)",
)


# SDXL single files (Stability's generative-models layout) keep their encoders under `conditioner.embedders.N.`:
# CLIP ViT-L in the HF layout, OpenCLIP bigG in the OpenCLIP layout. The refiner has bigG only, as embedder 0.
_SDXL_TEXT_ENCODER_1 = TextEncoderSlot("text_encoder", "tokenizer", TextEncoderKind.CLIP_L,
                                       "conditioner.embedders.0.transformer.text_model.", "lora_te1", "clip_l")
_SDXL_TEXT_ENCODER_2 = TextEncoderSlot("text_encoder_2", "tokenizer_2", TextEncoderKind.OPENCLIP_BIGG,
                                       "conditioner.embedders.1.model.", "lora_te2", "clip_g")
# kohya names the encoder of a one-encoder model `lora_te` (it has no refiner LoRA); we follow that rule.
_SDXL_REFINER_TEXT_ENCODER = TextEncoderSlot("text_encoder_2", "tokenizer_2", TextEncoderKind.OPENCLIP_BIGG,
                                             "conditioner.embedders.0.model.", "lora_te", "clip_g")

SDXL = ModelFamily(
    name="sdxl", arch="sdxl", text_encoders=(_SDXL_TEXT_ENCODER_1, _SDXL_TEXT_ENCODER_2),
    prediction_type=PredictionType.EPSILON, default_resolution=1024, vae_scale_factor=0.13025, bucket_reso_step=32,
    modelspec_architecture="stable-diffusion-xl-v1-base", ss_base_model_version="sdxl_base_v1-0",
    description="Stable Diffusion XL base (CLIP ViT-L + OpenCLIP ViT-bigG text encoders, 1024 px)",
    pipeline_class="StableDiffusionXLPipeline", img2img_pipeline_class="StableDiffusionXLImg2ImgPipeline",
    pipeline_absent=("feature_extractor", "image_encoder"),
    pipeline_flags=(("force_zeros_for_empty_prompt", True),), text_conditioning=TextConditioningKind.SDXL,
    controlnet_pipeline_class="StableDiffusionXLControlNetPipeline", controlnet_file_keys="diffusers",
)
SDXL_REFINER = ModelFamily(
    name="sdxl-refiner", arch="sdxl-refiner", text_encoders=(_SDXL_REFINER_TEXT_ENCODER,),
    prediction_type=PredictionType.EPSILON, default_resolution=1024, vae_scale_factor=0.13025, bucket_reso_step=32,
    modelspec_architecture="stable-diffusion-xl-v1-refiner", ss_base_model_version="sdxl_refiner_v1-0",
    description="Stable Diffusion XL refiner (OpenCLIP ViT-bigG text encoder, aesthetic-score conditioning)",
    pipeline_class="StableDiffusionXLImg2ImgPipeline", img2img_pipeline_class="StableDiffusionXLImg2ImgPipeline",
    pipeline_absent=("feature_extractor", "image_encoder", "text_encoder", "tokenizer"),
    pipeline_flags=(("force_zeros_for_empty_prompt", False), ("requires_aesthetics_score", True)),
    text_conditioning=TextConditioningKind.SDXL_REFINER, controlnet_pipeline_class=None,
)

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (SD1, SD2_512, SD2_768_V, SDXL, SDXL_REFINER)}


def family_for(arch: str, prediction_type: PredictionType) -> ModelFamily:
    """The family record of an architecture with a prediction type.

    SD 1.x and SDXL have no v-prediction family of their own: rare v-prediction fine-tunes of them keep the base
    record and carry their own prediction type beside the family (see `SDCheckpoint.prediction_type`)."""
    if arch == "sd1":
        return SD1
    if arch == "sd2":
        return SD2_768_V if prediction_type is PredictionType.V_PREDICTION else SD2_512
    if arch == "sdxl":
        return SDXL
    if arch == "sdxl-refiner":
        return SDXL_REFINER
    raise ValueError(f"unknown architecture {arch!r}")
