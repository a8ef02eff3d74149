"""FSDP2 (torch.distributed.fsdp.fully_shard) for the full-model trainers (train_db, fine_tune, sdxl_train) and the
ControlNet trainers (train_controlnet, sdxl_train_control_net): parameters, gradients and optimizer state of the
trained models split over the processes, each holding about 1/N of them.

How a user asks for it: `accelerate launch --use_fsdp --fsdp_version 2 --num_processes N train_db.py ...` (or an
accelerate config file saying the same). The launcher only sets environment variables (ACCELERATE_USE_FSDP,
FSDP_VERSION, FSDP_RESHARD_AFTER_FORWARD, ...), which accelerate's FullyShardedDataParallelPlugin reads back.

What accelerate 1.15 does with them on a machine without an accelerator (measured): the Accelerator's state says
DistributedType.NO and *one* process in each of the N processes (each would train alone on its own share of the
data, saving the same files), and with `cpu=True` it is plain multi-process CPU (gloo) without FSDP. So the trainer
never leaves FSDP to accelerate: `make_accelerator` builds a gloo Accelerator on CPUs (`accelerator_kwargs`), and
this engine applies `fully_shard` itself, on CPUs and GPUs alike. There is a second reason: accelerate's own FSDP2
preparation wraps the module it is given (with its auto-wrap policy); the loop's module is `TrainedForward`, whose
parameters are shared with the models and whose forward calls them, so the blocks that should become shards are not
its children. Here the shards are the trained models' own blocks (the task's `trained_modules()`):

- U-Net: each down / mid / up block, then the root (conv_in, time embedding, conv_out);
- ControlNet: each down block and the mid block, then the root (conv_in, time / added embeddings, the
  conditioning-image encoder, the zero convolutions). The frozen U-Net it feeds stays whole on every process (it
  has no gradients or optimizer state to split, and FSDP would gather each of its blocks twice per step);
- CLIP text encoder (when trained): each transformer layer, the final layer norm (the conditioning calls it on its
  own for --clip_skip), then the root (embeddings).

`fully_shard` replaces every parameter of a sharded module by a new DTensor parameter holding this process's share;
the optimizer (built before, over the old parameters) is re-pointed at the new ones, and so are the loop's trained
parameters (clipping). Gradients are reduce-scattered (averaged) at the last micro-batch only
(`set_requires_gradient_sync(False)` on the others), the loss divided by the accumulation steps by the loop as for
DDP; torch.nn.utils.clip_grad_norm_ takes the DTensor gradients and returns the global norm.

Saving: every process gathers the full weights (`get_model_state_dict(full_state_dict=True, cpu_offload=True)`,
collective; only the main process keeps them), then the main process writes the model in any layout and the
training state's `trainable.pt` from them (the same file as without FSDP: {"models": {name: state dict}}). The
optimizer state stays sharded: torch.distributed.checkpoint writes each process's share beside the state folder
(`fsdp_optimizer/`), which the main process moves in. A resume loads `trainable.pt` into the shards
(`set_model_state_dict(full_state_dict=True)`) and each process its optimizer share: exact, with the same number of
processes.

Mixed precision (`mixed_precision_policy`): --mixed_precision bf16 is FSDP's MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32) under the loop's autocast; with --full_bf16 the shards and the optimizer state are bf16 as
without FSDP, the gradients still averaged in fp32.

Not yet (refused by name in `check_fsdp_flags`): --mixed_precision fp16 and --full_fp16, --use_ema,
--pivotal_token, fused optimizer steps, sampling and validation during training (--sample_prompts,
--validation_image, --validation_split: they run the model on the main process alone; FSDP needs every process for
each forward), LoRA-type trainers (their tasks name no trained models to shard: refused when the engine prepares),
FSDP1. Tested (tests/test_fsdp.py): train_db (also bf16 and --full_bf16), fine_tune, sdxl_train (both text encoders),
train_controlnet and sdxl_train_control_net.

Why fp16 is still refused (measured with accelerate 1.15, torch 2.13, on CPU): every trainer refuses fp16 on CPU,
because accelerate makes neither a GradScaler nor fp16 autocast there (`Accelerator(cpu=True,
mixed_precision="fp16")`: scaler None, autocast output fp32), so no fp16 run, with or without FSDP, exists on this
machine kind to compare 2 processes with. The loss scaling itself would need no ShardedGradScaler: torch's
GradScaler unscales the DTensor gradients and max-reduces its inf flag over the mesh (DTensor's handler of
`_amp_foreach_non_finite_check_and_unscale_`). In 2 gloo processes with an inf placed in one element of process 1's
shard only, both processes skipped that step and followed the 1-process scaler's schedule (1024, 512, 512, 1024,
1024, 2048 with growth_interval 2), ending within 1.5e-8 of its weights. Left to do on a CUDA machine: unscale before
`clip_grad_norm` (accelerator.unscale_gradients; the clipping here sees scaled gradients), then compare 2 processes
with 1 in fp16 and lift the refusal.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from library.data_parallel import written_by_every_process

logger = logging.getLogger(__name__)

STATE_SUBFOLDER = "fsdp_optimizer"  # torch.distributed.checkpoint of the optimizer's shards, in a state folder


@dataclass(frozen=True)
class FSDPSettings:
    """accelerate's FSDP plugin settings this engine uses (from `accelerate launch --use_fsdp ...`)."""

    version: int = 2
    reshard_after_forward: bool = True  # FULL_SHARD (True) / SHARD_GRAD_OP (False): parameters freed after forward
    offload_params: bool = False  # FSDP_OFFLOAD_PARAMS: CPUOffloadPolicy


