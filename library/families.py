"""Model families as data: one record per Stable Diffusion family.

Everything that differs between SD 1.x, SD 2.x 512-base, SD 2.x 768-v, SDXL base and the SDXL refiner lives here
(configs, text encoders, prediction type, VAE scale, default resolution, bucket step, metadata names, the diffusers
pipeline class), so code elsewhere asks the record instead of testing `v2` / `v_parameterization` / `sdxl` flags.
Checkpoint I/O, conversion, gen_img.py, the LoRA network and the LoRA tools handle every family; the sdxl_* trainers
(LoRA, full model, textual inversion, ControlNet) train SDXL base; a script refuses what it does not handle by name
(`sd_checkpoint.require_arch`, `training_setup.TrainedArchs`).

A family owns a *list* of text encoders (`ModelFamily.text_encoders`, one `TextEncoderSlot` each: its diffusers
pipeline component, its tokenizer, where an original file keeps it, its LoRA prefix), because SDXL has two.
Checkpoint I/O, key maps and model loading iterate over `family.components`; the training loop never sees an
encoder at all: it gets a `text_conditioning.TextConditioner` and passes its `TextConditioning` (hidden states,
pooled output, the U-Net's added conditioning) on.

Each family ships its diffusers component configs in `library/model_configs/<family>/`. Besides the real
("full") size, every family has a "tiny" size with the same block structure and much smaller widths, used by
tests and the quickstart: the key maps, conversion and loading code treat both sizes identically.

Some families' U-Nets see more than the noisy latents: their first convolution is wider (`ModelFamily.unet_inputs`
says which channels hold what, in the order diffusers' pipelines concatenate them). They are variants of a
text-to-image family (`_variant`): the same blocks, encoders, key names and configs but for the U-Net's
`in_channels`, with their own modelspec id and diffusers pipeline. Released ones: SD 1.x / 2.x / SDXL inpainting
(9 channels: latents, mask, masked-image latents) and SD 2.x depth (5: latents, depth map); and for models made
with `tools/add_input_channels.py --extra_channels N`, one "extra channels" family per text-to-image family, whose
width is the model's own. A model's family is told by its text encoders (the architecture) and its U-Net's input
width (`sd_checkpoint`). The LoRA, DreamBooth and fine-tune trainers feed every layout (`ALL_UNET_INPUTS`,
library/extra_inputs.py), and so does gen_img.py (library/generation_inputs.py); code that handles only the noisy
latents refuses the others by name (`sd_checkpoint.require_arch`).
"""

from __future__ import annotations

import copy
import enum
import json
from dataclasses import dataclass, replace
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
class InputPart:
    """A group of adjacent U-Net input channels and what they hold."""

    what: str  # "noisy latents", "mask", "masked-image latents", "depth map", "extra channels"
    channels: int | None  # None: as many as the model has (at least one): the width of an "extra channels" model


@dataclass(frozen=True)
class UNetInputs:
    """What a family's U-Net takes, channel group by channel group, in the order diffusers' pipelines concatenate them
    along dim 1 (`torch.cat([latents, mask, masked_image_latents], dim=1)` in the inpainting pipelines,
    `[latents, depth]` in depth2img). Only the last part may have a variable width."""

    name: str
    parts: tuple[InputPart, ...]
    new_model_extra: int = 0  # the variable part's width in models built from scratch (the tiny test models)

    @property
    def fixed(self) -> bool:
        return all(part.channels is not None for part in self.parts)

    @property
    def fixed_channels(self) -> int:
        return sum(part.channels or 0 for part in self.parts)

    @property
    def new_model_channels(self) -> int:
        return self.fixed_channels + (0 if self.fixed else self.new_model_extra)

    def accepts(self, in_channels: int) -> bool:
        return in_channels == self.fixed_channels if self.fixed else in_channels > self.fixed_channels

    def describe(self, in_channels: int) -> str:
        """"9 input channels: 4 noisy latents, 1 mask, 4 masked-image latents"."""
        variable = in_channels - self.fixed_channels
        parts = ", ".join(f"{part.channels if part.channels is not None else variable} {part.what}"
                          for part in self.parts)
        return f"{in_channels} input channels: {parts}"


_NOISY_LATENTS = InputPart("noisy latents", 4)  # the VAE's 4 latent channels, what every SD U-Net denoises
TEXT_TO_IMAGE = UNetInputs("text-to-image", (_NOISY_LATENTS,))
# RunwayML's layout, which every SD inpainting model and diffusers' inpainting pipelines use: the mask is 1 where the
# image is repainted, at latent size; the masked image is the VAE latents of the image with that area blanked.
INPAINTING = UNetInputs("inpainting", (_NOISY_LATENTS, InputPart("mask", 1), InputPart("masked-image latents", 4)))
# SD 2.x depth: MiDaS' depth map of the input image at latent size, scaled to [-1, 1] (diffusers' depth2img).
DEPTH = UNetInputs("depth", (_NOISY_LATENTS, InputPart("depth map", 1)))
# Models made with tools/add_input_channels.py --extra_channels N: the user's own conditions after the latents.
# New ones get 2 here: a width no released layout has, so a tiny test model is told apart by its weights alone.
EXTRA_CHANNELS = UNetInputs("extra channels", (_NOISY_LATENTS, InputPart("extra channels", None)), new_model_extra=2)
ALL_UNET_INPUTS = (TEXT_TO_IMAGE, INPAINTING, DEPTH, EXTRA_CHANNELS)  # what the trainers feed (extra_inputs.py)


