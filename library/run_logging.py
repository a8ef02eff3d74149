"""Where a run's scalars and sample images go: TensorBoard, Weights & Biases, or both (`--log_with`).

The training loop and the sampler talk to one `RunLog` with the two calls they need (`add_scalar`, `add_image`);
it fans them out. wandb is optional: it is imported only when asked for, and its absence is a clear error before
any model loads (`check_available`).
"""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

WANDB_MISSING = "--log_with {}: the wandb package is not installed; `pip install wandb` (or log with tensorboard)"


@dataclass(frozen=True)
class LogSettings:
    logging_dir: Path | None  # TensorBoard event folder (already with kohya's timestamped <prefix><time> level)
    backends: tuple[str, ...]  # ("tensorboard",), ("wandb",) or both
    project: str = "train"  # --log_tracker_name: the wandb project
    run_name: str | None = None  # --wandb_run_name
    wandb_dir: Path | None = None  # where wandb keeps its run files
    wandb_init: dict = field(default_factory=dict)  # [wandb] table of --log_tracker_config (entity, tags, ...)
    api_key: str | None = field(default=None, repr=False)  # --wandb_api_key
    config: dict = field(default_factory=dict)  # --log_config: the run's arguments, recorded with the run


def backends_for(log_with: str | None, logging_dir: str | None) -> tuple[str, ...]:
    """kohya's rule: no --log_with but a --logging_dir means TensorBoard; "all" means both."""
    if log_with is None:
        return ("tensorboard",) if logging_dir else ()
    return ("tensorboard", "wandb") if log_with == "all" else (log_with,)


def check_available(log_with: str | None) -> str | None:
    """The problem with `--log_with`, if any (wandb requested but not installed)."""
    if log_with in ("wandb", "all") and importlib.util.find_spec("wandb") is None:
        return WANDB_MISSING.format(log_with)
    return None


def timestamped_dir(logging_dir: str, prefix: str | None) -> Path:
    """kohya's layout: every run logs into `<logging_dir>/<log_prefix><YYYYmmddHHMMSS>`."""
    return Path(logging_dir) / ((prefix or "") + time.strftime("%Y%m%d%H%M%S"))


class RunLog:
    """Scalars and images of one run, sent to every configured backend. Call `close()` at the end."""

    def __init__(self, settings: LogSettings):
        self.settings = settings
        self._tensorboard = None
        self._wandb_run = None
        if "tensorboard" in settings.backends:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(settings.logging_dir))
        if "wandb" in settings.backends:
            import wandb

            if settings.api_key:
                wandb.login(key=settings.api_key)
            wandb_dir = settings.wandb_dir or settings.logging_dir
            if wandb_dir is not None:
                Path(wandb_dir).mkdir(parents=True, exist_ok=True)
            init = {"project": settings.project, "name": settings.run_name,
                    "dir": str(wandb_dir) if wandb_dir else None, "config": settings.config or None}
            init.update(settings.wandb_init)  # the user's tracker config wins
            self._wandb_run = wandb.init(**init)
            logger.info("logging to wandb project %s (run %s)", settings.project, self._wandb_run.name)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self._tensorboard is not None:
            self._tensorboard.add_scalar(tag, value, step)
        if self._wandb_run is not None:
            self._wandb_run.log({tag: value}, step=step)  # same-step calls merge into one wandb row

    def add_image(self, tag: str, image, step: int) -> None:
        """`image`: an HxWxC uint8 array."""
        if self._tensorboard is not None:
            self._tensorboard.add_image(tag, image, step, dataformats="HWC")
        if self._wandb_run is not None:
            import wandb

            self._wandb_run.log({tag: wandb.Image(image)}, step=step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
