"""The optimizer step fused into the backward pass (`--fused_backward_pass`).

Each trained parameter is stepped, and its gradient freed, in a `register_post_accumulate_grad_hook` as soon as
backward has finished its gradient, so the gradients of the whole model never exist at once: for full U-Net training
that saves up to a full fp32 copy of the model (3.4 GB for SD 1.5, 10 GB for SDXL).

How others do it, and what is taken from each:
- kohya-ss/sd-scripts patches transformers' Adafactor with a `step_param(p, group)` copy of its step and calls it
  from a hook; only Adafactor works, gradient accumulation is refused, and `--max_grad_norm` clips each parameter's
  gradient by its own norm. Kept: the per-parameter clipping (documented below) and the refusal of accumulation.
- PyTorch's tutorial ("How to save memory by fusing the optimizer step into the backward pass") builds one
  optimizer per parameter and steps it in the hook. Kept: that is what makes any per-parameter optimizer work
  unchanged (AdamW, AdamW8bit, Adafactor, Lion, SGD...), with the same arithmetic as the unfused step.
- Added here: one optimizer object the rest of the suite treats as the optimizer. `FusedBackwardOptimizer` is a
  `torch.optim.Optimizer` whose `param_groups` are exactly those the unfused optimizer would have, so the LR
  schedulers of `optimizers.build_scheduler` drive it unchanged; each hook copies its group's current
  hyperparameters (lr...) into the parameter's own optimizer before stepping. `step()` and `zero_grad()` are no-ops
  the loop keeps calling, and `state_dict()` has the unfused optimizer's format (same indices, same per-parameter
  state), so a state saved by either can resume the other.

Learning rates: the loop runs backward (hooks step with the current lr), then `optimizer.step()` (no-op), then
`lr_scheduler.step()`: every step uses the same lr as the unfused optimizer would.

Gradient clipping (`--max_grad_norm`) is **per parameter**, as kohya's: each parameter's gradient is scaled down to
norm `max_grad_norm` by its own norm, not by the norm of all gradients together (which would need all gradients
at once). Set the loop's own `max_grad_norm` to 0 (there are no gradients left for it to clip).

Not supported (refused by `check_fused_backward_pass` / the constructor, with the flag names):
- optimizers whose step needs all parameters together (Prodigy, DAdaptation: one step size estimated from all
  gradients; schedule-free: step counters and weight sums kept per group and advanced once per step; LBFGS);
- `--gradient_accumulation_steps` > 1 (each backward would step);
- several processes (the step would happen before the gradients are averaged across processes);
- `--mixed_precision fp16` (the GradScaler must see all scaled gradients before any step).
Also: a parameter must get its final gradient once per backward. Tied weights used in two reentrant
gradient-checkpointing segments would be stepped twice (the SD U-Net and text encoders have none; non-reentrant
checkpointing, diffusers' default, is fine).
"""

from __future__ import annotations

import logging

import torch

from library.optimizers import OptimizerConfig, build_optimizer, optimizer_class

logger = logging.getLogger(__name__)

__all__ = ["FusedBackwardOptimizer", "check_fused_backward_pass"]

# Top-level package of the optimizer class -> why its step cannot be split per parameter.
_GLOBAL_STATE_PACKAGES = {
    "prodigyopt": "Prodigy estimates one step size from all parameters' gradients together",
    "dadaptation": "D-Adaptation estimates one step size from all parameters' gradients together",
    "schedulefree": "schedule-free optimizers advance their step counter and weight sums once per step for a whole "
                    "parameter group",
}
_GLOBAL_STATE_CLASSES = {torch.optim.LBFGS: "LBFGS re-evaluates the whole model in each step"}
# Packages whose optimizers are known to update each parameter from its own gradient and state only.
_PER_PARAMETER_PACKAGES = ("torch", "transformers", "bitsandbytes", "lion_pytorch")


def _refusal(optimizer_type: str) -> str | None:
    """Why this optimizer cannot be fused, or None. By name first (so the refusal does not depend on the optimizer's
    package being installed), then by class (for `module.Class` paths)."""
    name = optimizer_type.lower()
    if name.startswith("prodigy"):
        reason = _GLOBAL_STATE_PACKAGES["prodigyopt"]
    elif name.startswith("dadapt"):
        reason = _GLOBAL_STATE_PACKAGES["dadaptation"]
    elif name.endswith("schedulefree"):
        reason = _GLOBAL_STATE_PACKAGES["schedulefree"]
    else:
        cls, _ = optimizer_class(optimizer_type)  # an unknown name or a missing package raises its own ValueError
        reason = _GLOBAL_STATE_CLASSES.get(cls) or _GLOBAL_STATE_PACKAGES.get(cls.__module__.split(".")[0])
    if reason is None:
        return None
    return (f"--fused_backward_pass does not work with --optimizer_type {optimizer_type}: {reason}, and the fused "
            "step updates each parameter alone as soon as its gradient is ready. Use a per-parameter optimizer "
            "(AdamW, AdamW8bit, Adafactor, Lion, SGDNesterov) or train without --fused_backward_pass.")