@dataclass(frozen=True)
class OriginalPart:
    """A part of a family's original (WebUI) single file that no diffusers model holds, carried through unchanged
    (inside a diffusers folder it lives in `original_extras.safetensors`, see sd_checkpoint.EXTRAS_FILE)."""

    prefix: str  # its keys' prefix
    what: str  # what it is, and who needs it: said when a single file is written without it


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
    controlnet_img2img_pipeline_class: str | None = "StableDiffusionControlNetImg2ImgPipeline"
    controlnet_file_keys: str = "original"
    # What the U-Net's first convolution takes (its `in_channels` is their sum, or the model's own width for the
    # "extra channels" families). Together with `arch` it tells the families apart (`family_for`).
    unet_inputs: UNetInputs = TEXT_TO_IMAGE
    # The folder below model_configs/ with the diffusers configs: a variant shares its text-to-image family's, with
    # the U-Net's in_channels set from `unet_inputs` ("": the family's own name).
    config_folder: str = ""
    original_parts: tuple[OriginalPart, ...] = ()

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
        """The configs of a new model of this family (a file's own choices, such as an "extra channels" model's
        width, are read from the file: `sd_checkpoint`)."""
        folder = CONFIG_ROOT / (self.config_folder or self.name)
        loaded = {part: json.loads((folder / f"{part}.json").read_text()) for part in self.components + ("scheduler",)}
        if size is ModelSize.TINY:
            for part, overrides in _TINY_OVERRIDES[self.arch].items():
                loaded[part].update(copy.deepcopy(overrides))
        loaded["unet"]["in_channels"] = self.unet_inputs.new_model_channels
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
    controlnet_pipeline_class="StableDiffusionXLControlNetPipeline",
    controlnet_img2img_pipeline_class="StableDiffusionXLControlNetImg2ImgPipeline", controlnet_file_keys="diffusers",
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
    controlnet_img2img_pipeline_class=None,
)


def _variant(base: ModelFamily, inputs: UNetInputs, **record) -> ModelFamily:
    """`base` with other U-Net inputs: same architecture, encoders, configs (but the U-Net's in_channels) and key
    names; its own name, modelspec id, description and pipeline (`record`). No ControlNet support (yet)."""
    return replace(base, unet_inputs=inputs, config_folder=base.config_folder or base.name,
                   controlnet_pipeline_class=None, controlnet_img2img_pipeline_class=None, **record)


# The released inpainting models. modelspec ids: SAI's spec lists none for them; these are the ids SwarmUI (the
# spec author's UI) knows: "stable-diffusion-v1/inpaint" (which its docs ask users to set on RunwayML's model) and
# "stable-diffusion-v2-inpainting"; for SDXL, which has none, the same "<base id>/inpaint" form, the one SwarmUI
# treats as an inpainting model.
_SD_INPAINT = {"pipeline_class": "StableDiffusionInpaintPipeline",
               "img2img_pipeline_class": "StableDiffusionInpaintPipeline"}
SD1_INPAINTING = _variant(
    SD1, INPAINTING, name="sd1-inpainting", modelspec_architecture="stable-diffusion-v1/inpaint", **_SD_INPAINT,
    description="Stable Diffusion 1.x inpainting (RunwayML's layout: noisy latents, mask and masked-image latents "
                "into the U-Net; CLIP ViT-L text encoder, epsilon prediction, 512 px)")
SD2_512_INPAINTING = _variant(
    SD2_512, INPAINTING, name="sd2-512-inpainting", modelspec_architecture="stable-diffusion-v2-inpainting",
    **_SD_INPAINT,
    description="Stable Diffusion 2.x inpainting (noisy latents, mask and masked-image latents into the U-Net; "
                "OpenCLIP ViT-H text encoder, epsilon prediction, 512 px)")
# Not released by Stability, but what --add_inpainting_channels makes of a 768-v model (its own configs:
# upcast_attention, 768 px).
SD2_768_V_INPAINTING = _variant(
    SD2_768_V, INPAINTING, name="sd2-768-v-inpainting", modelspec_architecture="stable-diffusion-v2-768-v/inpaint",
    **_SD_INPAINT,
    description="Stable Diffusion 2.x 768-v inpainting (noisy latents, mask and masked-image latents into the "
                "U-Net; OpenCLIP ViT-H text encoder, v-prediction, 768 px)")
