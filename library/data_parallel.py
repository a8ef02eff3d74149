"""Data-parallel training (several processes, `accelerate launch --num_processes N`) through accelerate's DDP.

Every process runs the same step on its share of the global batch (train_dataset.EpochBatches); PyTorch's
DistributedDataParallel averages the gradients, bucket by bucket while the backward pass is still running, so the
communication overlaps the computation instead of following it.

DDP only reduces the parameters of the module whose forward it runs, and only when that forward runs through it:
its reducer's gradient hooks fire for a backward pass prepared by the wrapper's forward. A LoRA network is applied by
patching the base models' forwards and is never called itself (networks/lora.py), and a trained text encoder,
ControlNet or token embedding is called from the loop, not by one model. So what DDP wraps is `TrainedForward`: a
module whose forward is the step's whole model computation (captions -> text encoders -> U-Net, or U-Net +
ControlNet) and whose registered parameters are exactly the trained ones, shared with the models (the same
`Parameter` objects: the optimizer, saving and resume see the averaged gradients and the updated weights as
before). kohya wraps the network and then averages its gradients by hand after backward (train_network.py
`all_reduce_network`); the diffusers examples wrap the U-Net whose PEFT adapters are submodules. This is the
second shape for every trainer here.

kohya's flags --ddp_timeout (minutes), --ddp_gradient_as_bucket_view and --ddp_static_graph (train_args.py) become
`DDPSettings`, then accelerate's InitProcessGroupKwargs / DistributedDataParallelKwargs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DDPSettings:
    timeout_minutes: int | None = None  # --ddp_timeout: collective-operation timeout (None: torch's default)
    gradient_as_bucket_view: bool = False  # --ddp_gradient_as_bucket_view: gradients live in DDP's buckets
    static_graph: bool = False  # --ddp_static_graph: the same parameters get gradients in every step


def check_ddp_flags(settings: DDPSettings, *, gradient_accumulation_steps: int) -> list[str]:
    """The problems of these flags (each naming its flag), for the trainers' flag check."""
    problems = []
    if settings.timeout_minutes is not None and settings.timeout_minutes < 1:
        problems.append(f"--ddp_timeout {settings.timeout_minutes}: give the minutes to wait, at least 1")
    if settings.static_graph and gradient_accumulation_steps > 1:
        # torch's reducer fails an internal assertion ("expect_autograd_hooks_") when a static-graph DDP
        # accumulates micro-batches under no_sync (torch 2.13, measured).
        problems.append(f"--ddp_static_graph does not work with --gradient_accumulation_steps "
                        f"{gradient_accumulation_steps}: torch's static-graph DDP fails when gradients accumulate "
                        "without being averaged (no_sync); drop one of them")
    return problems


def kwargs_handlers(settings: DDPSettings) -> list:
    """accelerate's handlers for these settings (its defaults where a flag is not given)."""
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    handlers = [DistributedDataParallelKwargs(gradient_as_bucket_view=settings.gradient_as_bucket_view,
                                              static_graph=settings.static_graph)]
    if settings.timeout_minutes is not None:
        handlers.append(InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=settings.timeout_minutes)))
    return handlers


class TrainedForward(torch.nn.Module):
    """The module DDP wraps: `forward` is the step's model computation, the registered parameters are the trained
    ones (shared, not copied). Nothing else is registered, so DDP's start-up broadcast and its buckets cover exactly
    the trained weights and gradients, never a frozen base model."""

    def __init__(self, parameters: list[torch.nn.Parameter], forward: Callable[..., torch.Tensor]):
        super().__init__()
        unique = list({id(p): p for p in parameters}.values())  # a parameter listed twice is reduced once
        self.trained = torch.nn.ParameterList(unique)
        self._forward = forward

    def forward(self, *args, **kwargs):
        return self._forward(*args, **kwargs)


@dataclass(frozen=True)
class UnusedParameters:
    """Trained parameters that can get no gradient in a step, and why (a TrainingTask's `unused_parameters`)."""

    reason: str  # what leaves them out, naming the flag where one does
    same_every_step: bool  # True: a fixed set (found once by --ddp_static_graph); False: it changes between steps
    # False: drawn per process (module dropout, DyLoRA's rank unit), so the processes' sets differ in one step;
    # DeepSpeed's ZeRO reduction cannot take that (its collectives would not match).
    same_on_every_process: bool = True


