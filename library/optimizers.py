"""Optimizer and learning-rate scheduler factory with kohya's names (`--optimizer_type`, `--lr_scheduler`).

Each optimizer name maps to a class in a dependency made for it (torch, bitsandbytes, lion-pytorch, prodigyopt,
schedulefree, transformers' Adafactor); any `module.Class` path works too. `--optimizer_args key=value` values are
Python literals (kohya: `betas=0.9,0.999` becomes a tuple). Schedulers: a diffusers/transformers name
(`--lr_scheduler`), or any scheduler class (`--lr_scheduler_type`, a `torch.optim.lr_scheduler` name or
`module.Class`) built with `--lr_scheduler_args key=value` literals, as kohya does.
"""

from __future__ import annotations

import ast
import importlib
import inspect
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
    lr_scheduler_type: str = ""  # a scheduler class; overrides lr_scheduler (kohya)
    lr_scheduler_args: dict = field(default_factory=dict)  # its keyword arguments (or piecewise_constant's step_rules)
    lr_decay_steps: str = "0"  # warmup_stable_decay's decay: int, ratio < 1, or "N%", as --lr_warmup_steps
    lr_scheduler_timescale: int | None = None  # inverse_sqrt's timescale (None: transformers' default)
    lr_scheduler_min_lr_ratio: float | None = None  # cosine_with_min_lr / warmup_stable_decay: the floor, x the lr

    @property
    def is_schedule_free(self) -> bool:
        return self.optimizer_type.lower().endswith("schedulefree")