SDXL_INPAINTING = _variant(
    SDXL, INPAINTING, name="sdxl-inpainting", modelspec_architecture="stable-diffusion-xl-v1-base/inpaint",
    pipeline_class="StableDiffusionXLInpaintPipeline", img2img_pipeline_class="StableDiffusionXLInpaintPipeline",
    pipeline_flags=(("force_zeros_for_empty_prompt", True), ("requires_aesthetics_score", False)),
    description="Stable Diffusion XL inpainting (noisy latents, mask and masked-image latents into the U-Net; "
                "CLIP ViT-L + OpenCLIP ViT-bigG text encoders, 1024 px)")
# Stability's 512-depth-ema: SD 2.x base with a depth channel. Its single file also holds the MiDaS (DPT-Hybrid)
# depth estimator under `depth_model.`: no diffusers model has those tensors (diffusers' depth2img pipeline brings
# its own `DPTForDepthEstimation`, in another layout, and from_single_file ignores them), but WebUI runs them and
# tells depth models by them, so they are carried through like SD 2.x's unused text-encoder layer. The pipeline's
# depth estimator and its image processor are left empty: pass them, or a `depth_map`, to the pipeline.
SD2_512_DEPTH = _variant(
    SD2_512, DEPTH, name="sd2-512-depth", modelspec_architecture="stable-diffusion-v2-depth",
    pipeline_class="StableDiffusionDepth2ImgPipeline", img2img_pipeline_class="StableDiffusionDepth2ImgPipeline",
    pipeline_absent=("depth_estimator", "feature_extractor"), pipeline_flags=(),
    original_parts=(OriginalPart("depth_model.", "the MiDaS depth estimator (DPT-Hybrid) of Stability's depth file: "
                                                 "WebUI runs it to make the depth map and recognises depth models by "
                                                 "it; diffusers brings its own (DPTForDepthEstimation)"),),
    description="Stable Diffusion 2.x depth (noisy latents and a depth map into the U-Net; OpenCLIP ViT-H text "
                "encoder, epsilon prediction, 512 px)")
# Models made here with --extra_channels N: a text-to-image model whose U-Net also takes N channels of the user's
# conditions. Their diffusers folders are the text-to-image family's pipeline (diffusers has no pipeline that feeds
# such channels; its components load as usual).
def _extra_channels_variant(base: ModelFamily) -> ModelFamily:
    kind, details = base.description.split(" (", 1)
    return _variant(base, EXTRA_CHANNELS, name=f"{base.name}-extra",
                    modelspec_architecture=f"{base.modelspec_architecture}/extra-channels",
                    description=f"{kind} with extra U-Net input channels (noisy latents, then the model's own "
                                f"conditions; {details}")


SD1_EXTRA, SD2_512_EXTRA, SD2_768_V_EXTRA, SDXL_EXTRA = map(_extra_channels_variant, (SD1, SD2_512, SD2_768_V, SDXL))

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (
    SD1, SD2_512, SD2_768_V, SDXL, SDXL_REFINER,
    SD1_INPAINTING, SD2_512_INPAINTING, SD2_768_V_INPAINTING, SDXL_INPAINTING, SD2_512_DEPTH,
    SD1_EXTRA, SD2_512_EXTRA, SD2_768_V_EXTRA, SDXL_EXTRA)}


def family_for(arch: str, prediction_type: PredictionType, inputs: UNetInputs = TEXT_TO_IMAGE) -> ModelFamily:
    """The family record of an architecture with a prediction type and U-Net inputs.

    Where a family exists for each prediction type (SD 2.x) the prediction picks it. SD 1.x and SDXL have no
    v-prediction family of their own: rare v-prediction fine-tunes of them keep the epsilon record and carry their
    own prediction type beside the family (see `SDCheckpoint.prediction_type`); so do models of a layout that
    exists for one prediction type only (SD 2.x depth)."""
    fitting = [f for f in FAMILIES.values() if f.arch == arch and f.unet_inputs == inputs]
    if not fitting:
        known = sorted({f.unet_inputs.name for f in FAMILIES.values() if f.arch == arch})
        raise ValueError(f"no {inputs.name} family for architecture {arch!r}"
                         + (f" (it has: {', '.join(known)})" if known else " (unknown architecture)"))
    same_prediction = [f for f in fitting if f.prediction_type is prediction_type]
    return same_prediction[0] if same_prediction else fitting[0]


def unet_inputs_of(arch: str, in_channels: int) -> UNetInputs | None:
    """The U-Net inputs a model of `arch` with this input width has: a released layout of that width, else the
    "extra channels" one (a width no released layout has); None if no family of the architecture takes it."""
    layouts = [f.unet_inputs for f in FAMILIES.values() if f.arch == arch]
    fixed = [inputs for inputs in layouts if inputs.fixed and inputs.accepts(in_channels)]
    if fixed:
        return fixed[0]
    variable = [inputs for inputs in layouts if not inputs.fixed and inputs.accepts(in_channels)]
    return variable[0] if variable else None
