"""Precision policy, in one place: which dtype frozen weights, the VAE and trained weights use, and the one
GradScaler workaround that `--full_fp16` needs.

- `--mixed_precision fp16|bf16`: frozen weights (U-Net, text encoder, VAE) are stored in that dtype; trained
  weights stay fp32 and autocast runs the matmuls in half precision.
- `--full_fp16` / `--full_bf16`: the trained weights are half precision too (less memory, less exact).
- `--no_half_vae`: the VAE stays fp32 (SD VAEs overflow in fp16 on some images).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    weight_dtype: torch.dtype  # frozen weights and autocast compute
    vae_dtype: torch.dtype
    trained_dtype: torch.dtype  # the trained parameters (fp32 unless --full_fp16 / --full_bf16)

    @property
    def full_half(self) -> bool:
        return self.trained_dtype != torch.float32


def precision_policy(mixed_precision: str, *, full_fp16: bool = False, full_bf16: bool = False,
                     no_half_vae: bool = False) -> Precision:
    weight_dtype = _DTYPES[mixed_precision]
    trained = weight_dtype if (full_fp16 or full_bf16) else torch.float32
    return Precision(weight_dtype=weight_dtype, vae_dtype=torch.float32 if no_half_vae else weight_dtype,
                     trained_dtype=trained)


def check_device_supports(mixed_precision: str, device: torch.device) -> None:
    """accelerate silently turns fp16 off on CPU (no autocast, no GradScaler): fp32 trained weights would then meet
    fp16 frozen weights. Refuse instead of training something other than what was asked."""
    if mixed_precision == "fp16" and device.type == "cpu":
        raise ValueError("--mixed_precision fp16 needs a CUDA GPU; on CPU use --mixed_precision bf16 or no")


def allow_fp16_gradient_unscaling(scaler: torch.amp.GradScaler) -> None:
    """Let this GradScaler unscale fp16 gradients (`--full_fp16`).

    torch's GradScaler refuses fp16 gradients ("Attempting to unscale FP16 gradients") because, with fp16 master
    weights, small updates can vanish; `--full_fp16` accepts that trade for memory, as kohya's does. The unscaling
    itself (multiply by 1/scale, detect inf/NaN, skip the step and lower the scale) is torch's, unchanged. Only
    this scaler instance is patched, never the class, so other trainers in the process are unaffected.
    """
    unscale = scaler._unscale_grads_

    def unscale_allowing_fp16(optimizer, inv_scale, found_inf, allow_fp16):
        return unscale(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = unscale_allowing_fp16
