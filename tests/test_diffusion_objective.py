"""The shared training objective, checked against formulas computed independently (float64, by hand)."""

from __future__ import annotations

import math

import pytest
import torch

from library.diffusion_objective import DiffusionObjective, HuberSchedule, LossType, ObjectiveConfig
from library.families import PredictionType


def ldm_alphas_cumprod() -> torch.Tensor:
    # LDM's "linear" schedule: linear in sqrt(beta), 1000 steps, 0.00085 .. 0.012.
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_noisy_input_and_epsilon_target_follow_the_ddpm_forward_process():
    objective = DiffusionObjective(ObjectiveConfig())
    latents = torch.randn(3, 4, 8, 8, generator=gen(1))
    batch = objective.noised(latents, gen(2))
    ab = ldm_alphas_cumprod()[batch.timesteps].view(-1, 1, 1, 1)
    expected = ab.sqrt() * latents.double() + (1 - ab).sqrt() * batch.noise.double()
    assert torch.allclose(batch.noisy_latents.double(), expected, atol=1e-5)
    assert torch.equal(batch.target, batch.noise)
    # Same generator state -> same draws (what exact resume relies on).
    again = objective.noised(latents, gen(2))
    assert torch.equal(again.timesteps, batch.timesteps) and torch.equal(again.noise, batch.noise)


def test_v_prediction_target():
    objective = DiffusionObjective(ObjectiveConfig(prediction_type=PredictionType.V_PREDICTION))
    latents = torch.randn(2, 4, 8, 8, generator=gen(3))
    batch = objective.noised(latents, gen(4))
    ab = ldm_alphas_cumprod()[batch.timesteps].view(-1, 1, 1, 1)
    v = ab.sqrt() * batch.noise.double() - (1 - ab).sqrt() * latents.double()
    assert torch.allclose(batch.target.double(), v, atol=1e-5)


def test_timestep_range_and_fixed_timestep():
    objective = DiffusionObjective(ObjectiveConfig(min_timestep=100, max_timestep=200))
    t = objective.sample_timesteps(5000, gen())
    assert t.min() >= 100 and t.max() <= 199 and len(t.unique()) == 100
    fixed = DiffusionObjective(ObjectiveConfig(min_timestep=500, max_timestep=500))
    assert torch.equal(fixed.sample_timesteps(4, gen()), torch.full((4,), 500))


def test_noise_offset_adds_a_per_channel_shift_drawn_after_the_noise():
    latents = torch.randn(2, 4, 8, 8, generator=gen(5))
    noise = DiffusionObjective(ObjectiveConfig(noise_offset=0.1)).sample_noise(latents, gen(6))
    g = gen(6)
    base = torch.randn(latents.shape, generator=g)
    shift = torch.randn((2, 4, 1, 1), generator=g)
    # (sample_noise draws for the whole tensor it is given; noised() calls it per sample)
    assert torch.allclose(noise, base + 0.1 * shift)
    adaptive = DiffusionObjective(ObjectiveConfig(noise_offset=0.1, adaptive_noise_scale=0.5)).sample_noise(latents, gen(6))
    scale = 0.1 + 0.5 * latents.mean(dim=(2, 3), keepdim=True).abs()
    assert torch.allclose(adaptive, base + scale * shift)


def test_multires_noise_is_unit_std_and_differs_from_plain_noise():
    latents = torch.zeros(2, 4, 32, 32)
    noise = DiffusionObjective(ObjectiveConfig(multires_noise_iterations=6, multires_noise_discount=0.3)).sample_noise(latents, gen(7))
    assert noise.std().item() == pytest.approx(1.0, abs=1e-5)
    assert not torch.allclose(noise, torch.randn(latents.shape, generator=gen(7)))


def test_each_sample_draws_from_its_own_generator():
    """A sample's noise and timestep depend only on its generator, not on its batch mates."""
    objective = DiffusionObjective(ObjectiveConfig(noise_offset=0.05, ip_noise_gamma=0.1))
    latents = torch.randn(3, 4, 8, 8, generator=gen(12))
    together = objective.noised(latents, [gen(20), gen(21), gen(22)])
    alone = objective.noised(latents[1:2], [gen(21)])
    assert torch.equal(together.timesteps[1:2], alone.timesteps)
    assert torch.equal(together.noisy_latents[1:2], alone.noisy_latents)
    assert torch.equal(together.target[1:2], alone.target)


def test_input_perturbation_changes_the_input_not_the_target():
    latents = torch.randn(2, 4, 8, 8, generator=gen(8))
    plain = DiffusionObjective(ObjectiveConfig()).noised(latents, [gen(9), gen(10)])
    perturbed = DiffusionObjective(ObjectiveConfig(ip_noise_gamma=0.1)).noised(latents, [gen(9), gen(10)])
    assert torch.equal(plain.target, perturbed.target)
    assert not torch.allclose(plain.noisy_latents, perturbed.noisy_latents)


