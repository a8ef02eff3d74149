"""The training loop every trainer shares: batches -> conditioning -> noise -> UNet -> loss -> optimizer step,
with periodic saves, training state for exact resume, a progress bar and logs.

What a trainer trains and saves is a `TrainingTask` (LoRA network, full UNet, ...); everything else is here once.

Exact resume: the data order, caption randomness, noise and timesteps are pure functions of (seed, epoch, step)
(see train_dataset.py and diffusion_objective.py), so a state needs only the trainable weights, the optimizer and
scheduler states and three counters. `train_state.json` stores the *global* step, so resuming a resumed run
continues counting instead of over-training (kohya #2171).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import pickle
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
from tqdm import tqdm

from library.atomic_files import atomic_directory
from library.data_parallel import TrainedForward, training_engine
from library.diffusion_objective import DiffusionObjective
from library.extra_inputs import feeder_for
from library.hub_upload import HubSettings, HubUploader
from library.run_logging import LogSettings, RunLog
from library.text_conditioning import TextConditioner, TextConditioning
from library.train_dataset import EpochBatches, SampleKey, TrainingDataset, collate

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.json"
STATE_TENSOR_FILES = ("trainable.pt", "scheduler.pt")  # + the engine's optimizer state (`optimizer_state_files`)


class TrainingTask(Protocol):
    """What differs between trainers."""

    train_text_encoder: bool

    def trainable_state(self) -> dict[str, torch.Tensor]: ...
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None: ...
    def save_model(self, path_stem: Path, *, epoch: int, global_step: int) -> Path: ...
    def model_file_suffix(self) -> str: ...
    # Optional:
    # - `denoise(noisy_latents, timesteps, text_conditioning, batch) -> prediction`: a model other than the bare
    #   U-Net predicts the noise (e.g. U-Net + ControlNet); called under autocast;
    # - `model_paths(path_stem) -> list[Path]`: every file/folder one save writes, for pruning (default: stem + suffix);
    # - `before_step(global_step)`: e.g. stop training the text encoder after step N (a function of the step, so
    #   resumed runs agree);
    # - `after_optimizer_step() -> dict[str, float]`: e.g. max-norm regularisation, an EMA update; its values are
    #   logged with the step;
    # - `unused_parameters(text_conditioner) -> list[data_parallel.UnusedParameters]`: why some trained parameters
    #   can get no gradient in a step (LoRA module dropout, a text encoder layer the conditioning skips, training
    #   that stops at a step); DDP must know (default: none);
    # - `trained_modules() -> dict[str, nn.Module]` and a `gathered_weights` attribute: the whole models a full-model
    #   task trains, which FSDP shards, and the full weights gathered from the shards that its save then writes
    #   (library/fsdp_engine.py; set by the loop around each save).


@dataclass(frozen=True)
class LoopConfig:
    output_dir: Path
    output_name: str
    max_train_steps: int
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    seed: int = 0
    max_grad_norm: float = 1.0
    vae_scale_factor: float = 0.18215
    save_every_n_steps: int | None = None
    save_every_n_epochs: int | None = None
    save_last_n_steps: int | None = None
    save_last_n_epochs: int | None = None
    save_n_epoch_ratio: int | None = None  # kohya: save about N times in the run (sets the epoch interval)
    save_last_n_steps_state: int | None = None  # the states' own retention (default: that of the model files)
    save_last_n_epochs_state: int | None = None
    save_state: bool = False
    save_state_on_train_end: bool = False
    log: LogSettings | None = None  # TensorBoard / wandb (None: no logs beyond the progress bar)
    data_loader_workers: int = 0
    persistent_data_loader_workers: bool = False  # one DataLoader whose workers serve every epoch
    sample_every_n_steps: int | None = None
    sample_every_n_epochs: int | None = None  # overrides sample_every_n_steps (kohya)
    sample_at_first: bool = False
    stop_after_steps: int | None = None  # testing aid: stop early as if killed (no final save)
    # kohya's --initial_step (or --initial_epoch): the run's step counter (and epoch) start there, without a state to
    # resume; with skip_until_initial_step the data also starts where the run left it (see `_start_at`).
    initial_step: int | None = None
    initial_epoch: int | None = None  # --initial_epoch E: step (E - 1) x steps per epoch
    skip_until_initial_step: bool = False
    hub: HubSettings | None = None  # upload saves to the Hugging Face Hub (kohya's --huggingface_* flags)


@dataclass
class TrainState:
    global_step: int = 0
    epoch: int = 1  # 1-based
    batch_in_epoch: int = 0  # batches of `epoch` already consumed
    run_fingerprint: dict | None = None


class NonFiniteLossError(FloatingPointError):
    pass


def _loading_error(error: ValueError, step: int) -> ValueError:
    """A batch that failed to load (e.g. an ImageError for a truncated JPEG), as the same error type with the
    original message (without torch's "Caught ... in DataLoader worker process N. Original Traceback ..."
    wrapper, whose last line is the original message) and the step."""
    text = str(error)
    if text.startswith("Caught ") and "Traceback" in text:
        text = [line for line in text.splitlines() if line.strip()][-1]
        for name in (f"{type(error).__module__}.{type(error).__qualname__}", type(error).__qualname__):
            if text.startswith(name + ": "):
                text = text[len(name) + 2:]
                break
    text += f" (while loading the batches of step {step}; the last saved model/state is intact)"
    try:
        return type(error)(text)
    except TypeError:  # an error type with another constructor (UnicodeDecodeError, ...)
        return ValueError(text)


def micro_step_seed(seed: int, global_step: int, micro: int, stream: str) -> int:
    """A seed for one random stream of one micro-step, from the run seed and its position only (never from what
    ran before), so resumed and multi-process runs draw the same numbers. Hashing keeps streams independent."""
    digest = hashlib.sha256(f"{seed}:{global_step}:{micro}:{stream}".encode()).hexdigest()
    return int(digest[:15], 16)


class _CurrentBatches:
    """The batch sampler of the persistent DataLoader: yields the key lists it was last given. A DataLoader reads
    its batch sampler anew, in this process, each time it is iterated, so one loader (and its worker processes)
    serves every epoch; the keys still say everything a sample depends on, so results do not change."""

    def __init__(self) -> None:
        self.keys: list[list[SampleKey]] = []

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


class Trainer:
    def __init__(self, *, task: TrainingTask, unet, vae, text_conditioner: TextConditioner, dataset: TrainingDataset,
                 batches: EpochBatches, objective: DiffusionObjective, optimizer, lr_scheduler, config: LoopConfig,
                 accelerator, run_fingerprint: dict, trainable_parameters: list[torch.nn.Parameter],
                 weight_dtype: torch.dtype = torch.float32, on_log: Callable[[dict], None] | None = None,
                 sampler: Callable[..., object] | None = None, sample_trainable: torch.nn.Module | None = None,
                 lr_names: list[str] | None = None, validator=None):
        self.task, self.unet, self.vae, self.text_conditioner = task, unet, vae, text_conditioner
        self.dataset, self.batches, self.objective = dataset, batches, objective
        self.optimizer, self.lr_scheduler, self.config = optimizer, lr_scheduler, config
        self.accelerator = accelerator
        self.run_fingerprint = run_fingerprint
        self.trainable_parameters = trainable_parameters
        self.weight_dtype = weight_dtype
        self.on_log = on_log
        self.sampler, self.sample_trainable = sampler, sample_trainable
        self.validator = validator  # validation.Validator: the loss on held-out images (--validation_split)
        self.hub: HubUploader | None = None  # uploads saves (--huggingface_repo_id), made by run()
        # A model with extra U-Net inputs (inpainting, depth, extra channels) gets them after the noisy latents.
        self.unet_inputs = feeder_for(dataset.condition, vae=vae, scaling_factor=config.vae_scale_factor)
        self._extra_logs: dict[str, float] = {}
        self.lr_names = lr_names  # TensorBoard names of the param groups' learning rates (kohya: lr/unet ...)
        self.state = TrainState(run_fingerprint=run_fingerprint)
        self.run_log = None
        self.loss_history: list[tuple[int, float]] = []
        self.validation_history: list[tuple[int, str, float]] = []  # (step, "step" / "epoch", loss)
        self._persistent_batches: _CurrentBatches | None = None  # --persistent_data_loader_workers
        self._persistent_loader: torch.utils.data.DataLoader | None = None
        self.model = None  # the step's model computation as accelerate prepared it (run: `_prepare_model`)
        # How the processes train together: DDP (or one process), or DeepSpeed ZeRO (--deepspeed).
        self.engine = training_engine(accelerator)

    # ------------------------------------------------------------------------------------------------------
    # Resume

    def _staging(self, folder: Path) -> Path:
        return folder.with_name(f".{folder.name}.optimizer-staging")

    def stage_state(self, folder: Path) -> None:
        """Every process, before the main one writes `folder` (`save_state`): an engine whose optimizer state is
        split over the processes (DeepSpeed) has each write its share beside the folder first."""
        self.engine.stage_optimizer_state(self._staging(folder))

    def save_state(self, folder: Path) -> None:
        with atomic_directory(folder) as tmp:
            torch.save(self.task.trainable_state(), tmp / "trainable.pt")
            self.engine.adopt_optimizer_state(self._staging(folder), tmp, self.optimizer)
            torch.save(self.lr_scheduler.state_dict(), tmp / "scheduler.pt")
            if self.accelerator.scaler is not None:  # fp16 loss scaling: its scale is part of the exact state
                torch.save(self.accelerator.scaler.state_dict(), tmp / "scaler.pt")
            (tmp / STATE_FILE).write_text(json.dumps(asdict(self.state), indent=2))
        logger.info("saved training state to %s (step %d)", folder, self.state.global_step)

    def load_state(self, folder: Path) -> None:
        state_file = folder / STATE_FILE
        if not state_file.is_file():
            raise ValueError(f"--resume {folder}: not a training state folder "
                             f"({'no such folder' if not folder.exists() else 'no ' + STATE_FILE}); give a "
                             "'<output_name>-...-state' folder written with --save_state")
        try:
            saved = TrainState(**json.loads(state_file.read_text()))
        except (ValueError, TypeError) as e:  # not JSON, not an object, or unknown / missing fields
            raise ValueError(f"--resume {folder}: {STATE_FILE} is damaged or from another version of this suite "
                             f"({e}); resume from another state folder, or start a new run") from None
        missing = [name for name in (*STATE_TENSOR_FILES, *self.engine.optimizer_state_files())
                   if not (folder / name).exists()]
        if missing:
            raise ValueError(f"--resume {folder}: incomplete state folder (no {', '.join(missing)}); resume from "
                             "another state folder, or start a new run")
        # Both ways: a setting recorded only when in use (e.g. a fused step) differs when either side lacks it.
        theirs, ours = saved.run_fingerprint or {}, self.run_fingerprint
        differences = {k: theirs.get(k, "<missing>") for k in {**theirs, **ours}
                       if theirs.get(k, "<missing>") != ours.get(k, "<missing>")}
        if differences:
            shown = "; ".join(f"{k}: state has {v!r}, this run {ours.get(k, '<missing>')!r}"
                              for k, v in differences.items())
            raise ValueError(f"--resume {folder}: the state comes from a different run configuration ({shown}). "
                             "Resume with the original settings, or start a new run.")
        try:
            # FSDP loads the full weights into each process's shards; the other engines hand them to the task.
            self.engine.load_trained_weights(self.task, torch.load(folder / "trainable.pt", weights_only=True))
            self.engine.load_optimizer_state(folder, self.optimizer)
            self.lr_scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
            if self.accelerator.scaler is not None and (folder / "scaler.pt").is_file():
                self.accelerator.scaler.load_state_dict(torch.load(folder / "scaler.pt", weights_only=True))
        except (RuntimeError, OSError, EOFError, KeyError, pickle.UnpicklingError) as e:
            raise ValueError(f"--resume {folder}: the state files cannot be loaded ({e}); resume from another "
                             "state folder, or start a new run") from None
        self.state = saved
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", folder, saved.global_step, saved.epoch,
                    saved.batch_in_epoch)

    # ------------------------------------------------------------------------------------------------------
    # One step

    def _conditioning(self, batch: dict) -> TextConditioning:
        # Under autocast like the U-Net: the frozen text encoder may be half precision while its LoRA (or the
        # whole encoder, train_db) trains in fp32; kohya runs it the same way. Each sample's size and crop go along
        # (SDXL conditions on them; other families' conditioners ignore them).
        with torch.set_grad_enabled(self.task.train_text_encoder), self.accelerator.autocast():
            return self.text_conditioner(batch["caption"], batch["sizes"])

    def _latents(self, batch: dict, generators: list[torch.Generator]) -> torch.Tensor:
        if "latents" in batch:
            latents = batch["latents"]
        else:
            with torch.no_grad():
                pixels = batch["pixels"].to(self.vae.device, self.vae.dtype)
                dist = self.vae.encode(pixels).latent_dist
                noise = torch.cat([torch.randn((1, *dist.mean.shape[1:]), generator=g) for g in generators])
                latents = (dist.mean + dist.std * noise.to(dist.mean)).float()
        return latents * self.config.vae_scale_factor

    def _loss(self, batch: dict, generators: list[torch.Generator],
              timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """The batch's loss; `timesteps` fixed instead of drawn (the validation loss)."""
        device = self.accelerator.device
        latents = self._latents(batch, generators).to(device)
        noised = self.objective.noised(latents, generators, timesteps)
        noisy = noised.noisy_latents
        if self.unet_inputs is not None:
            noisy = torch.cat([noisy, self.unet_inputs(batch, generators, tuple(latents.shape[-2:])).to(device)], dim=1)
        prediction = self.model(noisy, noised.timesteps.to(device), batch)
        return self.objective.loss(prediction, noised.target, noised.timesteps.to(device),
                                   loss_weights=batch["loss_weight"].to(device), mask=batch.get("mask"))

    def _predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, batch: dict) -> torch.Tensor:
        """The step's model computation, from the captions on: everything the trained parameters take part in, so
        that DDP, which runs it (`self.model`), sees their whole backward pass."""
        cond = self._conditioning(batch)
        denoise = getattr(self.task, "denoise", None)
        with self.accelerator.autocast():
            noisy = noisy_latents.to(self.weight_dtype)
            if denoise is not None:
                return denoise(noisy, timesteps, cond.to(self.weight_dtype), batch)
            return self.unet(noisy, timesteps, **cond.to(self.weight_dtype).unet_kwargs()).sample

    def _prepare_model(self):
        """`_predict` as a module over the trained parameters, prepared by the engine (with the optimizer): with
        several processes DDP averages their gradients during the backward pass (library/data_parallel.py), or
        DeepSpeed reduces and steps (library/deepspeed_engine.py)."""
        unused_of = getattr(self.task, "unused_parameters", None)
        trained_modules = getattr(self.task, "trained_modules", None)  # full-model tasks: what FSDP shards
        model, self.optimizer = self.engine.prepare(TrainedForward(self.trainable_parameters, self._predict),
                                                    self.optimizer,
                                                    unused=unused_of(self.text_conditioner) if unused_of else [],
                                                    modules=trained_modules() if self.engine.shards_models
                                                    and trained_modules else None)
        # Sharding replaces the parameters (FSDP: DTensors): clip and check the new ones.
        self.trainable_parameters = self.engine.trained_parameters(self.trainable_parameters)
        return model

    # ------------------------------------------------------------------------------------------------------
    # The loop

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.batches) / self.config.gradient_accumulation_steps)

    def save_every_n_epochs(self) -> int | None:
        """--save_every_n_epochs, or with --save_n_epoch_ratio N the interval that saves N times in the run
        (kohya: floor(epochs / N), at least 1; it wins over --save_every_n_epochs)."""
        c = self.config
        if not c.save_n_epoch_ratio:
            return c.save_every_n_epochs
        epochs = math.ceil(c.max_train_steps / self.steps_per_epoch())
        return max(1, epochs // c.save_n_epoch_ratio)

    def run(self, resume: Path | None = None) -> TrainState:
        self.model = self._prepare_model()  # before a resume: DeepSpeed loads its state into the prepared engine
        if resume:
            self.load_state(resume)
        elif self.config.initial_step or (self.config.initial_epoch or 1) > 1:
            step = self.config.initial_step
            if step is None:
                step = (self.config.initial_epoch - 1) * self.steps_per_epoch()
                if step >= self.config.max_train_steps:
                    raise ValueError(f"--initial_epoch {self.config.initial_epoch}: the run has only "
                                     f"{self.config.max_train_steps} steps ({self.steps_per_epoch()} per epoch)")
            self._start_at(step, skip_data=self.config.skip_until_initial_step)
        if self.config.log and self.accelerator.is_main_process:
            self.run_log = RunLog(self.config.log)
        if self.config.hub is not None and self.accelerator.is_main_process:
            self.hub = HubUploader(self.config.hub)
        try:
            return self._run()
        finally:
            if self.hub is not None:
                self.hub.close()  # the run ends when its uploads have
            if self.run_log:
                self.run_log.close()
            self._persistent_loader = self._persistent_batches = None  # its workers exit with it

    def _start_at(self, step: int, *, skip_data: bool) -> None:
        """Begin at optimizer step `step` (kohya's --initial_step): the counters (saves, samples, the epoch number
        and the epoch's caption schedules) carry on from there; with `skip_data` the epoch's batches also start
        after the ones `step` steps would have used, so the data (and each step's noise) is the run's own from
        there. The weights are whatever was loaded and the learning-rate schedule starts from its beginning (kohya
        says the same); --resume, not this, restores an interrupted run exactly."""
        per_epoch = self.steps_per_epoch()
        self.state.global_step, self.state.epoch = step, step // per_epoch + 1
        self.state.batch_in_epoch = (step % per_epoch) * self.config.gradient_accumulation_steps if skip_data else 0
        logger.info("starting at step %d (epoch %d%s)", step, self.state.epoch,
                    f", batch {self.state.batch_in_epoch + 1} of it" if skip_data else ", from its first batch")

    def _run(self) -> TrainState:
        c = self.config
        accum = c.gradient_accumulation_steps
        bar = tqdm(total=c.max_train_steps, initial=self.state.global_step, desc="steps", unit="step",
                   disable=not self.accelerator.is_main_process)
        started, steps_this_run = time.perf_counter(), 0
        if c.sample_at_first and self.state.global_step == 0:
            self._sample(epoch=None)
        while self.state.global_step < c.max_train_steps:
            epoch_batches = self.batches.batches(self.state.epoch)
            n, first = len(epoch_batches), self.state.batch_in_epoch
            # Optimizer steps of the rest of this epoch: `accum` batches each (the epoch's last may be shorter).
            groups = [list(range(s, min(s + accum, n))) for s in range(first, n, accum)]
            loader = iter(self._loader(epoch_batches, groups))
            for g, group in enumerate(groups):
                try:
                    micro_batches = [next(loader) for _ in group]
                except ValueError as e:  # an image that fails to load mid-run (ImageError), maybe in a worker
                    raise _loading_error(e, self.state.global_step + 1) from None
                loss = self._optimizer_step(micro_batches)
                self.state.batch_in_epoch = group[-1] + 1
                self.state.global_step += 1
                steps_this_run += 1
                self._log(loss, bar)
                if self.validator is not None and self.validator.due_after_step(self.state.global_step):
                    self._validate("step", bar)
                if c.save_every_n_steps and self.state.global_step % c.save_every_n_steps == 0 \
                        and self.state.global_step < c.max_train_steps:
                    self._save(f"{c.output_name}-step{self.state.global_step:08d}", "step")
                if c.sample_every_n_steps and not c.sample_every_n_epochs \
                        and self.state.global_step % c.sample_every_n_steps == 0:
                    self._sample(epoch=None)
                if c.stop_after_steps is not None and steps_this_run >= c.stop_after_steps:
                    bar.close()
                    return self.state
                if self.state.global_step >= c.max_train_steps:
                    break
            del loader
            if self.state.batch_in_epoch >= len(epoch_batches):
                finished = self.state.epoch
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
                if self.save_every_n_epochs() and finished % self.save_every_n_epochs() == 0 \
                        and self.state.global_step < c.max_train_steps:
                    self._save(f"{c.output_name}-{finished:06d}", "epoch")
                if c.sample_every_n_epochs and finished % c.sample_every_n_epochs == 0:
                    self._sample(epoch=finished)
                if self.validator is not None and self.validator.due_after_epoch(finished):
                    self._validate("epoch", bar)
        bar.close()
        if c.save_state or c.save_state_on_train_end:
            self.stage_state(c.output_dir / f"{c.output_name}-state")
        with self._gathered_weights():
            if self.accelerator.is_main_process:  # every process holds the same weights: one writes
                self._write(c.output_name, epoch=self._saved_epoch(final=True),
                            state=c.save_state or c.save_state_on_train_end)
        self.accelerator.wait_for_everyone()
        logger.info("trained %d steps in %.1f s", steps_this_run, time.perf_counter() - started)
        return self.state

    def _loader(self, epoch_batches: list[list[int]], groups: list[list[int]]):
        """Batches of the given optimizer-step groups, loaded (and collated) by DataLoader workers; each sample
        is addressed by its SampleKey, so workers need no shared state."""
        keys = [[SampleKey(self.state.epoch, self.state.global_step + g, index, slot)
                 for index, slot in epoch_batches[b]] for g, group in enumerate(groups) for b in group]
        workers = self.config.data_loader_workers
        if workers and self.config.persistent_data_loader_workers:
            # Starting workers costs seconds per epoch (a process each, plus the dataset); keep them for the run.
            if self._persistent_loader is None:
                self._persistent_batches = _CurrentBatches()
                self._persistent_loader = torch.utils.data.DataLoader(
                    self.dataset, batch_sampler=self._persistent_batches, collate_fn=collate, num_workers=workers,
                    persistent_workers=True, prefetch_factor=2)
            self._persistent_batches.keys = keys  # read when the caller iterates the loader
            return self._persistent_loader
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=keys, collate_fn=collate, num_workers=workers,
                                           persistent_workers=False, prefetch_factor=2 if workers else None)

    def _optimizer_step(self, micro_batches: list[dict]) -> float:
        step = self.state.global_step
        before = getattr(self.task, "before_step", None)
        if before:
            before(step)
        total = 0.0
        for micro, batch in enumerate(micro_batches):
            # Gradients are averaged over the processes once per optimizer step, in the last micro-batch's backward.
            last = micro == len(micro_batches) - 1
            with self.engine.micro_batch(self.model, last=last):
                total += self._micro_step(batch, step, micro, last=last)
        norm = None
        if self.config.max_grad_norm:
            norm = self.engine.clip_grad_norm(self.trainable_parameters, self.config.max_grad_norm)
        if self.accelerator.scaler is None and not self.engine.steps_in_backward:
            # fp16's loss scaler skips such steps itself (and lowers its scale); DeepSpeed has stepped already.
            self._check_gradients_are_finite(norm, step)
        self.optimizer.step()  # DeepSpeed: a no-op (its engine stepped in the last backward)
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        after = getattr(self.task, "after_optimizer_step", None)
        self._extra_logs = after() if after else {}  # e.g. --scale_weight_norms statistics
        mean_loss = torch.tensor(total / len(micro_batches))
        if self.accelerator.num_processes > 1:
            mean_loss = self.accelerator.reduce(mean_loss, reduction="mean")
        return mean_loss.item()

    def _micro_step(self, batch: dict, step: int, micro: int, *, last: bool) -> float:
        """Forward and backward of one micro-batch; its loss."""
        torch.manual_seed(micro_step_seed(self.config.seed, step, micro, f"process{self.accelerator.process_index}"))
        # ^ LoRA / network dropout draws from torch's global generator. Noise and timesteps come from one
        # generator per sample, seeded by its slot in the global batch (the same on any process count).
        generators = [torch.Generator().manual_seed(micro_step_seed(self.config.seed, step, micro, f"slot{slot}"))
                      for slot in batch["slot"]]
        loss = self._loss(batch, generators)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"loss became {loss.item()} at step {step + 1} (epoch {self.state.epoch}, images "
                f"{', '.join(batch['path'][:3])}); stopping. The last saved model/state is intact. Lower the "
                "learning rate, use --no_half_vae, or train in fp32/bf16.")
        # Scaled so that accumulated gradients are a mean over the micro-batches (as accelerate does; DeepSpeed
        # scales it itself).
        accumulation = 1 if self.engine.scales_loss_for_accumulation else self.config.gradient_accumulation_steps
        self.engine.backward(loss / accumulation, last=last)
        return loss.item()

    def _check_gradients_are_finite(self, norm: torch.Tensor | None, step: int) -> None:
        """A finite loss can still give an inf/NaN gradient (a half-precision overflow in the backward pass); one
        optimizer step with it turns the weights into NaN, which the next loss shows only after the model was
        saved. Stop before the step instead, like a non-finite loss."""
        if norm is None:
            grads = [p.grad for p in self.trainable_parameters if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # sharded gradients (FSDP)
        if not torch.isfinite(norm):
            raise NonFiniteLossError(
                f"gradients became {norm.item()} at step {step + 1} (epoch {self.state.epoch}) although the loss "
                "was finite; stopping before the weights take them. The last saved model/state is intact. Lower "
                "the learning rate, or train without --full_bf16 / --full_fp16.")

    def _log(self, loss: float, bar) -> None:
        step = self.state.global_step
        self.loss_history.append((step, loss))
        recent = [l for _, l in self.loss_history[-50:]]
        lrs = self.lr_scheduler.get_last_lr()
        bar.set_postfix(loss=f"{loss:.4f}", avg=f"{sum(recent) / len(recent):.4f}", lr=f"{lrs[0]:.2e}")
        bar.update(1)
        record = {"step": step, "epoch": self.state.epoch, "loss": loss, "lr": lrs}
        record.update(self._extra_logs)
        if self.run_log:
            for name, value in self._extra_logs.items():
                self.run_log.add_scalar(name, value, step)
            self.run_log.add_scalar("loss/current", loss, step)
            self.run_log.add_scalar("loss/average", sum(recent) / len(recent), step)
            for i, lr in enumerate(lrs):
                name = self.lr_names[i] if self.lr_names and i < len(self.lr_names) else f"group{i}"
                self.run_log.add_scalar(f"lr/{name}", lr, step)
        if self.on_log:
            self.on_log(record)

    def _validate(self, kind: str, bar) -> None:
        """One validation pass, logged as kohya names it (`kind`: "step" or "epoch")."""
        loss = self.validator.loss(self._loss, self.accelerator, trainable=self.sample_trainable)
        recent = [l for _, l in self.loss_history[-50:]]
        divergence = loss - sum(recent) / len(recent) if recent else float("nan")
        step = self.state.global_step
        self.validation_history.append((step, kind, loss))
        bar.set_postfix_str(f"{bar.postfix}, val={loss:.4f}" if bar.postfix else f"val={loss:.4f}")
        logger.info("validation loss after %s %d: %.5f (%d batch(es) x %d timesteps; training average %+.5f)",
                    kind, step if kind == "step" else self.state.epoch - 1, loss, self.validator.total_batches,
                    len(self.validator.config.timesteps), divergence)
        if self.run_log:
            self.run_log.add_scalar(f"loss/validation/{kind}_average", loss, step)
            self.run_log.add_scalar(f"loss/validation/{kind}_divergence", divergence, step)

    def _sample(self, *, epoch: int | None) -> None:
        if self.sampler is None or not self.accelerator.is_main_process:
            return
        paths = self.sampler(epoch=epoch, step=self.state.global_step, run_log=self.run_log,
                             trainable=self.sample_trainable)
        logger.info("sample images: %s", ", ".join(p.name for p in paths))

    def _saved_epoch(self, *, final: bool = False) -> int:
        """The epoch a saved model records (ss_epoch, a ckpt's "epoch"), as kohya counts it: the epochs completed,
        so an epoch save says the number in its file name (`state.epoch` is the 1-based epoch in progress, already
        advanced past a finished one). The final save counts a last, partial epoch too (kohya: num_train_epochs)."""
        return self.state.epoch - 1 + (1 if final and self.state.batch_in_epoch > 0 else 0)

    def _save(self, stem: str, kind: str) -> None:
        if self.config.save_state:
            self.stage_state(self.config.output_dir / f"{stem}-state")
        with self._gathered_weights():
            if self.accelerator.is_main_process:
                self._write(stem, epoch=self._saved_epoch(), state=self.config.save_state)
                if self.hub is not None:
                    self.hub.wait()  # a background upload must not lose its file to the pruning below
                self._prune(kind)
        self.accelerator.wait_for_everyone()

    @contextlib.contextmanager
    def _gathered_weights(self):
        """Every process, around the main process's writing: an engine that shards the trained models (FSDP,
        ZeRO-3) gathers their full weights (collective), which the task then saves instead of its live (sharded)
        modules; one that holds them whole but computes with half-precision copies of fp32 master weights kept
        elsewhere (DeepSpeed bf16 / fp16) puts the masters into the trained parameters for the save."""
        if not self.engine.shards_models:
            with self.engine.master_weights_in_place():
                yield
            return
        self.task.gathered_weights = self.engine.gathered_weights()
        try:
            yield
        finally:
            self.task.gathered_weights = None

    def _write(self, stem: str, *, epoch: int, state: bool) -> None:
        """The model file (and the training state), each uploaded after it is written (--huggingface_repo_id)."""
        c = self.config
        path = self.task.save_model(c.output_dir / stem, epoch=epoch, global_step=self.state.global_step)
        if self.hub is not None:
            self.hub.model_saved(path)
        if state:
            self.save_state(c.output_dir / f"{stem}-state")
            if self.hub is not None:
                self.hub.state_saved(c.output_dir / f"{stem}-state")

    def _prune(self, kind: str) -> None:
        """kohya's retention: --save_last_n_epochs keeps the newest N epoch saves; --save_last_n_steps keeps the
        step saves made within the last N steps (a window, not a count). States follow their model files unless
        --save_last_n_epochs_state / --save_last_n_steps_state give them their own (e.g. many models, one state)."""
        import re

        c = self.config
        suffix = self.task.model_file_suffix()
        if kind == "step":
            pattern = re.compile(rf"^{re.escape(c.output_name)}-step(\d{{8}})$")  # matched against save stems
            keep_models, keep_states = c.save_last_n_steps, _first_given(c.save_last_n_steps_state,
                                                                         c.save_last_n_steps)
        else:
            pattern = re.compile(rf"^{re.escape(c.output_name)}-(\d{{6}})$")
            keep_models, keep_states = c.save_last_n_epochs or None, _first_given(c.save_last_n_epochs_state,
                                                                                  c.save_last_n_epochs or None)

        def doomed(numbers: list[int], keep: int | None) -> set[int]:
            if keep is None:
                return set()
            if kind == "step":  # 0: keep only the newest
                return {n for n in numbers if n < self.state.global_step - keep}
            return set(sorted(numbers)[:-keep]) if keep else set(numbers)

        models, states = {}, {}  # save number -> its stem (output_dir / "<name>-step00000004")
        for path in c.output_dir.iterdir():
            if path.name.endswith("-state"):
                if match := pattern.match(path.name[:-len("-state")]):
                    states[int(match.group(1))] = c.output_dir / match.group(0)
            elif path.name.endswith(suffix) and (match := pattern.match(path.name[:len(path.name) - len(suffix)])):
                models[int(match.group(1))] = c.output_dir / match.group(0)  # suffix "": a diffusers folder
        extra_paths = getattr(self.task, "model_paths", None)
        for number in doomed(list(models), keep_models):
            stem = models[number]
            for path in [stem.with_name(stem.name + suffix), *(extra_paths(stem) if extra_paths else [])]:
                _remove(path)
        for number in doomed(list(states), keep_states):
            _remove(states[number].with_name(states[number].name + "-state"))


def _first_given(*values):
    return next((v for v in values if v is not None), None)


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def latest_state(output_dir: Path) -> str | None:
    """The state folder with the highest step in `output_dir` (None: start fresh, as the diffusers example does)."""
    best = None
    for folder in output_dir.glob("*-state") if output_dir.is_dir() else []:
        try:
            step = json.loads((folder / STATE_FILE).read_text())["global_step"]
        except (OSError, ValueError, KeyError):
            continue
        if best is None or step > best[0]:
            best = (step, folder)
    if best is None:
        logger.info("--resume_from_checkpoint latest: no state in %s; starting a new run", output_dir)
        return None
    return str(best[1])
