"""The validation loss (kohya's --validation_split, --validation_seed, --validate_every_n_steps,
--validate_every_n_epochs, --max_validation_steps): the training loss on held-out images, measured so that its
curve compares across steps and across runs.

The held-out images are the dataset's `validation` items (dataset_config.split_validation; never in a training
batch). A pass runs every validation batch at kohya's four fixed timesteps (evenly inside the timestep range: 200,
400, 600 and 800 of 1000) with noise drawn from generators seeded by (validation seed, sample, timestep) and fixed
captions, crops and flips (the samples of epoch 1), in evaluation mode and without gradients. So two passes differ
only by the weights, and a run's curve can be laid over another's. The mean over all (batch, timestep) losses is
logged as kohya names it: `loss/validation/step_average` (and `_divergence`, minus the training loss' moving
average) after a step, `loss/validation/epoch_average` (`_divergence`) after an epoch. It touches no state
training uses (global RNG included: the next step reseeds it), so a run validates without changing its losses.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import numpy as np
import torch

from library.buckets import BucketBatchSampler
from library.train_dataset import SampleKey, TrainingDataset, collate

logger = logging.getLogger(__name__)

NUM_TIMESTEPS = 4  # kohya's NUM_VALIDATION_TIMESTEPS


@dataclass(frozen=True)
class ValidationConfig:
    seed: int
    every_n_steps: int | None = None  # None: after epochs only
    every_n_epochs: int | None = None  # None: every epoch (kohya's default, also when validating by steps)
    max_batches: int | None = None  # --max_validation_steps
    timesteps: tuple[int, ...] = (200, 400, 600, 800)


def validation_timesteps(min_timestep: int | None, max_timestep: int | None, num_train_timesteps: int = 1000) \
        -> tuple[int, ...]:
    """kohya's fixed timesteps: NUM_TIMESTEPS evenly inside [min, max] (0 and 1000 by default), ends left out."""
    low, high = min_timestep or 0, num_train_timesteps if max_timestep is None else max_timestep
    return tuple(int(t) for t in np.linspace(low, high, NUM_TIMESTEPS + 2, dtype=int)[1:-1])


class Validator:
    """The validation batches of one process and the pass over them (`loss`)."""

    def __init__(self, dataset: TrainingDataset, config: ValidationConfig, *, num_processes: int = 1,
                 process_index: int = 0):
        self.dataset, self.config = dataset, config
        batches = []
        for g, group in enumerate(dataset.groups):
            indices = [i for i, item in enumerate(dataset.items) if item.group == g and item.validation]
            if not indices:
                continue
            # Same-bucket batches of the group's batch size, in a fixed order; slots number the samples.
            sampler = BucketBatchSampler([dataset.items[i].bucket for i in indices], group.batch_size, config.seed + g)
            batches += [[indices[i] for i in batch] for batch in sampler.batches(1)]
        if config.max_batches is not None:
            batches = batches[:config.max_batches]
        # Each process takes every num_processes-th batch; the mean is over all processes' losses (reduce).
        numbered = [(n, batch) for n, batch in enumerate(batches)]
        self.batches = numbered[process_index::num_processes]
        self.total_batches = len(batches)

    def due_after_step(self, step: int) -> bool:
        return bool(self.config.every_n_steps) and step % self.config.every_n_steps == 0

    def due_after_epoch(self, epoch: int) -> bool:
        every = self.config.every_n_epochs
        return every is None or epoch % every == 0  # kohya: every epoch by default, with step validation or not

    @torch.inference_mode()
    def loss(self, loss_fn, accelerator, trainable: torch.nn.Module | None = None) -> float:
        """The mean validation loss. `loss_fn(batch, generators, timesteps)`: the training step's loss of a batch
        at fixed timesteps (Trainer._loss); `trainable`: put in eval mode for the pass (LoRA dropout off)."""
        total, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        with _eval_mode(trainable):
            for number, batch_indices in self.batches:
                samples = [self.dataset[SampleKey(1, 0, index, slot)] for slot, index in enumerate(batch_indices)]
                batch = collate(samples)
                for t in self.config.timesteps:
                    generators = [torch.Generator().manual_seed(_seed(self.config.seed, number, slot, t))
                                  for slot in range(len(samples))]
                    timesteps = torch.full((len(samples),), t, dtype=torch.long)
                    total += float(loss_fn(batch, generators, timesteps))
                    count += 1
        if accelerator.num_processes > 1:
            total = accelerator.reduce(total.to(accelerator.device), reduction="sum").cpu()
            count = accelerator.reduce(count.to(accelerator.device), reduction="sum").cpu()
        return float(total / count) if count else float("nan")


def _seed(seed: int, batch: int, slot: int, timestep: int) -> int:
    import hashlib

    digest = hashlib.sha256(f"validation:{seed}:{batch}:{slot}:{timestep}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module | None):
    if module is None:
        yield
        return
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.train(training)
