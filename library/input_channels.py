"""Widen a model's U-Net input: the first convolution gets more input channels, initialised to zero.

This is how RunwayML made SD 1.5 inpainting out of SD 1.5 (and Stability SD 2 depth, and diffusers SDXL
inpainting): the new channels' weights are zero, so until it is trained the widened model computes what the
original did, whatever the new channels hold. A convolution sums weight x input over channels and kernel taps; the
new terms are 0 x input = +-0 exactly (finite inputs), and adding an exact zero changes no partial sum, so the output
is the original's bit for bit as long as the kernel sums the original terms in the same order. CPU kernels do in
fp32 (`tests/test_add_input_channels.py`, on whole U-Nets); cuDNN in fp16 / bf16 or channels-last may pick another
order for the wider input, and the output then differs by rounding, about one unit in the last place
(docs/benchmarks.md, measured on an H200).

`widened(checkpoint, inputs, ...)` returns the same model as another family (`families.family_for`): every other
tensor is the source's own lazy tensor, so a writer copies it byte for byte.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from library import key_maps
from library.families import UNetInputs, family_for, unet_inputs_of
from library.sd_checkpoint import SDCheckpoint
from library.tensor_files import CheckpointError, LazyTensor

CONV_IN = "conv_in.weight"  # the U-Net's first convolution (diffusers name); its bias does not depend on the inputs


def widened(checkpoint: SDCheckpoint, inputs: UNetInputs, *, extra_channels: int | None = None) -> SDCheckpoint:
    """The model with its U-Net taking `inputs` (a released layout such as `families.INPAINTING`, or
    `families.EXTRA_CHANNELS` with `extra_channels` more channels), new weights zero. Raises CheckpointError, naming
    the model and what to do, when the model cannot be widened that way."""
    family = checkpoint.family
    source = family.unet_inputs
    where = checkpoint.source or "the model"
    old = checkpoint.configs.unet["in_channels"]
    what_it_is = f"{family.description.split(' (')[0]} (U-Net {source.describe(old)})"
    if inputs.fixed:
        if source == inputs:
            raise CheckpointError(f"{where}: this is already {what_it_is}; nothing to add. Adding {inputs.name} "
                                  "channels widens a text-to-image model.")
        new = inputs.fixed_channels
    else:
        if extra_channels is None or extra_channels < 1:
            raise ValueError(f"--extra_channels {extra_channels}: give a number of channels, 1 or more")
        new = old + extra_channels
    # The source's channels keep their meaning and place: its layout must be where the new one starts (the noisy
    # latents first, as every pipeline concatenates them), or the same variable-width layout growing.
    keeps_its_channels = (source.parts == inputs.parts[:len(source.parts)] and source.fixed) or (
        source == inputs and not inputs.fixed)
    if not keeps_its_channels:
        added_to = (f"the {inputs.name} channels are added to a text-to-image model" if inputs.fixed else
                    "extra channels are added to a text-to-image model or to one with extra channels")
        raise CheckpointError(f"{where}: this is {what_it_is}; {added_to}, whose channels keep their meaning and "
                              "place. Start from the text-to-image model.")
    try:
        target = family_for(family.arch, checkpoint.prediction_type, inputs)
    except ValueError:
        raise CheckpointError(f"{where}: this is {what_it_is}; there is no {inputs.name} variant of it (those of "
                              "SD 1.x, SD 2.x and SDXL base exist).") from None
    if unet_inputs_of(family.arch, new) != inputs:
        # Every loader (WebUI, ComfyUI, diffusers' single-file code, ours) tells models apart by this width.
        taken = unet_inputs_of(family.arch, new)
        raise CheckpointError(f"--extra_channels {extra_channels}: the U-Net would take {new} input channels, the "
                              f"width of {taken.name} models of this kind; WebUI, ComfyUI and diffusers (and this "
                              f"suite) would read it as one. Choose another number"
                              f"{' (or add the inpainting channels)' if taken.name == 'inpainting' else ''}.")
    unet_tensors = dict(checkpoint.tensors["unet"])
    unet_tensors[CONV_IN] = _with_zero_channels(unet_tensors[CONV_IN], new)
    extras = dict(checkpoint.extras)
    ema = key_maps.ema_key(key_maps.UNET_PREFIX + "input_blocks.0.0.weight")
    if ema in extras:  # the file's EMA copy of the U-Net (`model_ema.*`, WebUI may load it): widened alike
        extras[ema] = _with_zero_channels(extras[ema], new)
    configs = replace(checkpoint.configs, unet=dict(checkpoint.configs.unet, in_channels=new))
    # A new model: not the source's title (the writer names it after its file) nor the hash of the source's tensors.
    metadata = {k: v for k, v in checkpoint.metadata.items() if k not in ("modelspec.title", "modelspec.hash_sha256")}
    return replace(checkpoint, family=target, configs=configs, tensors=dict(checkpoint.tensors, unet=unet_tensors),
                   extras=extras, metadata=metadata, _open=[])


def _with_zero_channels(weight: LazyTensor, in_channels: int) -> LazyTensor:
    out_channels, old, *kernel = weight.shape

    def load() -> torch.Tensor:
        tensor = weight.load()
        zeros = torch.zeros((out_channels, in_channels - old, *kernel), dtype=tensor.dtype)
        return torch.cat([tensor, zeros], dim=1)  # new channels after the old ones: the pipelines' order

    return LazyTensor((out_channels, in_channels, *kernel), weight.dtype, load)