def test_zero_terminal_snr_rescales_the_schedule():
    objective = DiffusionObjective(ObjectiveConfig(zero_terminal_snr=True, prediction_type=PredictionType.V_PREDICTION))
    assert objective.all_snr[-1].item() == pytest.approx(0.0, abs=1e-6)
    assert objective.all_snr[0].item() == pytest.approx((ldm_alphas_cumprod()[0] / (1 - ldm_alphas_cumprod()[0])).item(), rel=1e-4)


def test_loss_weightings_match_their_formulas():
    pred = torch.randn(4, 4, 8, 8, generator=gen(10))
    target = torch.randn(4, 4, 8, 8, generator=gen(11))
    t = torch.tensor([10, 300, 600, 990])
    ab = ldm_alphas_cumprod()[t]
    snr = (ab / (1 - ab)).float()
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))

    def loss(**kw):
        return DiffusionObjective(ObjectiveConfig(**kw)).loss(pred, target, t).item()

    assert loss() == pytest.approx(per_sample.mean().item(), rel=1e-6)
    assert loss(min_snr_gamma=5) == pytest.approx((per_sample * torch.clamp(snr, max=5) / snr).mean().item(), rel=1e-5)
    v = PredictionType.V_PREDICTION
    assert loss(min_snr_gamma=5, prediction_type=v) == pytest.approx(
        (per_sample * torch.clamp(snr, max=5) / (snr + 1)).mean().item(), rel=1e-5)
    capped = torch.clamp(snr, max=1000)
    assert loss(debiased_estimation_loss=True) == pytest.approx((per_sample / capped.sqrt()).mean().item(), rel=1e-5)
    assert loss(scale_v_pred_loss_like_noise_pred=True, prediction_type=v) == pytest.approx(
        (per_sample * capped / (capped + 1)).mean().item(), rel=1e-5)
    assert loss(v_pred_like_loss=0.5) == pytest.approx(
        (per_sample + per_sample / (capped / (capped + 1)) * 0.5).mean().item(), rel=1e-5)
    weights = torch.tensor([1.0, 0.5, 2.0, 1.0])
    objective = DiffusionObjective(ObjectiveConfig())
    assert objective.loss(pred, target, t, loss_weights=weights).item() == pytest.approx(
        (per_sample * weights).mean().item(), rel=1e-6)


def test_masked_loss_uses_the_area_downsampled_mask():
    pred, target = torch.ones(1, 4, 4, 4), torch.zeros(1, 4, 4, 4)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :16, :] = 1.0  # top half of the image
    loss = DiffusionObjective(ObjectiveConfig()).loss(pred, target, torch.tensor([100]), mask=mask)
    assert loss.item() == pytest.approx(0.5)


@pytest.mark.numbers
def test_huber_losses_interpolate_between_l2_and_l1():
    c = 0.1
    objective = DiffusionObjective(ObjectiveConfig(loss_type=LossType.HUBER, huber_schedule=HuberSchedule.CONSTANT,
                                                   huber_c=c))
    t = torch.tensor([0])
    small, large = torch.full((1, 1, 1, 1), 1e-3), torch.full((1, 1, 1, 1), 100.0)
    zero = torch.zeros(1, 1, 1, 1)
    # 2c(sqrt(d^2 + c^2) - c) for d = 1e-3, c = 0.1, in exact arithmetic: 9.99975e-7 (~ d^2). fp32 holds it to
    # ~1e-7 relative; the direct formula lost 1.4e-3 to cancellation (and differed between CPUs).
    exact = 2 * c * (math.sqrt(1e-6 + c * c) - c)
    assert exact == pytest.approx(9.99975e-7, rel=1e-6)
    assert objective.elementwise_loss(small, zero, t).item() == pytest.approx(exact, rel=1e-6)
    assert objective.elementwise_loss(large, zero, t).item() == pytest.approx(2 * c * (100 - c), rel=1e-4)  # ~ 2c|d|
    exp = DiffusionObjective(ObjectiveConfig(loss_type=LossType.HUBER, huber_schedule=HuberSchedule.EXPONENTIAL, huber_c=c))
    assert exp.huber_c(torch.tensor([0, 1000])).tolist() == pytest.approx([1.0, c], rel=1e-5)
    snr = DiffusionObjective(ObjectiveConfig(loss_type=LossType.SMOOTH_L1, huber_c=c))
    sigma = math.sqrt((1 - ldm_alphas_cumprod()[500].item()) / ldm_alphas_cumprod()[500].item())
    assert snr.huber_c(torch.tensor([500])).item() == pytest.approx((1 - c) / (1 + sigma) ** 2 + c, rel=1e-5)


@pytest.mark.parametrize("kwargs,flag", [
    (dict(adaptive_noise_scale=0.1), "--adaptive_noise_scale"),
    (dict(scale_v_pred_loss_like_noise_pred=True), "--scale_v_pred_loss_like_noise_pred"),
    (dict(v_pred_like_loss=0.1, prediction_type=PredictionType.V_PREDICTION), "--v_pred_like_loss"),
    (dict(min_timestep=600, max_timestep=500), "--min_timestep"),
])
def test_conflicting_options_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        DiffusionObjective(ObjectiveConfig(**kwargs))
