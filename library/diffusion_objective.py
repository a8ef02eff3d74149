"""The training objective shared by every trainer: noise, timesteps, noisy input, target and loss.

One implementation for LoRA, DreamBooth, fine-tuning and ControlNet (kohya has four drifting copies). Options
follow kohya's flags and formulas (`--noise_offset`, `--multires_noise_iterations`, `--ip_noise_gamma`,
`--min_snr_gamma`, `--loss_type huber`, ...); the noise schedule and `add_noise` / `get_velocity` are diffusers'
`DDPMScheduler` with SD's training betas.

All randomness comes from a `torch.Generator` the caller passes in, seeded from (seed, global step, process), so a
resumed run draws exactly the noise and timesteps the uninterrupted run drew.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from library.families import PredictionType


class LossType(enum.Enum):
    L2 = "l2"
    L1 = "l1"
    HUBER = "huber"
    SMOOTH_L1 = "smooth_l1"


class HuberSchedule(enum.Enum):
    CONSTANT = "constant"
    EXPONENTIAL = "exponential"
    SNR = "snr"


@dataclass(frozen=True)
class ObjectiveConfig:
    prediction_type: PredictionType = PredictionType.EPSILON
    min_timestep: int = 0
    max_timestep: int = 1000  # exclusive, as kohya's randint(min, max)
    zero_terminal_snr: bool = False
    noise_offset: float | None = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    loss_type: LossType = LossType.L2
    huber_schedule: HuberSchedule = HuberSchedule.SNR
    huber_c: float = 0.1
    huber_scale: float = 1.0
    min_snr_gamma: float | None = None
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None
    debiased_estimation_loss: bool = False

    def validate(self) -> None:
        """Cross-flag checks, with kohya's flag names in the messages."""
        v = self.prediction_type is PredictionType.V_PREDICTION
        if not 0 <= self.min_timestep <= self.max_timestep <= 1000:
            raise ValueError(f"--min_timestep {self.min_timestep} / --max_timestep {self.max_timestep}: need "
                             "0 <= min <= max <= 1000")
        if self.adaptive_noise_scale is not None and self.noise_offset is None:
            raise ValueError("--adaptive_noise_scale requires --noise_offset")
        if self.scale_v_pred_loss_like_noise_pred and not v:
            raise ValueError("--scale_v_pred_loss_like_noise_pred only applies to v-prediction models")
        if self.v_pred_like_loss and v:
            raise ValueError("--v_pred_like_loss adds a v-like term to epsilon training; the model already "
                             "predicts v")
        if self.huber_c <= 0:
            raise ValueError("--huber_c must be > 0")


@dataclass(frozen=True)
class NoisedBatch:
    timesteps: torch.Tensor  # [B] long
    noise: torch.Tensor  # the noise the target is built from
    noisy_latents: torch.Tensor
    target: torch.Tensor