def parse_optimizer_args(pairs: list[str] | None, flag: str = "--optimizer_args") -> dict:
    """`key=value` words (`--optimizer_args`, `--lr_scheduler_args`) as keyword arguments; values are Python
    literals, read with ast.literal_eval as kohya does."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"{flag} {pair!r}: expected key=value")
        key, value = pair.split("=", 1)
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"{flag} {pair!r}: the value must be a Python literal (quote strings: "
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


# The flags that only some named schedulers read (kohya reads them there and ignores them elsewhere).
_SCHEDULE_FLAGS = {"lr_decay_steps": ("warmup_stable_decay",), "lr_scheduler_timescale": ("inverse_sqrt",),
                   "lr_scheduler_min_lr_ratio": ("cosine_with_min_lr", "warmup_stable_decay")}


def _warn_unused_schedule_flags(config: OptimizerConfig) -> None:
    """GUI-made configs set these for every scheduler; a value the chosen one does not read is said, not hidden."""
    for flag, schedulers in _SCHEDULE_FLAGS.items():
        value = getattr(config, flag)
        if value not in (None, "0", 0) and config.lr_scheduler not in schedulers:
            logger.warning("--%s %s is not used: only --lr_scheduler %s reads it", flag, value, " / ".join(schedulers))


def _transformers_schedule(config: OptimizerConfig, optimizer, warmup: int, total_steps: int):
    """kohya's three schedules from transformers, with kohya's arguments: inverse_sqrt (--lr_scheduler_timescale),
    cosine_with_min_lr (--lr_scheduler_min_lr_ratio; --lr_scheduler_num_cycles counts whole periods, half a
    cosine each as kohya passes it) and warmup_stable_decay (--lr_decay_steps, the rest of the run after warm-up
    stable)."""
    from transformers.optimization import (get_cosine_with_min_lr_schedule_with_warmup, get_inverse_sqrt_schedule,
                                           get_wsd_schedule)

    name, ratio = config.lr_scheduler, config.lr_scheduler_min_lr_ratio
    if ratio is not None and not 0 <= ratio <= 1:
        raise ValueError(f"--lr_scheduler_min_lr_ratio {ratio}: give a ratio of the learning rate between 0 and 1")
    if name == "inverse_sqrt":
        if config.lr_scheduler_timescale is not None and config.lr_scheduler_timescale <= 0:
            raise ValueError(f"--lr_scheduler_timescale {config.lr_scheduler_timescale}: give a number of steps > 0 "
                             "(or leave it out: the warm-up steps, else 10,000)")
        return get_inverse_sqrt_schedule(optimizer, num_warmup_steps=warmup, timescale=config.lr_scheduler_timescale)
    if name == "cosine_with_min_lr":
        if ratio is None:
            raise ValueError("--lr_scheduler cosine_with_min_lr needs --lr_scheduler_min_lr_ratio (e.g. 0.1: the "
                             "learning rate ends at a tenth of --learning_rate)")
        return get_cosine_with_min_lr_schedule_with_warmup(optimizer, num_warmup_steps=warmup,
                                                           num_training_steps=total_steps,
                                                           num_cycles=config.lr_scheduler_num_cycles / 2,
                                                           min_lr_rate=ratio)
    decay = warmup_steps(config.lr_decay_steps, total_steps)  # same spellings as --lr_warmup_steps
    stable = total_steps - warmup - decay
    if stable < 0:
        raise ValueError(f"--lr_warmup_steps ({warmup} steps) and --lr_decay_steps ({decay} steps) are longer than "
                         f"the run ({total_steps} steps): shorten them")
    return get_wsd_schedule(optimizer, num_warmup_steps=warmup, num_decay_steps=decay, num_stable_steps=stable,
                            num_cycles=config.lr_scheduler_num_cycles / 2, min_lr_ratio=ratio or 0.0)


def scheduler_class(name: str) -> type:
    """`--lr_scheduler_type`: a class of torch.optim.lr_scheduler by its bare name, or any `module.Class`."""
    module_name, _, class_name = name.rpartition(".")
    module_name = module_name or "torch.optim.lr_scheduler"
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--lr_scheduler_type {name}: cannot import the module '{module_name}' ({e}); install its "
                         "package or fix the path") from None
    cls = getattr(module, class_name, None)
    if isinstance(cls, type):
        return cls
    torch_classes = sorted(n for n, c in vars(torch.optim.lr_scheduler).items() if isinstance(c, type) and
                           issubclass(c, torch.optim.lr_scheduler.LRScheduler) and c is not
                           torch.optim.lr_scheduler.LRScheduler and not n.startswith("_"))
    raise ValueError(f"--lr_scheduler_type {name}: '{module_name}' has no class {class_name!r}; give a "
                     f"torch.optim.lr_scheduler class ({', '.join(torch_classes)}) or a module.Class path")


def build_class_scheduler(name: str, optimizer: torch.optim.Optimizer, kwargs: dict):
    """A scheduler class (`--lr_scheduler_type`) called as kohya does: `cls(optimizer, **lr_scheduler_args)`.
    The loop steps it once per optimizer step, so step counts in its arguments (T_max, step_size...) are
    optimizer steps."""
    cls = scheduler_class(name)
    given = " ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "(none)"
    try:
        scheduler = cls(optimizer, **kwargs)
    except (TypeError, ValueError, KeyError) as e:  # a missing, unknown or out-of-range argument
        raise ValueError(f"--lr_scheduler_type {name} refused --lr_scheduler_args {given} ({e}); check the names "
                         f"and values against {cls.__module__}.{cls.__qualname__}") from None
    missing = [m for m in ("step", "get_last_lr", "state_dict", "load_state_dict")
               if not callable(getattr(scheduler, m, None))]  # what the loop and --save_state / --resume call
    if missing:
        raise ValueError(f"--lr_scheduler_type {name}: not a learning-rate scheduler (no {', '.join(missing)}); "
                         "give a torch.optim.lr_scheduler.LRScheduler subclass")
    # The loop calls step() without arguments after every optimizer step; a scheduler whose step needs a value
    # (ReduceLROnPlateau's metric) would fail at the first step, after the models have loaded.
    needed = [p.name for p in inspect.signature(scheduler.step).parameters.values()
              if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if needed:
        raise ValueError(f"--lr_scheduler_type {name}: its step() needs {', '.join(needed)} (e.g. a validation "
                         "metric), but training steps the scheduler once per optimizer step with no arguments; "
                         "choose a scheduler that follows the step count")
    logger.info("learning-rate scheduler: %s.%s(%s) (--lr_scheduler_type overrides --lr_scheduler)",
                cls.__module__, cls.__qualname__, given)
    return scheduler


def build_scheduler(config: OptimizerConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """The LR scheduler, stepped once per optimizer step."""
    from diffusers.optimization import get_scheduler

    warmup = warmup_steps(config.lr_warmup_steps, total_steps)
    name = config.lr_scheduler
    if config.is_schedule_free:
        if config.lr_scheduler_type:
            logger.warning("--lr_scheduler_type %s is not used: %s schedules its learning rate itself",
                           config.lr_scheduler_type, config.optimizer_type)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)  # the optimizer schedules itself
    if config.lr_scheduler_type:
        if warmup:  # kohya refuses it too: the class alone decides the schedule
            raise ValueError(f"--lr_scheduler_type {config.lr_scheduler_type} does not use --lr_warmup_steps; "
                             "remove it (a warm-up, if the class has one, goes in --lr_scheduler_args)")
        return build_class_scheduler(config.lr_scheduler_type, optimizer, config.lr_scheduler_args)
    # Named schedulers take their settings from their own flags; only piecewise_constant reads one from here.
    if set(config.lr_scheduler_args) - ({"step_rules"} if name == "piecewise_constant" else set()):
        raise ValueError(f"--lr_scheduler_args {' '.join(config.lr_scheduler_args)}: read with --lr_scheduler_type "
                         "(a scheduler class), or as step_rules with --lr_scheduler piecewise_constant; --lr_scheduler "
                         f"{name} takes --lr_warmup_steps, --lr_scheduler_num_cycles and --lr_scheduler_power")
    step_rules = config.lr_scheduler_args.get("step_rules")
    if name == "piecewise_constant" and not isinstance(step_rules, str):
        raise ValueError("--lr_scheduler piecewise_constant needs --lr_scheduler_args step_rules='MULT:STEPS,...,"
                         "MULT' (e.g. step_rules='1:100,0.1:200,0.01': x1 until step 100, x0.1 until 200, then x0.01)")
    if name == "constant" and warmup:
        raise ValueError("--lr_scheduler constant does not warm up; use constant_with_warmup with --lr_warmup_steps")
    _warn_unused_schedule_flags(config)
    if name in ("inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay"):
        return _transformers_schedule(config, optimizer, warmup, total_steps)
    return get_scheduler(name, optimizer, step_rules=step_rules, num_warmup_steps=warmup,
                         num_training_steps=total_steps, num_cycles=config.lr_scheduler_num_cycles,
                         power=config.lr_scheduler_power)