def prepare_trained_forward(accelerator, module: TrainedForward, *, unused: list[UnusedParameters]):
    """`module` prepared by accelerate: DDP-wrapped when several processes train (and, with mixed precision, its
    forward under autocast). `unused`: why some trained parameters can get no gradient in a step. DDP must then look
    for them after each forward (find_unused_parameters), or its reducer waits for their gradients forever; with
    --ddp_static_graph it finds them in the first step instead, which holds only if they are the same every step."""
    from accelerate.utils import DistributedDataParallelKwargs

    handler = accelerator.ddp_handler or DistributedDataParallelKwargs()
    if unused and accelerator.num_processes > 1:
        changing = [u.reason for u in unused if not u.same_every_step]
        if handler.static_graph and changing:
            raise ValueError(f"--ddp_static_graph: the parameters that get gradients change between steps "
                             f"({'; '.join(changing)}); drop --ddp_static_graph")
        if not handler.static_graph:
            logger.info("DDP looks for trained parameters without gradients after each forward "
                        "(find_unused_parameters): %s", "; ".join(u.reason for u in unused))
    # accelerate takes DDP's options when the Accelerator is made, before the trained parameters exist; this one
    # is known only now, and accelerate reads its handler when it wraps a model.
    accelerator.ddp_handler = dataclasses.replace(handler, find_unused_parameters=bool(unused)
                                                  and not handler.static_graph)
    return accelerator.prepare_model(module, device_placement=False)


@contextlib.contextmanager
def written_by_every_process(accelerator, staging: Path):
    """Around every process writing its share of a sharded training state into `staging` (collective; DeepSpeed's
    and FSDP's engines): what an interrupted save left there goes first, and no process leaves before all have
    written, so the main process can then move the whole folder into the state folder."""
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    yield
    accelerator.wait_for_everyone()


class DataParallelEngine:
    """The loop's view of one process or accelerate's DDP: the optimizer was prepared by accelerate on its own
    (training_setup.build_optimization); DDP averages gradients in the last micro-batch's backward (the others run
    under `no_sync`); the loop clips and steps. The other engine with this interface is
    deepspeed_engine.DeepSpeedTrainingEngine."""

    steps_in_backward = False
    scales_loss_for_accumulation = False  # the loop divides each micro-batch's loss by the accumulation steps
    shards_models = False  # every process holds the whole trained models (FSDP's engine: only its shards)

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def prepare(self, module: TrainedForward, optimizer, *, unused: list[UnusedParameters], modules=None):
        del modules  # what a sharding engine would shard
        return prepare_trained_forward(self.accelerator, module, unused=unused), optimizer

    def trained_parameters(self, parameters: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
        return parameters  # unchanged by `prepare`

    def gathered_weights(self):
        return None  # nothing to gather: the task saves its modules

    def master_weights_in_place(self):
        # The trained parameters are the optimizer's own weights: nothing to put in for a save. (An engine that
        # holds whole models provides this; one that shards them, `gathered_weights`.)
        return contextlib.nullcontext()

    def load_trained_weights(self, task, state: dict) -> None:
        task.load_trainable_state(state)

    def micro_batch(self, model, *, last: bool):
        # DDP averages the gradients once per optimizer step, in the last micro-batch's backward pass; the others
        # only accumulate (no_sync: no communication).
        return contextlib.nullcontext() if last else self.accelerator.no_sync(model)

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        del last
        self.accelerator.backward(loss)

    def clip_grad_norm(self, parameters, max_norm: float) -> torch.Tensor:
        return self.accelerator.clip_grad_norm_(parameters, max_norm)

    # State: the optimizer's whole state, written by the main process.

    def optimizer_state_files(self) -> tuple[str, ...]:
        return ("optimizer.pt",)

    def stage_optimizer_state(self, staging: Path) -> None:
        del staging  # every process holds the whole state; the main process writes it in `adopt_optimizer_state`

    def adopt_optimizer_state(self, staging: Path | None, folder: Path, optimizer) -> None:
        del staging
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")

    def load_optimizer_state(self, folder: Path, optimizer) -> None:
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))

    def finish(self) -> None:
        """After the run (the DeepSpeed engine ends its process group here; DDP's is left to the interpreter's exit,
        as the test probes that run several trainings in one process need)."""


def training_engine(accelerator):
    """The engine for this accelerator: DeepSpeed's when the run uses it (--deepspeed), FSDP2's when accelerate was
    launched with --use_fsdp (library/fsdp_engine.py), else DDP's / one process."""
    from accelerate.utils import DistributedType

    from library.fsdp_engine import FSDPTrainingEngine, fsdp_requested

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        from library.deepspeed_engine import DeepSpeedTrainingEngine

        return DeepSpeedTrainingEngine(accelerator)
    if fsdp_requested():  # never DDP instead: accelerate on CPUs would not shard (fsdp_engine.py)
        return FSDPTrainingEngine(accelerator)
    return DataParallelEngine(accelerator)
