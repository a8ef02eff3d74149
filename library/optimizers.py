"""Optimizer and learning-rate scheduler factory with kohya's names (`--optimizer_type`, `--lr_scheduler`).

Each optimizer name maps to a class in a dependency made for it (torch, bitsandbytes, lion-pytorch, prodigyopt,
schedulefree, transformers' Adafactor); any `module.Class` path works too. `--optimizer_args key=value` values are
Python literals (kohya: `betas=0.9,0.999` becomes a tuple).
"""

from __future__ import annotations

import ast
import importlib
import logging
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

# name (lower case) -> (module, class, default kwargs)
_OPTIMIZERS = {
    "adamw": ("torch.optim", "AdamW", {}),
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit", {}),
    "pagedadamw": ("bitsandbytes.optim", "PagedAdamW", {}),
    "pagedadamw8bit": ("bitsandbytes.optim", "PagedAdamW8bit", {}),
    "pagedadamw32bit": ("bitsandbytes.optim", "PagedAdamW32bit", {}),
    "lion": ("lion_pytorch", "Lion", {}),
    "lion8bit": ("bitsandbytes.optim", "Lion8bit", {}),
    "pagedlion8bit": ("bitsandbytes.optim", "PagedLion8bit", {}),
    "sgdnesterov": ("torch.optim", "SGD", {"nesterov": True, "momentum": 0.9}),
    "sgdnesterov8bit": ("bitsandbytes.optim", "SGD8bit", {"nesterov": True, "momentum": 0.9}),
    "adafactor": ("transformers.optimization", "Adafactor", {}),
    "prodigy": ("prodigyopt", "Prodigy", {}),
    "adamwschedulefree": ("schedulefree", "AdamWScheduleFree", {}),
    "radamschedulefree": ("schedulefree", "RAdamScheduleFree", {}),
    "sgdschedulefree": ("schedulefree", "SGDScheduleFree", {}),
    "dadaptation": ("dadaptation", "DAdaptAdamPreprint", {}),
    "dadaptadampreprint": ("dadaptation", "DAdaptAdamPreprint", {}),
    "dadaptadagrad": ("dadaptation", "DAdaptAdaGrad", {}),
    "dadaptadam": ("dadaptation", "DAdaptAdam", {}),
    "dadaptadan": ("dadaptation", "DAdaptAdan", {}),
    "dadaptadanip": ("dadaptation.experimental", "DAdaptAdanIP", {}),
    "dadaptlion": ("dadaptation", "DAdaptLion", {}),
    "dadaptsgd": ("dadaptation", "DAdaptSGD", {}),
}


@dataclass(frozen=True)
class OptimizerConfig:
    optimizer_type: str = "AdamW"
    learning_rate: float = 2e-6
    optimizer_args: dict = field(default_factory=dict)
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant"
    lr_warmup_steps: str = "0"  # int, ratio < 1, or "N%"
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0

    @property
    def is_schedule_free(self) -> bool:
        return self.optimizer_type.lower().endswith("schedulefree")


def parse_optimizer_args(pairs: list[str] | None) -> dict:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"--optimizer_args {pair!r}: expected key=value")
        key, value = pair.split("=", 1)
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"--optimizer_args {pair!r}: the value must be a Python literal (quote strings: "
                             f"{key}='{value}')") from None
    return out


def resolve_optimizer_type(optimizer_type: str, *, use_8bit_adam: bool = False, use_lion_optimizer: bool = False) -> str:
    """kohya's legacy aliases; a conflict with --optimizer_type is an error."""
    alias = "AdamW8bit" if use_8bit_adam else ("Lion" if use_lion_optimizer else None)
    if alias and optimizer_type and optimizer_type.lower() != alias.lower():
        raise ValueError(f"--optimizer_type {optimizer_type} conflicts with --use_8bit_adam/--use_lion_optimizer")
    return alias or optimizer_type or "AdamW"


def optimizer_class(name: str):
    entry = _OPTIMIZERS.get(name.lower())
    if entry:
        module_name, class_name, defaults = entry
    elif "." in name:
        module_name, class_name = name.rsplit(".", 1)
        defaults = {}
    elif hasattr(torch.optim, name):
        module_name, class_name, defaults = "torch.optim", name, {}
    else:
        raise ValueError(f"--optimizer_type {name}: unknown; use one of {', '.join(sorted(v[1] for v in _OPTIMIZERS.values()))} "
                         "or a module.Class path")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--optimizer_type {name} needs the package '{module_name.split('.')[0]}' ({e}); "
                         "install it or choose another optimizer") from e
    return getattr(module, class_name), defaults


def build_optimizer(config: OptimizerConfig, param_groups) -> torch.optim.Optimizer:
    cls, defaults = optimizer_class(config.optimizer_type)
    kwargs = {**defaults, **config.optimizer_args}
    if config.optimizer_type.lower() == "adafactor":
        # kohya: with relative_step (the Adafactor default) the lr comes from the optimizer itself.
        kwargs.setdefault("relative_step", False)
        kwargs.setdefault("scale_parameter", False)
        kwargs.setdefault("warmup_init", False)
    return cls(param_groups, lr=config.learning_rate, **kwargs)


def warmup_steps(spec: str | int | float, total_steps: int) -> int:
    """`--lr_warmup_steps` as kohya reads it: an int, a ratio below 1 of the total, or "N%"."""
    text = str(spec).strip()
    if text.endswith("%"):
        return int(float(text[:-1]) / 100 * total_steps)
    value = float(text)
    if value < 1 and value != 0:
        return int(value * total_steps)
    return int(value)


def build_scheduler(config: OptimizerConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """The LR scheduler, stepped once per optimizer step."""
    from diffusers.optimization import get_scheduler

    warmup = warmup_steps(config.lr_warmup_steps, total_steps)
    name = config.lr_scheduler
    if config.is_schedule_free:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)  # the optimizer schedules itself
    if name == "constant" and warmup:
        raise ValueError("--lr_scheduler constant does not warm up; use constant_with_warmup with --lr_warmup_steps")
    if name in ("inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay"):
        from transformers import get_scheduler as hf_get_scheduler

        return hf_get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                         num_cycles=config.lr_scheduler_num_cycles, power=config.lr_scheduler_power)
