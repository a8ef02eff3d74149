"""Exponential moving average (EMA) of trained weights, for full fine-tuning (`--use_ema`, `--ema_decay`).

kohya-ss/sd-scripts has no EMA; the flags and the decay rule are those of diffusers' training examples
(`diffusers.training_utils.EMAModel`), which is what users know. After every optimizer step (not every micro-batch):

    ema = ema - (1 - d) * (ema - weights)        (the arithmetic of EMAModel, in the EMA's dtype)

with `d = ema_decay(n, ...)` for the n-th update (n = 1, 2, ...):

    k = n - update_after_step - 1
    k <= 0:                 d = 0                              (the EMA copies the weights, whatever min_decay)
    use_ema_warmup:         d = max(min(1 - (1 + k / inv_gamma) ** -power, decay), min_decay)
    otherwise:              d = max(min((1 + k) / (10 + k), decay), min_decay)     (diffusers' default ramp)

So `decay` (default 0.9999) is a ceiling that the ramp reaches only late: with the defaults d is 0.9 at update 81,
0.99 at update 892, 0.999 at ~9,000 and 0.9999 at ~90,000. That is diffusers' behaviour, kept on purpose.

Why not use `EMAModel` itself (it was checked, diffusers 0.42.1)? Its decay rule and update arithmetic are kept
exactly (tests compare against it bit for bit), but:

- **CPU-resident EMA**: `EMAModel.step` computes `shadow - param`, so both must be on one device; diffusers' own
  `--offload_ema` moves the *whole* EMA to the GPU before each step and back after it, so the GPU still has to hold
  it at every step. Here the EMA can stay on the CPU and each parameter is brought over one tensor at a time.
- **fp32 EMA of bf16 weights**: `EMAModel` clones the parameters, so the EMA of bf16 weights is bf16, where an
  update of 1e-4 of the difference is far below bf16's resolution (2^-8) and the average freezes. Here the EMA is
  fp32 unless asked otherwise.
- **Resume**: `EMAModel.load_state_dict` *replaces* the EMA tensors with the loaded ones (wherever `torch.load` put
  them: a GPU EMA resumed from a CPU-loaded file moves to the CPU and the next step fails on the device mismatch),
  checks neither their number nor shapes, and silently takes the decay settings of the file. Here the loaded values
  are copied into the existing tensors after checking count, shapes and settings.
- **Swap for saving/sampling**: `store()` / `copy_to()` / `restore()` are three calls that an exception between them
  leaves half done; here a context manager restores the training weights bit for bit, always.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch

__all__ = ["EMA", "ema_decay"]


def ema_decay(step: int, *, decay: float, min_decay: float = 0.0, update_after_step: int = 0,
              use_ema_warmup: bool = False, inv_gamma: float = 1.0, power: float = 2 / 3) -> float:
    """The decay used by the `step`-th EMA update (1-based), as diffusers' EMAModel.get_decay (module docstring)."""
    k = max(0, step - update_after_step - 1)
    if k <= 0:
        return 0.0
    if use_ema_warmup:
        value = 1 - (1 + k / inv_gamma) ** -power
    else:
        value = (1 + k) / (10 + k)
    return max(min(value, decay), min_decay)