def fsdp_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def settings_from_environment() -> FSDPSettings:
    """What `accelerate launch --use_fsdp --fsdp_version 2 ...` (or its config file) asked for, as accelerate's
    FullyShardedDataParallelPlugin reads it from the environment."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    version = int(os.environ.get("FSDP_VERSION", "1"))  # accelerate's default is FSDP1
    if version != 2:
        return FSDPSettings(version=version)
    plugin = FullyShardedDataParallelPlugin()
    offload = os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true"
    return FSDPSettings(version=2, reshard_after_forward=bool(plugin.reshard_after_forward), offload_params=offload)


def check_fsdp_flags(settings: FSDPSettings, args) -> list[str]:
    """The problems of an FSDP run with these trainer flags (each naming its flag)."""
    problems = []
    if settings.version != 2:
        problems.append(f"accelerate launch --use_fsdp with --fsdp_version {settings.version}: only FSDP2 is "
                        "supported (FSDP1 refuses a machine without an accelerator); add --fsdp_version 2")
    refused = [("--deepspeed", "DeepSpeed and FSDP are two engines; use one"),
               ("--use_ema", "the EMA copy is not sharded yet"),
               ("--pivotal_token", "a word trained with the model is not sharded yet"),
               ("--fused_backward_pass", "the optimizer steps after the gradients are reduce-scattered"),
               ("--fused_optimizer_groups", "the optimizer steps after the gradients are reduce-scattered"),
               ("--full_fp16", "fp16 trained weights are not sharded yet (--full_bf16 is)"),
               ("--sample_prompts", "sampling runs the model on the main process alone, and a sharded model needs "
                                    "every process for each forward"),
               ("--validation_split", "the validation loss is not computed over a sharded model yet"),
               ("--validation_image", "ControlNet validation images run the pipeline on the main process alone, "
                                      "and a sharded ControlNet needs every process for each forward"),
               ("--network_module", "FSDP shards full models (train_db, fine_tune, sdxl_train, the ControlNet "
                                    "trainers); LoRA trainers use DDP")]
    for flag, why in refused:
        if getattr(args, flag[2:], None):
            problems.append(f"{flag} with FSDP (accelerate launch --use_fsdp): {why}")
    if getattr(args, "mixed_precision", "no") == "fp16":
        problems.append("--mixed_precision fp16 with FSDP: not supported yet (fp16 needs a CUDA GPU: on CPU accelerate "
                        "makes no GradScaler and no fp16 autocast; FSDP's loss scaling over the shards has not been "
                        "run on a GPU); use --mixed_precision bf16 (optionally --full_bf16) or no")
    return problems


def accelerator_kwargs() -> dict:
    """The Accelerator's arguments for an FSDP run: on a machine without CUDA accelerate would count one process per
    process (see the module docstring), so it is told to run on CPUs (gloo, N processes)."""
    return {"cpu": not torch.cuda.is_available()}


def shard_units(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The sub-modules that become their own shards, before the root: a U-Net's or ControlNet's blocks, a CLIP text
    encoder's layers and final layer norm."""
    if hasattr(module, "down_blocks") and hasattr(module, "mid_block"):  # diffusers U-Net, ControlNet (no up blocks)
        return [*module.down_blocks, *([module.mid_block] if module.mid_block is not None else []),
                *getattr(module, "up_blocks", [])]
    text_model = getattr(module, "text_model", module)  # transformers 4.x / CLIPTextModelWithProjection
    encoder = getattr(text_model, "encoder", None)
    if encoder is not None and hasattr(encoder, "layers"):
        return [*encoder.layers, text_model.final_layer_norm]
    return []


