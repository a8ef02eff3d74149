"""The precision policy and the --full_fp16 GradScaler workaround (checked with torch's CPU GradScaler)."""

from __future__ import annotations

import pytest
import torch

from library.precision import (allow_fp16_gradient_unscaling, check_device_supports, precision_policy)


def test_policy_table():
    p = precision_policy("bf16")
    assert (p.weight_dtype, p.vae_dtype, p.trained_dtype, p.full_half) == (torch.bfloat16, torch.bfloat16,
                                                                          torch.float32, False)
    assert precision_policy("bf16", full_bf16=True).trained_dtype == torch.bfloat16
    p = precision_policy("fp16", full_fp16=True, no_half_vae=True)
    assert (p.weight_dtype, p.vae_dtype, p.trained_dtype, p.full_half) == (torch.float16, torch.float32,
                                                                          torch.float16, True)
    assert precision_policy("no").trained_dtype == torch.float32


def test_fp16_refused_on_cpu():
    with pytest.raises(ValueError, match="--mixed_precision fp16 needs a CUDA GPU"):
        check_device_supports("fp16", torch.device("cpu"))
    check_device_supports("bf16", torch.device("cpu"))


def _fp16_step(scaler, grad_scale: list[float]):
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    optimizer = torch.optim.SGD([p], lr=0.5)
    loss = (p * torch.tensor(grad_scale, dtype=torch.float16)).sum()
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grad = p.grad.clone()
    scaler.step(optimizer)
    scaler.update()
    return p.detach(), grad


def test_full_fp16_unscales_fp16_gradients():
    plain = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        _fp16_step(plain, [1, 2, 3, 4])
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    allow_fp16_gradient_unscaling(scaler)
    weights, grad = _fp16_step(scaler, [1, 2, 3, 4])
    assert torch.equal(grad, torch.tensor([1, 2, 3, 4], dtype=torch.float16))  # 1024x scaled, then exactly unscaled
    assert torch.equal(weights, torch.tensor([0.5, 0, -0.5, -1], dtype=torch.float16))
    # Only that instance is patched: a new scaler still refuses.
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        _fp16_step(torch.amp.GradScaler("cpu", init_scale=1024.0), [1, 2, 3, 4])


def test_full_fp16_overflow_skips_the_step_and_lowers_the_scale():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    allow_fp16_gradient_unscaling(scaler)
    weights, grad = _fp16_step(scaler, [1, 2, 3, 60000])  # 60000 * 65536 overflows fp16
    assert not torch.isfinite(grad).all()
    assert torch.equal(weights, torch.ones(4, dtype=torch.float16))  # step skipped
    assert scaler.get_scale() == 2.0 ** 15