class EMA:
    """An exponential moving average of `parameters` (see the module docstring for the rule).

    device: where the EMA lives; None = beside each parameter, "cpu" = in host memory (saves GPU memory; each update
        then copies every parameter to the CPU, which costs time on big models).
    dtype: the EMA's dtype (fp32 by default, whatever the parameters' dtype).
    Parameters that do not require grad are copied rather than averaged (as EMAModel does).
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter], *, decay: float = 0.9999, min_decay: float = 0.0,
                 update_after_step: int = 0, use_ema_warmup: bool = False, inv_gamma: float = 1.0,
                 power: float = 2 / 3, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = torch.float32):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"--ema_decay {decay}: must be between 0 and 1 (typically 0.999 to 0.9999)")
        if not 0.0 <= min_decay <= decay:
            raise ValueError(f"EMA min_decay {min_decay}: must be between 0 and the decay ({decay})")
        if update_after_step < 0:
            raise ValueError(f"EMA update_after_step {update_after_step}: must be >= 0")
        if use_ema_warmup and not (inv_gamma > 0 and power > 0):
            raise ValueError(f"EMA warmup: inv_gamma ({inv_gamma}) and power ({power}) must be > 0")
        self.parameters = list(parameters)
        if not self.parameters:
            raise ValueError("EMA: no parameters to average")
        self.settings = {"decay": float(decay), "min_decay": float(min_decay),
                         "update_after_step": int(update_after_step), "use_ema_warmup": bool(use_ema_warmup),
                         "inv_gamma": float(inv_gamma), "power": float(power)}
        with torch.no_grad():
            self.shadow = [p.detach().to(device=device if device is not None else p.device,
                                         dtype=dtype if dtype is not None and p.is_floating_point() else p.dtype,
                                         copy=True)
                           for p in self.parameters]
        self.num_updates = 0
        self.last_decay: float | None = None  # the decay of the latest update (for logging)
        self._applied = False

    def decay_at(self, step: int) -> float:
        return ema_decay(step, **self.settings)

    @torch.no_grad()
    def update(self) -> float:
        """Fold the parameters' current values into the average; call once after each optimizer step. Returns the
        decay used."""
        if self._applied:
            raise RuntimeError("EMA.update() inside EMA.applied(): the parameters hold the EMA values, not the "
                               "training values")
        self.num_updates += 1
        decay = self.decay_at(self.num_updates)
        one_minus_decay = 1 - decay
        for shadow, param in zip(self.shadow, self.parameters):
            value = param.detach().to(shadow.device)  # blocking: the CPU reads it at once
            if param.requires_grad:
                # EMAModel's exact arithmetic (a bf16 value is promoted to the fp32 EMA exactly).
                shadow.sub_(one_minus_decay * (shadow - value))
            else:
                shadow.copy_(value)
        self.last_decay = decay
        return decay

    # ------------------------------------------------------------------------------------------------------
    # Using the averaged weights

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[torch.nn.Parameter] | None = None) -> None:
        """Write the EMA values into `parameters` (default: the tracked ones), cast to their dtype and device."""
        targets = self.parameters if parameters is None else list(parameters)
        if len(targets) != len(self.shadow):
            raise ValueError(f"EMA.copy_to: {len(targets)} parameters given, the EMA has {len(self.shadow)}")
        for shadow, param in zip(self.shadow, targets):
            if shadow.shape != param.shape:
                raise ValueError(f"EMA.copy_to: shape {tuple(param.shape)} given for an EMA tensor of shape "
                                 f"{tuple(shadow.shape)}")
            param.copy_(shadow)

    @contextmanager
    def applied(self, *, backup_device: torch.device | str | None = "cpu") -> Iterator[None]:
        """Within the block the tracked parameters hold the EMA values (for saving or sampling); afterwards they
        hold their training values again, bit for bit (also when the block raises). The training values wait on
        `backup_device` (host memory by default; None = beside each parameter)."""
        if self._applied:
            raise RuntimeError("EMA.applied() is already active")
        with torch.no_grad():
            backup = [p.detach().to(backup_device if backup_device is not None else p.device, copy=True)
                      for p in self.parameters]
        self._applied = True
        try:
            self.copy_to()
            yield
        finally:
            with torch.no_grad():
                for saved, param in zip(backup, self.parameters):
                    param.copy_(saved)
            self._applied = False

    # ------------------------------------------------------------------------------------------------------
    # Exact resume

    def state_dict(self) -> dict:
        """The state to save beside the optimizer's (references to the EMA tensors, as torch's state_dicts)."""
        return {"num_updates": self.num_updates, "settings": dict(self.settings), "shadow": list(self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved state: the values are copied into this EMA's tensors (which keep their device and
        dtype). A state of another model or with other decay settings is refused."""
        try:
            num_updates, settings, shadow = state["num_updates"], state["settings"], state["shadow"]
        except (KeyError, TypeError):
            raise ValueError("EMA state: not a state written by EMA.state_dict() (expected num_updates, settings, "
                             "shadow)") from None
        if not isinstance(num_updates, int) or num_updates < 0:
            raise ValueError(f"EMA state: invalid num_updates {num_updates!r}")
        if not isinstance(settings, dict) or not isinstance(shadow, (list, tuple)):
            raise ValueError("EMA state: not a state written by EMA.state_dict() (settings must be a dict, shadow a "
                             "list of tensors)")
        differences = {k: (settings.get(k), v) for k, v in self.settings.items() if settings.get(k) != v}
        if differences:
            shown = "; ".join(f"{k}: state has {old!r}, this run {new!r}" for k, (old, new) in differences.items())
            raise ValueError(f"EMA state: saved with other settings ({shown}); resume with the original --ema_decay "
                             "settings, or start a new run")
        if len(shadow) != len(self.shadow):
            raise ValueError(f"EMA state: {len(shadow)} tensors, but this run averages {len(self.shadow)} "
                             "parameters (a state of another model or another set of trained parameters)")
        for i, (saved, mine) in enumerate(zip(shadow, self.shadow)):
            if not isinstance(saved, torch.Tensor) or saved.shape != mine.shape:
                shape = tuple(saved.shape) if isinstance(saved, torch.Tensor) else type(saved).__name__
                raise ValueError(f"EMA state: tensor {i} has shape {shape}, this run's parameter has "
                                 f"{tuple(mine.shape)}")
        for saved, mine in zip(shadow, self.shadow):
            mine.copy_(saved)
        self.num_updates = num_updates
        self.last_decay = self.decay_at(num_updates) if num_updates else None