def mixed_precision_policy(mixed_precision: str):
    """FSDP's policy for --mixed_precision: bf16 gathers the weights in bf16 for the forward and backward (what
    autocast would round them to for matmuls and convolutions; autocast still runs) and reduces the gradients in
    fp32; the shards and the optimizer keep fp32 weights, as the trained weights are fp32 without FSDP. With
    --full_bf16 the trained models are bf16 before they are sharded: the shards, the gathered weights and the
    optimizer state are bf16 as without FSDP, the same policy gathers them uncast (its param_dtype is theirs), and
    the gradients (computed in bf16) are averaged in fp32, then rounded to bf16 for the shards once."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mixed_precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def keep_output_capture(module: torch.nn.Module, original_class: type) -> None:
    """fully_shard gives a sharded module a new class (FSDP<Class>, a subclass). transformers 5 looks up which
    layers' outputs a model records (`output_hidden_states`, used for --clip_skip) by the model's class name, so the
    sharded CLIP text encoder would return no hidden states; register the new class under the original's entry."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # transformers 4.x returns hidden states without a registry
        return
    entry = dict.get(_CAN_RECORD_REGISTRY, str(original_class))
    if entry is not None and type(module) is not original_class:
        dict.__setitem__(_CAN_RECORD_REGISTRY, str(type(module)), entry)


def local_numel(parameters) -> int:
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in parameters)


