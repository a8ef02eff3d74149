"""The optimizer step fused into the backward pass (`--fused_backward_pass`, `--fused_optimizer_groups N`).

Each trained parameter is stepped, and its gradient freed, in a `register_post_accumulate_grad_hook` as soon as
backward has finished its gradient, so the gradients of the whole model never exist at once: for full U-Net training
that saves up to a full fp32 copy of the model (3.4 GB for SD 1.5, 10 GB for SDXL). With kohya's
`--fused_optimizer_groups N` the parameters are stepped in N shares instead (consecutive parameters, a share never
spanning two param groups), each as soon as all its gradients are ready: at most about a share's gradients exist at
once, with N optimizer steps per backward instead of one per parameter.

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

Gradient clipping (`--max_grad_norm`) is **per parameter** (per share with --fused_optimizer_groups), as kohya's:
each parameter's (share's) gradient is scaled down to norm `max_grad_norm` by its own norm, not by the norm of all
gradients together (which would need all gradients at once). Set the loop's own `max_grad_norm` to 0 (there are no gradients left for it to clip).

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
import math
from dataclasses import dataclass

import torch

from library.optimizers import OptimizerConfig, build_optimizer, optimizer_class

logger = logging.getLogger(__name__)

__all__ = ["FUSED_BACKWARD_PASS", "FUSED_OPTIMIZER_GROUPS", "FusedBackwardOptimizer", "check_fused_backward_pass"]

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


def _refusal(optimizer_type: str, flag: str) -> str | None:
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
    return (f"{flag} does not work with --optimizer_type {optimizer_type}: {reason}, and the fused step updates "
            "each parameter (or share of them) alone as soon as its gradients are ready. Use a per-parameter "
            f"optimizer (AdamW, AdamW8bit, Adafactor, Lion, SGDNesterov) or train without {flag}.")


FUSED_BACKWARD_PASS, FUSED_OPTIMIZER_GROUPS = "--fused_backward_pass", "--fused_optimizer_groups"


def check_fused_backward_pass(optimizer_type: str, *, gradient_accumulation_steps: int = 1, num_processes: int = 1,
                              mixed_precision: str = "no", flag: str = FUSED_BACKWARD_PASS) -> None:
    """Raise ValueError (naming the flags) if a fused step (`flag`: --fused_backward_pass or
    --fused_optimizer_groups) cannot work with these settings. Cheap: call it where the command line is
    validated."""
    message = _refusal(optimizer_type, flag)
    if message:
        raise ValueError(message)
    if gradient_accumulation_steps > 1:
        raise ValueError(f"{flag} does not work with --gradient_accumulation_steps "
                         f"{gradient_accumulation_steps}: each backward pass steps the optimizer. Use 1 (raise "
                         f"--train_batch_size instead) or train without {flag}.")
    if num_processes > 1:
        # DDP averages gradients bucket by bucket during backward and writes the averages back only at its end,
        # after the per-parameter hooks of a fused step have run on the process's own gradient.
        raise ValueError(f"{flag} does not work with {num_processes} processes: each parameter would be stepped "
                         "with its own process's gradient, before DDP has averaged it across processes. Train on "
                         f"one process or without {flag}.")
    if mixed_precision == "fp16":
        raise ValueError(f"{flag} does not work with --mixed_precision fp16: loss scaling must see all gradients "
                         "before any step. Use --mixed_precision bf16 or no.")


def _as_groups(param_groups) -> list[dict]:
    groups = list(param_groups)
    if not groups:
        raise ValueError("--fused_backward_pass: no parameters to train")
    if isinstance(groups[0], torch.Tensor):
        return [{"params": groups}]
    return [{**group, "params": list(group["params"])} for group in groups]


@dataclass(eq=False)
class _Chunk:
    """Consecutive parameters of one param group, stepped together by their own optimizer once all their gradients
    are ready (one parameter with --fused_backward_pass, a share of the model with --fused_optimizer_groups)."""

    params: list[torch.nn.Parameter]
    group: int  # index into the param groups the schedulers see
    first: int  # position of params[0] in the unfused optimizer's state layout
    optimizer: torch.optim.Optimizer
    needed: int = 0  # parameters that get a gradient in this backward (counted when the first one is ready)
    ready: int = 0


class FusedBackwardOptimizer(torch.optim.Optimizer):
    """The optimizer `build_optimizer(config, param_groups)` would build, stepped inside backward (module
    docstring): parameter by parameter (`groups` None: --fused_backward_pass), or in `groups` shares of the
    parameters, each stepped as soon as all its gradients are ready (kohya's --fused_optimizer_groups: a share
    never spans two param groups, so a run with several learning rates gets a few more shares). Hooks are
    registered on construction; `remove_hooks()` takes them off (the parameters then simply accumulate gradients
    again, and `step()` steps whatever a backward left).

    `max_grad_norm`: None = `config.max_grad_norm`; 0 disables the clipping (by each share's own norm).
    """

    def __init__(self, config: OptimizerConfig, param_groups, *, max_grad_norm: float | None = None,
                 groups: int | None = None):
        user_groups = _as_groups(param_groups)
        message = _refusal(config.optimizer_type, FUSED_BACKWARD_PASS if groups is None else FUSED_OPTIMIZER_GROUPS)
        if message:
            raise ValueError(message)
        if groups is not None and groups < 1:
            raise ValueError(f"--fused_optimizer_groups {groups}: give a number of groups of 1 or more")
        cls, _ = optimizer_class(config.optimizer_type)
        if cls.__module__.split(".")[0] not in _PER_PARAMETER_PACKAGES:
            logger.warning("a fused optimizer step with --optimizer_type %s (%s.%s): assuming its update of each "
                           "parameter depends only on that parameter's gradient and state", config.optimizer_type,
                           cls.__module__, cls.__qualname__)
        # The optimizer the unfused run would build gives the complete param groups (every default filled in), so
        # the schedulers see the same groups; it is never stepped and holds no state.
        template = build_optimizer(config, user_groups)
        super().__init__([dict(group) for group in template.param_groups], dict(template.defaults))
        del template
        self.max_grad_norm = config.max_grad_norm if max_grad_norm is None else max_grad_norm
        total = sum(len(group["params"]) for group in self.param_groups)
        size = 1 if groups is None else math.ceil(total / groups)
        # Each chunk's optimizer is built exactly as the unfused one (same class, same keyword arguments, the
        # group's own values), so each parameter gets the same arithmetic and state as in the unfused step.
        self._chunks: list[_Chunk] = []
        first = 0
        for g, (user_group, group) in enumerate(zip(user_groups, self.param_groups)):  # torch keeps the order
            extra = {k: v for k, v in user_group.items() if k != "params"}
            params = group["params"]
            for start in range(0, len(params), size):
                chunk = params[start:start + size]
                self._chunks.append(_Chunk(chunk, g, first + start, build_optimizer(config, [{**extra,
                                                                                              "params": chunk}])))
            first += len(params)
        self._handles = [param.register_post_accumulate_grad_hook(self._hook(chunk))
                         for chunk in self._chunks for param in chunk.params if param.requires_grad]

    def _hook(self, chunk: _Chunk):
        def gradient_ready(param: torch.Tensor) -> None:
            if chunk.ready == 0:  # the first of this backward: which parameters are trained now (a --pivotal_steps
                chunk.needed = sum(p.requires_grad for p in chunk.params)  # word may have been frozen since)
            chunk.ready += 1
            if chunk.ready >= chunk.needed:
                self._step_chunk(chunk)

        return gradient_ready

    def _step_chunk(self, chunk: _Chunk) -> None:
        with_grad = [p for p in chunk.params if p.grad is not None]
        if with_grad and self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(with_grad, self.max_grad_norm)  # this chunk's own norm (kohya)
        # Both groups are looked up at each step: load_state_dict (torch's, accelerate's) may replace the dicts.
        inner_group = chunk.optimizer.param_groups[0]
        for key, value in self.param_groups[chunk.group].items():  # the scheduler's lr (and any other value)
            if key != "params":
                inner_group[key] = value
        chunk.optimizer.step()
        for param in chunk.params:
            param.grad = None
        chunk.ready = 0

    @property
    def hooks_attached(self) -> bool:
        return bool(self._handles)

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # The loop's calls: the work was done during backward.

    def step(self, closure=None):
        """Steps only what a backward left waiting: a share some of whose parameters got no gradient (unused in
        this forward), or gradients accumulated without the hooks; otherwise a no-op (everything was stepped during
        backward). A closure is evaluated first (its backward steps)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for chunk in self._chunks:
            if chunk.ready or (not self._handles and any(p.grad is not None for p in chunk.params)):
                self._step_chunk(chunk)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do after a fused backward (gradients are freed as they are used); clears any gradient left
        by a backward that ran without the hooks."""
        for chunk in self._chunks:
            chunk.ready = 0
            for param in chunk.params:
                if param.grad is not None:
                    if set_to_none:
                        param.grad = None
                    else:
                        param.grad.detach_().zero_()

    # Exact resume, in the unfused optimizer's format.

    def state_dict(self) -> dict:
        state = {}
        for chunk in self._chunks:
            for position, values in chunk.optimizer.state_dict()["state"].items():
                state[chunk.first + position] = values
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
        positions = [position for saved in saved_groups for position in saved["params"]]  # ours, in order -> theirs
        for chunk in self._chunks:
            values = {k: v for k, v in self.param_groups[chunk.group].items() if k != "params"}
            mine = {j: saved_state[positions[chunk.first + j]] for j in range(len(chunk.params))
                    if positions[chunk.first + j] in saved_state}
            chunk.optimizer.load_state_dict({"state": mine,
                                             "param_groups": [{**values, "params": list(range(len(chunk.params)))}]})