class DiffusionObjective:
    def __init__(self, config: ObjectiveConfig):
        from diffusers import DDPMScheduler

        config.validate()
        self.config = config
        # SD's training schedule (LDM: linear in sqrt(beta) from 0.00085 to 0.012 over 1000 steps).
        self.scheduler = DDPMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
            clip_sample=False, prediction_type=config.prediction_type.value,
            rescale_betas_zero_snr=config.zero_terminal_snr,
        )
        alphas_cumprod = self.scheduler.alphas_cumprod.double()
        # SNR(t) = alpha_bar / (1 - alpha_bar); kohya caps it at 1000 in the v-like/debiased weights.
        self.all_snr = (alphas_cumprod / (1.0 - alphas_cumprod)).float()

    # ------------------------------------------------------------------------------------------------------
    # Noise, timesteps, inputs

    def sample_timesteps(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        lo, hi = self.config.min_timestep, self.config.max_timestep
        if lo == hi:  # kohya: equal bounds mean a fixed timestep
            return torch.full((batch_size,), min(hi, 999), dtype=torch.long)
        return torch.randint(lo, hi, (batch_size,), generator=generator, dtype=torch.long)

    def sample_noise(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        c = self.config
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents)
        if c.noise_offset is not None:
            offset = c.noise_offset
            if c.noise_offset_random_strength:
                offset = torch.rand(1, generator=generator).item() * offset
            offset = torch.as_tensor(offset, dtype=latents.dtype)
            if c.adaptive_noise_scale is not None:
                # Larger offset for latents whose channel means are far from zero (kohya's adaptive offset).
                offset = torch.clamp(offset + c.adaptive_noise_scale * latents.mean(dim=(2, 3), keepdim=True).abs(),
                                     min=0.0)
            shift = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator).to(latents)
            noise = noise + offset * shift
        if c.multires_noise_iterations:
            noise = self._pyramid_noise(noise, generator)
        return noise

    def _pyramid_noise(self, noise: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Multi-resolution ("pyramid") noise: add upsampled low-resolution noise at decaying strength."""
        b, ch, h, w = noise.shape
        for i in range(self.config.multires_noise_iterations):
            # A random factor in [2, 4) per level rather than always 2x, as kohya does.
            r = torch.rand(1, generator=generator).item() * 2 + 2
            hn, wn = max(1, int(h / (r ** i))), max(1, int(w / (r ** i)))
            low = torch.randn((b, ch, hn, wn), generator=generator).to(noise)
            noise = noise + F.interpolate(low, size=(h, w), mode="bilinear") * self.config.multires_noise_discount ** i
            if hn == 1 or wn == 1:
                break
        return noise / noise.std()

    def _draw(self, latent: torch.Tensor, generator: torch.Generator,
              timestep: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Timestep (unless given), noise and UNet-input noise of one sample [1, C, H, W]."""
        c = self.config
        timestep = self.sample_timesteps(1, generator) if timestep is None else timestep
        noise = self.sample_noise(latent, generator)
        input_noise = noise
        if c.ip_noise_gamma:
            # Input perturbation: the UNet sees extra noise that the target does not contain.
            gamma = c.ip_noise_gamma
            if c.ip_noise_gamma_random_strength:
                gamma = torch.rand(1, generator=generator).item() * gamma
            input_noise = noise + gamma * torch.randn(latent.shape, generator=generator).to(latent)
        return timestep, noise, input_noise

    def noised(self, latents: torch.Tensor, generators: torch.Generator | list[torch.Generator],
               timesteps: torch.Tensor | None = None) -> NoisedBatch:
        """Timesteps, noise, the noisy UNet input and the training target for a batch of latents.

        Each sample draws from its own generator (one per sample, or one shared generator used in turn), so a
        sample's noise does not depend on which other samples share its batch or process: a run split over
        several processes draws what the one-process run draws. `timesteps` [B] fixes the timesteps instead of
        drawing them (the validation loss measures at fixed ones)."""
        if isinstance(generators, torch.Generator):
            generators = [generators] * latents.shape[0]
        if len(generators) != latents.shape[0]:
            raise ValueError(f"{len(generators)} generators for a batch of {latents.shape[0]}")
        draws = [self._draw(latents[i:i + 1], g, None if timesteps is None else timesteps[i:i + 1].long())
                 for i, g in enumerate(generators)]
        timesteps = torch.cat([d[0] for d in draws])
        noise = torch.cat([d[1] for d in draws])
        input_noise = torch.cat([d[2] for d in draws])
        c = self.config
        noisy = self.scheduler.add_noise(latents, input_noise, timesteps)
        if c.prediction_type is PredictionType.V_PREDICTION:
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return NoisedBatch(timesteps, noise, noisy, target)

    # ------------------------------------------------------------------------------------------------------
    # Loss

    def huber_c(self, timesteps: torch.Tensor) -> torch.Tensor:
        c = self.config
        if c.huber_schedule is HuberSchedule.CONSTANT:
            return torch.full(timesteps.shape, c.huber_c * c.huber_scale)
        if c.huber_schedule is HuberSchedule.EXPONENTIAL:
            alpha = -math.log(c.huber_c) / self.scheduler.config.num_train_timesteps
            return torch.exp(-alpha * timesteps.float()) * c.huber_scale
        # "snr": c grows towards 1 where the noise is small (sigma = sqrt((1 - a)/a)).
        alphas = self.scheduler.alphas_cumprod[timesteps.cpu()]
        sigmas = ((1.0 - alphas) / alphas) ** 0.5
        return ((1 - c.huber_c) / (1 + sigmas) ** 2 + c.huber_c) * c.huber_scale

    def elementwise_loss(self, prediction: torch.Tensor, target: torch.Tensor,
                         timesteps: torch.Tensor) -> torch.Tensor:
        c = self.config
        prediction, target = prediction.float(), target.float()
        if c.loss_type is LossType.L2:
            return F.mse_loss(prediction, target, reduction="none")
        if c.loss_type is LossType.L1:
            return F.l1_loss(prediction, target, reduction="none")
        huber = self.huber_c(timesteps).to(prediction.device).view(-1, 1, 1, 1)
        squared = (prediction - target) ** 2
        # sqrt(d^2 + c^2) - c, written as d^2 / (sqrt(d^2 + c^2) + c): the same value without the cancellation that
        # costs the direct form ~1e-3 relative in fp32 for |d| << c (the residuals of a well-trained step).
        smooth = squared / (torch.sqrt(squared + huber ** 2) + huber)
        # Pseudo-Huber: ~ quadratic near 0, linear far away; "huber" is scaled by c so both ends match L2/L1.
        return 2 * huber * smooth if c.loss_type is LossType.HUBER else 2 * smooth

    def loss(self, prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, *,
             loss_weights: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The scalar batch loss, in kohya's order: per-element loss -> mask -> spatial mean -> per-sample weights
        (prior loss weight) -> min-SNR -> v-scaling -> v-like term -> debiased estimation -> batch mean."""
        c = self.config
        loss = self.elementwise_loss(prediction, target, timesteps)
        if mask is not None:
            # The mask (B,1,H,W in 0..1, image resolution) is area-downsampled to the latent grid.
            loss = loss * F.interpolate(mask.float(), size=loss.shape[2:], mode="area")
        loss = loss.mean(dim=(1, 2, 3))
        if loss_weights is not None:
            loss = loss * loss_weights.to(loss)
        snr = self.all_snr.to(loss.device)[timesteps]
        v = c.prediction_type is PredictionType.V_PREDICTION
        if c.min_snr_gamma:
            clipped = torch.clamp(snr, max=c.min_snr_gamma)
            # With zero-terminal SNR, SNR(999) is 0: guard the epsilon division (the weight tends to 1 there).
            loss = loss * (clipped / (snr + 1) if v else clipped / snr.clamp(min=1e-8))
        capped = torch.clamp(snr, max=1000.0)
        if c.scale_v_pred_loss_like_noise_pred:
            loss = loss * (capped / (capped + 1))
        if c.v_pred_like_loss:
            loss = loss + loss / (capped / (capped + 1)).clamp(min=1e-8) * c.v_pred_like_loss
        if c.debiased_estimation_loss:
            loss = loss * (1.0 / (capped + 1) if v else 1.0 / capped.clamp(min=1e-8).sqrt())
        return loss.mean()