class FSDPTrainingEngine:
    """The loop's view of an FSDP2 run: shard the trained models, re-point the optimizer, reduce at the last
    micro-batch, clip over DTensors, gather the full weights for saving, keep the optimizer state sharded."""

    steps_in_backward = False
    scales_loss_for_accumulation = False  # the loop divides each micro-batch's loss by the accumulation steps
    shards_models = True  # prepare needs the trained models; saves gather them

    def __init__(self, accelerator, settings: FSDPSettings | None = None):
        self.accelerator = accelerator
        self.settings = settings or settings_from_environment()
        self.modules: dict[str, torch.nn.Module] = {}  # name (e.g. "unet", "text_encoder") -> sharded root
        self.container: torch.nn.ModuleDict | None = None
        self._new_parameter: dict[int, torch.nn.Parameter] = {}
        self.optimizer = None

    def prepare(self, module, optimizer, *, unused, modules: dict[str, torch.nn.Module] | None = None):
        del unused  # FSDP2 reduces the gradients there are; a parameter without one keeps none
        if not modules:
            raise ValueError("FSDP (accelerate launch --use_fsdp) shards full models (train_db, fine_tune, "
                             "sdxl_train, the ControlNet trainers): this trainer names no trained models; launch it "
                             "without --use_fsdp")
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        device_type = self.accelerator.device.type
        mesh = init_device_mesh(device_type, (torch.distributed.get_world_size(),))
        options = {"mesh": mesh, "reshard_after_forward": self.settings.reshard_after_forward,
                   "offload_policy": CPUOffloadPolicy() if self.settings.offload_params else OffloadPolicy(),
                   "mp_policy": mixed_precision_policy(self.accelerator.mixed_precision)}
        before = {name: dict(m.named_parameters()) for name, m in modules.items()}
        for m in modules.values():
            original_class = type(m)
            for unit in shard_units(m):
                fully_shard(unit, **options)
            fully_shard(m, **options)
            keep_output_capture(m, original_class)
        for name, m in modules.items():
            after = dict(m.named_parameters())
            self._new_parameter.update({id(p): after[fqn] for fqn, p in before[name].items()})
        for group in optimizer.param_groups:
            group["params"] = self.trained_parameters(group["params"])
        self.modules = dict(modules)
        self.optimizer = optimizer
        self.container = torch.nn.ModuleDict(self.modules)
        held = local_numel(self.container.parameters())
        total = sum(p.numel() for p in self.container.parameters())
        logger.info("FSDP: process %d holds %d of the %d trained model values (%s)", self.accelerator.process_index,
                    held, total, ", ".join(self.modules))
        # The step's computation, without the TrainedForward module: its parameter list would keep the unsharded
        # weights alive.
        return module._forward, optimizer

    def trained_parameters(self, parameters: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
        """`parameters` as they are after sharding (the same order)."""
        return [self._new_parameter.get(id(p), p) for p in parameters]

    @contextlib.contextmanager
    def micro_batch(self, model, *, last: bool):
        del model
        # Gradients are reduce-scattered once per optimizer step, in the last micro-batch's backward; the others
        # accumulate the unsharded gradients.
        for m in self.modules.values():
            m.set_requires_gradient_sync(last)
        yield

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        del last
        self.accelerator.backward(loss)

    def clip_grad_norm(self, parameters, max_norm: float) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    # Saving: the full weights gathered on every process, kept by the main one.

    def gathered_weights(self) -> dict[str, dict[str, torch.Tensor]] | None:
        """Every process (collective): the trained models' full state dicts on the CPU, on the main process; None on
        the others."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = {name: get_model_state_dict(m, options=options) for name, m in self.modules.items()}
        return weights if self.accelerator.is_main_process else None

    def load_trained_weights(self, task, state: dict) -> None:
        """Resume: the full weights of `trainable.pt` (read by every process) into each process's shards."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        for name, m in self.modules.items():
            set_model_state_dict(m, state["models"][name], options=StateDictOptions(full_state_dict=True))
        del task

    # State: the optimizer's shards (torch.distributed.checkpoint, one file per process).

    def _optimizer(self, optimizer):
        return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps torch's

    def optimizer_state_files(self) -> tuple[str, ...]:
        return (STATE_SUBFOLDER,)

    def stage_optimizer_state(self, staging: Path) -> None:
        """Every process: write its share of the optimizer state into `staging` (collective); the main process then
        moves it into the atomically written state folder (`adopt_optimizer_state`)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        with written_by_every_process(self.accelerator, staging):
            state = get_optimizer_state_dict(self.container, self._optimizer(self.optimizer))
            dcp.save({"optimizer": state}, checkpoint_id=str(staging))

    def adopt_optimizer_state(self, staging: Path | None, folder: Path, optimizer) -> None:
        del optimizer
        os.replace(staging, folder / STATE_SUBFOLDER)

    def finish(self) -> None:
        """After the run: nothing (the process group is left to the interpreter's exit, as with DDP)."""

    def load_optimizer_state(self, folder: Path, optimizer) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        inner = self._optimizer(optimizer)
        path = str(folder / STATE_SUBFOLDER)
        # Parameters that never had a gradient (a layer --clip_skip leaves unused, a text encoder stopped before the
        # first step) have no optimizer state in the checkpoint. get_optimizer_state_dict makes one for every
        # parameter (a step with zero gradients and lr 0); those are left out of the load and dropped after it, so
        # the optimizer's state is what the saving run's was.
        prefix = "optimizer.state."
        saved = {key[len(prefix):].rsplit(".", 1)[0]
                 for key in FileSystemReader(path).read_metadata().state_dict_metadata if key.startswith(prefix)}
        state = get_optimizer_state_dict(self.container, inner)
        without = [fqn for fqn in state["state"] if fqn not in saved]
        for fqn in without:
            del state["state"][fqn]
        loaded = {"optimizer": state}
        dcp.load(loaded, checkpoint_id=path)
        set_optimizer_state_dict(self.container, inner, loaded["optimizer"],
                                 options=StateDictOptions(strict=not without))
        parameters = dict(self.container.named_parameters())
        for fqn in without:
            inner.state.pop(parameters[fqn], None)