def check_fused_backward_pass(optimizer_type: str, *, gradient_accumulation_steps: int = 1, num_processes: int = 1,
                              mixed_precision: str = "no") -> None:
    """Raise ValueError (naming the flags) if `--fused_backward_pass` cannot work with these settings. Cheap: call
    it where the command line is validated."""
    message = _refusal(optimizer_type)
    if message:
        raise ValueError(message)
    if gradient_accumulation_steps > 1:
        raise ValueError(f"--fused_backward_pass does not work with --gradient_accumulation_steps "
                         f"{gradient_accumulation_steps}: each backward pass steps the optimizer. Use 1 (raise "
                         "--train_batch_size instead) or train without --fused_backward_pass.")
    if num_processes > 1:
        raise ValueError(f"--fused_backward_pass does not work with {num_processes} processes: each parameter would "
                         "be stepped before its gradient is averaged across processes. Train on one process or "
                         "without --fused_backward_pass.")
    if mixed_precision == "fp16":
        raise ValueError("--fused_backward_pass does not work with --mixed_precision fp16: loss scaling must see all "
                         "gradients before any step. Use --mixed_precision bf16 or no.")


def _as_groups(param_groups) -> list[dict]:
    groups = list(param_groups)
    if not groups:
        raise ValueError("--fused_backward_pass: no parameters to train")
    if isinstance(groups[0], torch.Tensor):
        return [{"params": groups}]
    return [{**group, "params": list(group["params"])} for group in groups]


class FusedBackwardOptimizer(torch.optim.Optimizer):
    """The optimizer `build_optimizer(config, param_groups)` would build, stepped inside backward, one parameter at
    a time (module docstring). Hooks are registered on construction; `remove_hooks()` takes them off (the
    parameters then simply accumulate gradients again, and `step()` still does nothing).

    `max_grad_norm`: None = `config.max_grad_norm`; 0 disables the (per-parameter) clipping.
    """

    def __init__(self, config: OptimizerConfig, param_groups, *, max_grad_norm: float | None = None):
        groups = _as_groups(param_groups)
        message = _refusal(config.optimizer_type)
        if message:
            raise ValueError(message)
        cls, _ = optimizer_class(config.optimizer_type)
        if cls.__module__.split(".")[0] not in _PER_PARAMETER_PACKAGES:
            logger.warning("--fused_backward_pass with --optimizer_type %s (%s.%s): assuming its update of each "
                           "parameter depends only on that parameter's gradient and state", config.optimizer_type,
                           cls.__module__, cls.__qualname__)
        # The optimizer the unfused run would build gives the complete param groups (every default filled in), so
        # the schedulers see the same groups; it is never stepped and holds no state.
        template = build_optimizer(config, groups)
        super().__init__([dict(group) for group in template.param_groups], dict(template.defaults))
        del template
        self.max_grad_norm = config.max_grad_norm if max_grad_norm is None else max_grad_norm
        # One optimizer per parameter, built exactly as the unfused one (same class, same keyword arguments, the
        # group's own values), so each parameter gets the same arithmetic and state as in the unfused step.
        # (parameter, index of its group, its own optimizer)
        self._inner: list[tuple[torch.nn.Parameter, int, torch.optim.Optimizer]] = []
        for g, (user_group, group) in enumerate(zip(groups, self.param_groups)):  # torch keeps the groups' order
            extra = {k: v for k, v in user_group.items() if k != "params"}
            for param in group["params"]:
                self._inner.append((param, g, build_optimizer(config, [{**extra, "params": [param]}])))
        self._handles = []
        for param, g, inner in self._inner:
            if param.requires_grad:
                self._handles.append(param.register_post_accumulate_grad_hook(self._hook(g, inner)))

    def _hook(self, group_index: int, inner: torch.optim.Optimizer):
        def step_parameter(param: torch.Tensor) -> None:
            if self.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(param, self.max_grad_norm)  # this parameter's own norm (kohya)
            # Both groups are looked up at each step: load_state_dict (torch's, accelerate's) may replace the dicts.
            inner_group = inner.param_groups[0]
            for key, value in self.param_groups[group_index].items():  # the scheduler's lr (and any other value)
                if key != "params":
                    inner_group[key] = value
            inner.step()
            param.grad = None

        return step_parameter

    @property
    def hooks_attached(self) -> bool:
        return bool(self._handles)

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # The loop's calls: the work was done during backward.

    def step(self, closure=None):
        """No-op (each parameter was stepped during backward). A closure is evaluated (its backward steps)."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do after a fused backward (gradients are freed as they are used); clears any gradient left
        by a backward that ran without the hooks."""
        for param, _, _ in self._inner:
            if param.grad is not None:
                if set_to_none:
                    param.grad = None
                else:
                    param.grad.detach_().zero_()

    # Exact resume, in the unfused optimizer's format.

    def state_dict(self) -> dict:
        state = {}
        for index, (_, _, inner) in enumerate(self._inner):
            inner_state = inner.state_dict()["state"]
            if 0 in inner_state:
                state[index] = inner_state[0]
        groups, start = [], 0
        for group in self.param_groups:
            count = len(group["params"])
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": list(range(start, start + count))})
            start += count
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("optimizer state: its parameter groups (sizes "
                             f"{[len(g['params']) for g in saved_groups]}) do not match this run's "
                             f"({[len(g['params']) for g in self.param_groups]})")
        for group, saved in zip(self.param_groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
        index = 0
        for group, saved in zip(self.param_groups, saved_groups):
            values = {k: v for k, v in group.items() if k != "params"}
            for position in saved["params"]:
                _, _, inner = self._inner[index]
                one = {0: saved_state[position]} if position in saved_state else {}
                inner.load_state_dict({"state": one, "param_groups": [{**values, "params": [0]}]})
                index += 1
