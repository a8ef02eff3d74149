"""kohya LoRA modules against full Stable Diffusion checkpoints: which tensor each module changes, whether a LoRA
fits a model, merging LoRAs into a checkpoint and taking the weight differences of two checkpoints.

The module names come from networks.lora's own discovery (`text_encoder_targets`, `unet_targets`), run on the
checkpoint's models built on the meta device (no weights, no memory), so the tools and training agree on names by
construction, for every family (SDXL: `lora_te1_` / `lora_te2_` and the U-Net in Stability's layout). The tensor a
module changes is its layer's `.weight` among the checkpoint's diffusers-named tensors of that component. Work then
goes one tensor at a time through the checkpoint's lazy tensors, so merging into or extracting from a full-size
model never holds a whole model in memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from library.sd_checkpoint import SDCheckpoint
from library.tensor_files import LazyTensor
from networks.lora import family_mismatch_hint, text_encoder_targets, unet_targets
from networks.lora_files import LoRAFactors, LoRAFile, LoRAFileError, other_unet_inputs_note, short_list

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoRALayer:
    component: str  # "unet" | a text encoder's pipeline component ("text_encoder", "text_encoder_2")
    key: str  # the weight's diffusers name in SDCheckpoint.tensors[component]
    shape: tuple[int, ...]  # the weight's shape in the checkpoint


def lora_layers(checkpoint: SDCheckpoint, *, conv: bool = True) -> dict[str, LoRALayer]:
    """LoRA module name -> the checkpoint weight it changes. `conv` includes the ResNet / sampler layers (LoCon)."""
    from diffusers import UNet2DConditionModel

    from library.model_loading import new_text_encoder

    slots = checkpoint.family.text_encoders
    with torch.device("meta"):  # structure only
        unet = UNet2DConditionModel.from_config(checkpoint.configs.unet)
        text_encoders = [new_text_encoder(slot.kind, checkpoint.configs.text_encoders[slot.component])
                         for slot in slots]
    # The network names the encoders in the family's order, which is also the order of the checkpoint's slots.
    parts = [(slot.component, model, targets)
             for slot, model, targets in zip(slots, text_encoders, text_encoder_targets(text_encoders))]
    parts.append(("unet", unet, unet_targets(unet, conv=conv)))
    layers = {}
    for component, model, targets in parts:
        paths = {id(module): path for path, module in model.named_modules()}
        tensors = checkpoint.tensors[component]
        for name, module in targets.items():
            key = paths[id(module)] + ".weight"
            layers[name] = LoRALayer(component, key, tuple(tensors[key].shape))
    return layers


def _drop_unit_kernel(shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[:2] if len(shape) == 4 and shape[2:] == (1, 1) else shape


def shapes_fit(delta_shape: tuple[int, ...], layer_shape: tuple[int, ...]) -> bool:
    """Equal, or a Linear layer vs a 1x1 conv of the same matrix (SD 2.x files store proj_in / proj_out either way,
    and a LoRA trained on one layout applies to the other)."""
    return _drop_unit_kernel(tuple(delta_shape)) == _drop_unit_kernel(tuple(layer_shape))


def match_lora(lora: LoRAFile, layers: dict[str, LoRALayer], model_description: str) -> dict[str, LoRALayer]:
    """The layer of every module of `lora`; raises, with counts, when any module has no layer of its name or
    changes a weight of another shape (a LoRA for another model family)."""
    unmatched = sorted(name for name in lora.modules if name not in layers)
    wrong = sorted(f"{name}: LoRA changes {list(f.weight_shape)}, the layer is {list(layers[name].shape)}"
                   for name, f in lora.modules.items()
                   if name in layers and not shapes_fit(f.weight_shape, layers[name].shape))
    if unmatched or wrong:
        total = len(lora.modules)
        matched = total - len(unmatched) - len(wrong)
        lines = [f"{lora.name} does not fit this model ({model_description}): {matched} of {total} LoRA modules "
                 "match a layer of it."]
        if unmatched:
            lines.append(f"{len(unmatched)} module(s) name no layer of this model:\n    {short_list(unmatched, 8)}")
        if wrong:
            lines.append(f"{len(wrong)} module(s) have the wrong shape:\n    {short_list(wrong, 8)}")
        lines.append(_family_hint(lora, layers))
        raise LoRAFileError("\n  ".join(line for line in lines if line))
    return {name: layers[name] for name in lora.modules}


def _family_hint(lora: LoRAFile, layers: dict[str, LoRALayer]) -> str:
    """Which family the LoRA's names point to (SDXL: lora_te1_ / lora_te2_, U-Net in Stability's layout; SD 1.x /
    2.x: lora_te_, diffusers' layout) when it is not this model's, and what its metadata says."""
    said = [f"{k}={lora.metadata[k]}" for k in ("ss_base_model_version", "modelspec.architecture")
            if lora.metadata.get(k)]
    hint = family_mismatch_hint(lora.modules, layers) or "Is the LoRA for another model family?"
    if said:
        hint += f" Its metadata says {', '.join(said)}."
    return hint + " Nothing was written."


# --------------------------------------------------------------------------------------- merging into a model


def merge_into_checkpoint(checkpoint: SDCheckpoint, loras: list[tuple[LoRAFile, float]],
                          dtype: torch.dtype = torch.float32,
                          module_weights: list[dict[str, float]] | None = None) -> SDCheckpoint:
    """The checkpoint with W + sum ratio * ΔW on every layer the LoRAs touch, all other tensors as they are.
    `module_weights` (--lbws): per LoRA, a weight per module that multiplies its ratio; a module at weight 0 is
    not merged, so its layer's tensor stays exactly as it was.

    Each merged weight is computed when written: W in `dtype` (kohya's --precision), the sum of the deltas added in
    fp32, rounded once to `dtype`. Nothing is computed until the writer asks for the tensor."""
    layers = lora_layers(checkpoint, conv=True)
    per_tensor: dict[tuple[str, str], list[tuple[LoRAFactors, float]]] = {}
    for i, (lora, ratio) in enumerate(loras):
        matched = match_lora(lora, layers, checkpoint.family.description)
        if note := other_unet_inputs_note(lora.name, lora.metadata, checkpoint.family):
            logger.info("%s", note)
        for name, layer in matched.items():
            weight = module_weights[i][name] if module_weights is not None else 1.0
            if weight != 0:
                per_tensor.setdefault((layer.component, layer.key), []).append((lora.modules[name], ratio * weight))
    tensors = {component: dict(t) for component, t in checkpoint.tensors.items()}
    for (component, key), terms in per_tensor.items():
        tensors[component][key] = _merged(tensors[component][key], terms, dtype, key)
    logger.info("merging %d LoRA(s) into %d weights", len(loras), len(per_tensor))
    return replace(checkpoint, tensors=tensors)


def _merged(base: LazyTensor, terms: list[tuple[LoRAFactors, float]], dtype: torch.dtype, key: str) -> LazyTensor:
    def load() -> torch.Tensor:
        weight = base.load().to(dtype)
        delta = sum(ratio * factors.delta() for factors, ratio in terms).reshape(weight.shape)
        merged = (weight.float() + delta).to(dtype)
        if not torch.isfinite(merged).all():
            raise LoRAFileError(f"merging into {key} gave NaN / Inf values (the base weight or a LoRA holds them, or "
                                f"{dtype} overflowed); nothing was written")
        return merged

    return LazyTensor(base.shape, dtype, load)


# ------------------------------------------------------------------------------------ differences of two models


def check_same_structure(original: SDCheckpoint, tuned: SDCheckpoint, names: tuple[str, str]) -> None:
    if original.family.arch != tuned.family.arch:
        raise LoRAFileError(f"{names[0]} is a {original.family.description} but {names[1]} is a "
                            f"{tuned.family.description}: models of different families cannot be combined")
    # A model and its inpainting / depth / extra-channel variant (tools/add_input_channels.py) differ only in the
    # U-Net's first convolution, which no LoRA module changes: the LoRA of their difference is still well defined.
    other_inputs = original.family.unet_inputs != tuned.family.unet_inputs
    if other_inputs:
        logger.info("%s is %s and %s is %s: their U-Nets differ only in the first convolution (conv_in), which no "
                    "LoRA module changes; the LoRA holds the differences of every other layer", names[0],
                    original.family.description.split(" (")[0], names[1], tuned.family.description.split(" (")[0])
    for component in original.family.components:
        if component == "vae":
            continue
        a, b = original.tensors[component], tuned.tensors[component]
        wrong = sorted(k for k in a if k in b and not shapes_fit(a[k].shape, b[k].shape)
                       and not (other_inputs and component == "unet" and k == "conv_in.weight"))
        missing = sorted(set(a) ^ set(b))
        if wrong or missing:
            raise LoRAFileError(f"{names[0]} and {names[1]} have different {component} structures "
                                f"({len(wrong)} tensors differ in shape, {len(missing)} in only one): "
                                f"{short_list(wrong + missing, 6)}")
    if original.prediction_type is not tuned.prediction_type:
        logger.warning("%s predicts %s but %s predicts %s; the extracted LoRA records the tuned model's", names[0],
                       original.prediction_type.value, names[1], tuned.prediction_type.value)


def weight_difference(original: SDCheckpoint, tuned: SDCheckpoint, layer: LoRALayer,
                      dtype: torch.dtype | None = None) -> torch.Tensor:
    """tuned - original of one layer's weight, in fp32 (after loading both in `dtype`, kohya's --load_precision),
    shaped like the original's weight."""
    a = original.tensors[layer.component][layer.key].load()
    b = tuned.tensors[layer.component][layer.key].load()
    if dtype is not None:
        a, b = a.to(dtype), b.to(dtype)
    difference = b.float().reshape(a.shape) - a.float()
    if not torch.isfinite(difference).all():
        raise LoRAFileError(f"{layer.key}: NaN / Inf in the {layer.component} weights of one of the models; cannot "
                            "extract from a broken checkpoint")
    return difference
