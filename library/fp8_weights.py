"""Frozen base weights stored in float8 (kohya's `--fp8_base`, `--fp8_base_unet`): each nn.Linear / nn.Conv2d weight
of a frozen model is kept in torch.float8_e4m3fn (1 byte, half of bf16 / fp16) and upcast to the run's compute dtype
for each use, so adapters (LoRA, an embedding) train on a base model that takes half the memory.

What a run computes is exactly what a run would compute on a base model whose Linear / Conv2d weights (as loaded, in
the weight dtype) were rounded to float8_e4m3fn and back: e4m3 holds 3 mantissa bits (a relative rounding step of
1/16 at most), magnitudes up to 448, and rounds below 2**-9 to zero.

How kohya does it: the whole frozen U-Net (and the text encoders but their embeddings) is cast to float8 and
autocast upcasts each weight when an operation uses it, hence kohya's requirement of --mixed_precision. Here the
upcast is explicit, in the layer, so it works in any precision (fp32 too), and it is done by an autograd function
that keeps the float8 tensor, not the upcast copy, for the backward pass, where it upcasts again. A plain
`weight.to(dtype)` in the forward (or autocast's cast) would have autograd keep every layer's upcast copy until the
backward pass: with a LoRA every layer after the first adapted one needs its input gradient, so at the peak of a
step a full-precision copy of nearly the whole model would exist besides the float8 one.

Kept in the compute dtype: biases, norms and embeddings (a small share of the weights; nn.Embedding has no float8
kernels), layers this module does not handle (a convolution with a padding mode other than zeros), and the layer
holding the model's first parameter (the U-Net's conv_in): diffusers and transformers report a model's dtype as its
first parameter's, and pipelines cast their inputs to it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

logger = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448: larger magnitudes would saturate


class _Float8Linear(torch.autograd.Function):
    """y = x W^T + b with W stored in float8; the gradient reaches x only (W and b are frozen)."""

    @staticmethod
    def forward(ctx, x, weight, bias, compute_dtype):
        # Under autocast the linear runs in autocast's dtype (as a Linear with a compute-dtype weight would).
        y = F.linear(x, weight.to(compute_dtype), bias)
        ctx.save_for_backward(weight)  # the float8 tensor: no upcast copy outlives this forward
        ctx.input_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (weight,) = ctx.saved_tensors
        # The same product autograd computes for a Linear's input gradient (mm of the flattened gradient with W, in
        # the dtype the forward multiplied in), so the gradients equal a compute-dtype layer's bit for bit.
        grad_x = grad_y.reshape(-1, grad_y.shape[-1]).mm(weight.to(grad_y.dtype)).reshape(ctx.input_shape)
        return grad_x, None, None, None


class _Float8Conv2d(torch.autograd.Function):
    """A 2-D convolution with its weight stored in float8; the gradient reaches x only."""

    @staticmethod
    def forward(ctx, x, weight, bias, compute_dtype, stride, padding, dilation, groups):
        y = F.conv2d(x, weight.to(compute_dtype), bias, stride, padding, dilation, groups)
        ctx.save_for_backward(weight)
        ctx.input_shape, ctx.params = x.shape, (stride, padding, dilation, groups)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (weight,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.params
        # aten's convolution_backward, as autograd calls it for a convolution, asked for the input gradient only;
        # it reads the input's shape, not its values, so an uninitialised stand-in spares keeping the input.
        stand_in = grad_y.new_empty(ctx.input_shape)
        grad_x, _, _ = torch.ops.aten.convolution_backward(
            grad_y, stand_in, weight.to(grad_y.dtype), None, stride, padding, dilation, False, [0, 0], groups,
            [True, False, False])
        return grad_x, None, None, None, None, None, None, None


class Float8Linear(nn.Linear):
    """A frozen nn.Linear whose weight is stored in float8 and upcast to `compute_dtype` for each call."""

    compute_dtype: torch.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Float8Linear.apply(x, self.weight, self.bias, self.compute_dtype)


class Float8Conv2d(nn.Conv2d):
    """A frozen nn.Conv2d (zero padding) whose weight is stored in float8, upcast to `compute_dtype` for each call."""

    compute_dtype: torch.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Float8Conv2d.apply(x, self.weight, self.bias, self.compute_dtype, self.stride, self.padding,
                                   self.dilation, self.groups)


_FLOAT8_CLASS = {nn.Linear: Float8Linear, nn.Conv2d: Float8Conv2d}


@dataclass(frozen=True)
class Float8Report:
    layers: int  # Linear / Conv2d layers now storing float8 weights
    kept: int  # Linear / Conv2d layers left in the compute dtype (the first parameter's layer, unsupported ones)
    weight_bytes: int  # bytes of the float8 weights


def _convertible(module: nn.Module) -> bool:
    if type(module) is nn.Linear:
        return True
    return (type(module) is nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str))


def store_in_float8(model: nn.Module, compute_dtype: torch.dtype, *, what: str) -> Float8Report:
    """Store the Linear / Conv2d weights of the frozen `model` in float8 (module docstring), in place. Call it before
    any adapter wraps the layers (an adapter keeps the layer's forward as it finds it). `what` names the model in
    errors. Raises ValueError if a weight trains or lies beyond float8's range (it would saturate)."""
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    converted, kept, weight_bytes = 0, 0, 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or isinstance(module, (Float8Linear, Float8Conv2d)):
            continue
        if module.weight is first or not _convertible(module):
            kept += 1
            continue
        if "forward" in module.__dict__:
            raise RuntimeError(f"{what} {name}: an adapter already wraps this layer; store the base in float8 "
                               "before applying the network")
        weight = module.weight
        if weight.requires_grad:
            raise ValueError(f"{what} {name}: its weight trains; only frozen weights can be stored in float8")
        peak = weight.detach().abs().max().item() if weight.numel() else 0.0
        if peak > FP8_MAX:
            raise ValueError(f"{what} {name}: a weight of magnitude {peak:g} is beyond float8_e4m3fn's range "
                             f"({FP8_MAX:g}); this model cannot be stored in float8")
        module.weight = nn.Parameter(weight.detach().to(FP8_DTYPE), requires_grad=False)
        module.__class__ = _FLOAT8_CLASS[type(module)]  # same module, same names: adapters and state keys hold
        module.compute_dtype = compute_dtype
        converted += 1
        weight_bytes += module.weight.numel()
    logger.info("%s: %d layers store their weights in float8 (%.1f MB), %d kept in %s", what, converted,
                weight_bytes / 2 ** 20, kept, str(compute_dtype).removeprefix("torch."))
    return Float8Report(layers=converted, kept=kept, weight_bytes=weight_bytes)

