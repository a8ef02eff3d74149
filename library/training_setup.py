"""The setup steps every training recipe shares, from parsed arguments to a running `Trainer`.

A recipe (train_network.py, train_db.py, fine_tune.py, train_controlnet.py, train_textual_inversion.py) reads top
to bottom: `begin_run` -> `read_base_model` / `make_accelerator` / `load_models` -> `build_dataset` ->
`cache_latents` -> (its own trainable parameters and task) -> `build_optimization` -> `loop_config` /
`make_sampler` -> `run_trainer`. Each step turns kohya-named arguments into typed pieces and turns
the errors users can fix into one `error: ...` line (SystemExit), before any long work where possible.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from library import train_args
from library.dataset_config import DatasetConfigError, build_training_dataset
from library.dataset_sources import ConditioningUse, DatasetError
from library.extra_inputs import MaskSettings, condition_images_for
from library.families import INPAINTING, TEXT_TO_IMAGE, UNetInputs
from library.cache_split import ProcessShare
from library.images import ImageError
from library.latent_cache import CacheSettings, LatentCache
from library.model_loading import SDModels, instantiate_models, replace_vae
from library.optimizers import OptimizerConfig, build_optimizer, build_scheduler, optimizer_class
from library.precision import Precision, check_device_supports, precision_policy
from library.sd_checkpoint import SD_ARCHS, FamilyHints, SDCheckpoint, read_checkpoint, require_arch
from library.tensor_files import CheckpointError
from library.text_conditioning import CaptionEncoding, TextConditioner, conditioner_for
from library.train_dataset import EpochBatches, TrainingDataset
from library.training_loop import LoopConfig, Trainer

logger = logging.getLogger(__name__)

SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class RunStart:
    seed: int
    output_dir: Path
    output_name: str
    optimizer: OptimizerConfig


def begin_run(args: argparse.Namespace, *, control_images: bool = False) -> RunStart:
    """Checks that need no model (so a typo fails in a second, not after model loading), the seed, the output."""
    train_args.check_training_flags(args, control_images=control_images)
    opt_config = train_args.optimizer_config(args)
    try:
        optimizer_class(opt_config.optimizer_type)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    seed = args.seed if args.seed is not None else random.randint(0, 2 ** 31 - 1)
    logger.info("seed %d", seed)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    return RunStart(seed=seed, output_dir=output_dir, output_name=args.output_name or "last", optimizer=opt_config)


@dataclass(frozen=True)
class TrainedArchs:
    """Which model architectures a training script trains (`ModelFamily.arch`), and which script trains the others.
    kohya splits its scripts the same way: train_network.py for SD 1.x / 2.x, sdxl_train_network.py for SDXL."""

    script: str
    archs: tuple[str, ...] = SD_ARCHS
    elsewhere: tuple[tuple[str, str], ...] = ()  # (arch, the script that trains it)
    inputs: tuple[UNetInputs, ...] = (TEXT_TO_IMAGE,)  # the U-Net inputs it feeds (families.ALL_UNET_INPUTS)


def read_base_model(args: argparse.Namespace, trains: TrainedArchs) -> SDCheckpoint:
    """The base model (`--pretrained_model_name_or_path`, `--vae`), family checked against `--v2` etc. and against
    what the script trains."""
    try:
        checkpoint = open_base_model(args, trains)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    logger.info("%s", checkpoint.family.description)
    return checkpoint


def open_base_model(args: argparse.Namespace, trains: TrainedArchs | None = None) -> SDCheckpoint:
    """The base model's files opened (lazily), as `read_base_model` does; raises CheckpointError. Also used to read
    untrained components again when a trained model is saved (`trains` None: the file was checked already)."""
    hints = FamilyHints(v2=True if args.v2 else None, v_parameterization=args.v_parameterization)
    checkpoint = read_checkpoint(args.pretrained_model_name_or_path, hints,
                                 allow_unsafe_pickle=args.allow_unsafe_pickle)
    if trains is not None:
        require_arch(checkpoint, trains.script, trains.archs, elsewhere=dict(trains.elsewhere), inputs=trains.inputs)
    try:
        if args.vae:
            replace_vae(checkpoint, args.vae, allow_unsafe_pickle=args.allow_unsafe_pickle)
    except CheckpointError:
        checkpoint.close()
        raise
    return checkpoint


def make_accelerator(args: argparse.Namespace):
    from accelerate import Accelerator

    from library.compilation import accelerate_launch_backend
    from library.data_parallel import kwargs_handlers
    from library.fsdp_engine import accelerator_kwargs as fsdp_accelerator_kwargs
    from library.fsdp_engine import check_fsdp_flags, fsdp_requested, settings_from_environment

    plugin = None
    deepspeed = train_args.deepspeed_settings(args)
    if deepspeed is None and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise SystemExit("error: accelerate launch is set up for DeepSpeed (--use_deepspeed or its config file) but "
                         "the trainer was not given --deepspeed: add --deepspeed (with kohya's --zero_stage / "
                         "--offload_optimizer_device flags: the trainer builds DeepSpeed's configuration from them), "
                         "or launch without DeepSpeed")
    extra = {}
    if fsdp_requested():
        settings = settings_from_environment()
        problems = check_fsdp_flags(settings, args)
        if problems:
            raise SystemExit("error: " + "\n  ".join(problems))
        extra = fsdp_accelerator_kwargs()  # on CPUs: gloo processes, sharded by the engine (fsdp_engine.py)
    if deepspeed is not None:
        from library.deepspeed_engine import deepspeed_plugin, start_process_group, world_size_from_environment

        start_process_group()
        plugin = deepspeed_plugin(deepspeed, batch_size=args.train_batch_size,
                                  gradient_accumulation_steps=args.gradient_accumulation_steps,
                                  num_processes=world_size_from_environment(),
                                  max_grad_norm=args.max_grad_norm, mixed_precision=args.mixed_precision)
    launch_backend = accelerate_launch_backend()
    if launch_backend and not getattr(args, "torch_compile", False):
        logger.warning("accelerate launch --dynamo_backend %s (or accelerate's config) is not used: as in kohya's "
                       "scripts, models are compiled only with --torch_compile (add --torch_compile --dynamo_backend "
                       "%s)", launch_backend, launch_backend)
    try:
        # accelerate never compiles here: what it prepares wraps the whole step; the models themselves are compiled
        # in load_models (library/compilation.py).
        accelerator = Accelerator(mixed_precision=args.mixed_precision, deepspeed_plugin=plugin, dynamo_backend="no",
                                  kwargs_handlers=kwargs_handlers(train_args.ddp_settings(args)), **extra)
        check_device_supports(args.mixed_precision, accelerator.device)
        if deepspeed is not None:
            from library.deepspeed_engine import models_built_whole

            models_built_whole()
    except ValueError as e:
        raise SystemExit(f"error: --mixed_precision {args.mixed_precision}: {e}") from None
    check_every_process_started(accelerator.num_processes, os.environ)
    return accelerator


def same_seed_everywhere(start: RunStart, accelerator) -> RunStart:
    """The main process's seed on every process. Without --seed each process draws its own, but the processes train
    one run: they share out the global batches of one seeded data order, and a sample's noise comes from the seed
    and its slot."""
    if accelerator.num_processes == 1:
        return start
    from accelerate.utils import broadcast_object_list

    seed = broadcast_object_list([start.seed], from_process=0)[0]
    if seed != start.seed:
        logger.info("seed %d (the main process's)", seed)
    return replace(start, seed=seed)


def check_every_process_started(num_processes: int, environ) -> None:
    """Refuse the launch that asked for several processes and started one: `accelerate launch --cpu` with
    --num_processes or --num_machines above 1 starts several CPU processes only through mpirun (--mpirun_hostfile);
    otherwise it starts one on each machine, with the main process's address (MASTER_ADDR) but no rank, and each
    would train alone as the main process, all writing the outputs."""
    if num_processes == 1 and "MASTER_ADDR" in environ and "WORLD_SIZE" not in environ \
            and environ.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1"):
        raise SystemExit("error: accelerate launch --cpu was asked for several processes (--num_processes or "
                         "--num_machines above 1) but started this one alone: without mpirun (--mpirun_hostfile) "
                         "accelerate starts one CPU process per machine, each working alone as the main process. Launch with "
                         "`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu ...` instead (see the README, "
                         "\"Training on several machines\"), or, for one process, unset MASTER_ADDR")


def load_models(args: argparse.Namespace, checkpoint: SDCheckpoint, accelerator, *,
                components: tuple[str, ...] | None = None) -> tuple[SDModels, Precision]:
    """The models on the accelerator's device in the precision policy's dtypes, frozen (a recipe unfreezes what
    it trains), with gradient checkpointing on the U-Net if asked. `components`: only these are loaded (the
    cache tools need the VAE or the text encoders, not an SDXL U-Net's 10 GB); the others are None."""
    precision = precision_policy(args.mixed_precision, full_fp16=args.full_fp16, full_bf16=args.full_bf16,
                                 no_half_vae=args.no_half_vae)
    with checkpoint:
        models = instantiate_models(checkpoint, dtype=precision.weight_dtype,
                                    component_dtypes={"vae": precision.vae_dtype}, components=components)
    for model in (models.unet, models.vae, *models.text_encoders):
        if model is not None:
            model.to(accelerator.device).requires_grad_(False)
    if args.gradient_checkpointing and models.unet is not None:
        models.unet.enable_gradient_checkpointing()
        models.unet.train()  # diffusers only checkpoints in training mode; dropout is 0 in SD's UNet
    compile_models(args, models, tool=components is not None)
    return models, precision


def compile_settings(args: argparse.Namespace):
    """--torch_compile / --dynamo_backend as library.compilation.CompileSettings, or None without --torch_compile."""
    from library.compilation import CompileSettings

    return CompileSettings.from_flags(getattr(args, "torch_compile", False), getattr(args, "dynamo_backend", None))


def compile_models(args: argparse.Namespace, models: SDModels, *, tool: bool) -> None:
    """--torch_compile: the models a run calls each step, compiled in place (traced at their first call). A trainer's
    U-Net and text encoders; a cache tool (`tool`) the ones it loaded: the VAE's encoder (what caching runs), or the
    text encoders."""
    settings = compile_settings(args)
    if settings is None:
        return
    if models.unet is not None:
        settings.apply(models.unet, what="U-Net")
    for i, encoder in enumerate(models.text_encoders):
        if encoder is not None:
            settings.apply(encoder, what=f"text encoder {i + 1}")
    if tool and models.vae is not None:
        settings.apply(models.vae.encoder, what="VAE encoder")


def add_embeddings(args: argparse.Namespace, models: SDModels, precision: Precision):
    """--textual_inversion_embeddings (frozen words) and --pivotal_token (a word trained in this run). Returns the
    added tokens (for caption and prompt expansion) and the pivotal embedding, if any."""
    from library import textual_inversion as ti

    try:
        tokens = ti.load_embeddings(models, args.textual_inversion_embeddings or [])
        pivot = None
        if args.pivotal_token:
            # The word in every text encoder (SDXL: vectors in CLIP ViT-L and in OpenCLIP bigG).
            pivot = ti.add_pivotal_token(models, token_string=args.pivotal_token, init_word=args.pivotal_init_word,
                                         num_vectors=args.pivotal_num_vectors, train_steps=args.pivotal_steps,
                                         dtype=torch.float32 if not precision.full_half else precision.trained_dtype)
            tokens.append(pivot.new_tokens)
    except ValueError as e:  # EmbeddingFileError, a colliding token, a too-long init word
        raise SystemExit(f"error: {e}") from None
    return tokens, pivot


def check_pivotal_token(args: argparse.Namespace, dataset: TrainingDataset) -> None:
    """--pivotal_token in no caption would train nothing (the word never reaches the text encoder): an error, as
    train_textual_inversion.py's --token_string."""
    from library.textual_inversion import check_token_in_captions

    if args.pivotal_token:
        try:
            check_token_in_captions((item.record for item in dataset.items), args.pivotal_token,
                                    flag="--pivotal_token")
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None


# ----------------------------------------------------------------------------------------------------------
# Data


def build_dataset(args: argparse.Namespace, family, seed: int, *, extra_options: dict | None = None,
                  conditioning_use: ConditioningUse = ConditioningUse.LOSS_MASK,
                  unet_in_channels: int | None = None) -> tuple[TrainingDataset, dict]:
    """The dataset of the data flags / --dataset_config; `extra_options`: recipe-specific subset options (e.g. a
    ControlNet metadata column), under their dataset-config names. For a model with extra U-Net inputs (inpainting,
    depth, extra channels; `unet_in_channels`: its U-Net's input width) the conditioning images are those inputs."""
    cli = train_args.dataset_cli_values(args, family.default_resolution)
    cli.update(extra_options or {})
    try:
        condition = condition_images_for(family.unet_inputs, unet_in_channels or family.unet_inputs.new_model_channels,
                                         mask_settings(args))
        check_condition_flags(args, family, condition, conditioning_use)
        return build_training_dataset(cli, Path(args.dataset_config) if args.dataset_config else None,
                                      family_step=family.bucket_reso_step, seed=seed,
                                      prior_loss_weight=args.prior_loss_weight, max_train_steps=args.max_train_steps,
                                      conditioning_use=conditioning_use, condition=condition)
    except (DatasetError, DatasetConfigError, ImageError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


def mask_settings(args: argparse.Namespace) -> MaskSettings:
    """The synthetic inpainting masks of the --inpaint_* flags (defaults where a trainer lacks them)."""
    defaults = MaskSettings()
    size = getattr(args, "inpaint_mask_size", None) or (defaults.min_size, defaults.max_size)
    return MaskSettings(full_mask_prob=getattr(args, "inpaint_full_mask_prob", defaults.full_mask_prob),
                        max_shapes=getattr(args, "inpaint_mask_max_shapes", defaults.max_shapes),
                        min_size=size[0], max_size=size[1])


def check_condition_flags(args: argparse.Namespace, family, condition,
                          conditioning_use: ConditioningUse = ConditioningUse.LOSS_MASK) -> None:
    """The flags that only mean something for some U-Net inputs, checked once the model's are known: the
    --inpaint_* flags need an inpainting model; --conditioning_data_dir is --masked_loss's mask folder on a
    text-to-image model and the model's own input (masks, depth maps, conditions) on the others (the ControlNet
    trainers read it as their control images: `conditioning_use` CONTROL)."""
    from library.extra_inputs import ConditionKind

    given = [flag for flag, default in (("--inpaint_full_mask_prob", MaskSettings().full_mask_prob),
                                        ("--inpaint_mask_max_shapes", MaskSettings().max_shapes),
                                        ("--inpaint_mask_size", None))
             if getattr(args, flag[2:], default) != default]
    if given and (condition is None or condition.kind is not ConditionKind.INPAINT_MASK):
        raise ValueError(f"{' / '.join(given)}: synthetic inpainting masks, but this is "
                         f"{family.description.split(' (')[0]}, not an inpainting model: drop the flag(s)")
    if condition is None:
        if args.conditioning_data_dir and not args.masked_loss and conditioning_use is ConditioningUse.LOSS_MASK:
            raise ValueError("--conditioning_data_dir without --masked_loss: on this text-to-image model the folder "
                             "holds --masked_loss masks (the R channel of same-stem images): add --masked_loss "
                             "(for PNG alpha use --alpha_mask)")
    elif args.masked_loss:
        raise ValueError(f"--masked_loss: on {family.description.split(' (')[0]} the conditioning images "
                         f"(--conditioning_data_dir) are the model's {condition.kind.value}s, not loss masks; "
                         "drop --masked_loss (the alpha channel, --alpha_mask, still masks the loss)")


def epoch_batches(dataset: TrainingDataset, seed: int, accelerator) -> EpochBatches:
    return EpochBatches(dataset, seed, num_processes=accelerator.num_processes, process_index=accelerator.process_index)


def count_steps(args: argparse.Namespace, dataset: TrainingDataset, batches: EpochBatches) -> int:
    """--max_train_steps, or --max_train_epochs x optimizer steps per epoch (which then wins, as in kohya)."""
    steps_per_epoch = math.ceil(len(batches) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps
    if args.max_train_epochs:
        max_train_steps = args.max_train_epochs * steps_per_epoch
    logger.info("%d steps per epoch, %d steps (%.1f epochs)", steps_per_epoch, max_train_steps,
                max_train_steps / steps_per_epoch)
    dataset.max_train_steps = max_train_steps  # token warmup and caption dropout schedules read it
    return max_train_steps


def cache_latents(args: argparse.Namespace, dataset: TrainingDataset, vae, precision: Precision, accelerator) -> None:
    """--cache_latents / --cache_latents_to_disk: every image encoded now, each process its share (cache_split.py)."""
    if not (args.cache_latents or args.cache_latents_to_disk):
        return
    cache = LatentCache(vae, CacheSettings(to_disk=args.cache_latents_to_disk, batch_size=args.vae_batch_size,
                                           skip_cache_check=args.skip_cache_check), dtype=precision.vae_dtype)
    try:
        cache.build(dataset, ProcessShare.of(accelerator))
    except (ValueError, OSError, ImageError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}") from None


def float8_base_models(args: argparse.Namespace) -> tuple[str, ...]:
    """The frozen models --fp8_base / --fp8_base_unet store in float8: ("unet", "text_encoders"), ("unet",) or ().
    kohya's rule: --fp8_base_unet keeps the text encoders in the weight dtype, also beside --fp8_base."""
    if getattr(args, "fp8_base_unet", False):
        return ("unet",)
    return ("unet", "text_encoders") if getattr(args, "fp8_base", False) else ()


def float8_fingerprint(args: argparse.Namespace) -> dict:
    """--fp8_base / --fp8_base_unet in a resume fingerprint (they change the numbers), only when given."""
    which = float8_base_models(args)
    return {"fp8_base": list(which)} if which else {}


def store_base_in_float8(args: argparse.Namespace, models: SDModels, precision: Precision) -> None:
    """--fp8_base / --fp8_base_unet (library/fp8_weights.py). Call it once the base model is final (--base_weights
    merged, text-encoder outputs cached) and before a network wraps its layers."""
    which = float8_base_models(args)
    if not which:
        return
    from library.fp8_weights import store_in_float8

    flag = "--fp8_base_unet" if args.fp8_base_unet else "--fp8_base"
    targets = [("U-Net", models.unet)]
    if "text_encoders" in which:
        # Encoders released after caching their outputs hold no weights any more (meta tensors): nothing to store.
        targets += [(f"text encoder {i + 1}", encoder) for i, encoder in enumerate(models.text_encoders)
                    if not next(encoder.parameters()).is_meta]
    try:
        for what, model in targets:
            store_in_float8(model, precision.weight_dtype, what=what)
    except ValueError as e:
        raise SystemExit(f"error: {flag}: {e}") from None


# ----------------------------------------------------------------------------------------------------------
# Optimization, loop, samples


def fused_step_flag(args: argparse.Namespace) -> str | None:
    """The flag asking for the optimizer step inside backward, if the trainer has them and one is given (kohya's
    two variants exclude each other)."""
    per_parameter, groups = getattr(args, "fused_backward_pass", False), getattr(args, "fused_optimizer_groups", None)
    if per_parameter and groups:
        raise SystemExit("error: --fused_backward_pass (a step per parameter) and --fused_optimizer_groups (a step per "
                         "share of the parameters) are two ways of doing the same; give one")
    if groups is not None:
        return train_args.FUSED_OPTIMIZER_GROUPS_FLAG
    return "--fused_backward_pass" if per_parameter else None


def check_fused_step(args: argparse.Namespace, start: RunStart, accelerator) -> None:
    """Refuse, by flag, a fused step these settings cannot have; cheap, so called before the models load."""
    flag = fused_step_flag(args)
    if not flag:
        return
    from library.fused_backward import check_fused_backward_pass

    try:
        check_fused_backward_pass(start.optimizer.optimizer_type,
                                  gradient_accumulation_steps=args.gradient_accumulation_steps,
                                  num_processes=accelerator.num_processes, mixed_precision=args.mixed_precision,
                                  flag=flag)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def build_optimization(args: argparse.Namespace, opt_config: OptimizerConfig, param_groups: list[dict],
                       max_train_steps: int, accelerator):
    """The optimizer and LR scheduler. Only the optimizer goes through accelerate: with fp16 it then unscales the
    GradScaler's scaled gradients before clipping and stepping (--full_fp16: fp16 gradients allowed). With
    --fused_backward_pass / --fused_optimizer_groups the optimizer steps inside backward (the loop's own clipping
    must then be off: max_grad_norm 0)."""
    from library.precision import allow_fp16_gradient_unscaling

    if fused_step_flag(args):
        from library.fused_backward import FusedBackwardOptimizer

        try:
            optimizer = FusedBackwardOptimizer(opt_config, param_groups, max_grad_norm=opt_config.max_grad_norm,
                                               groups=args.fused_optimizer_groups)
            return optimizer, build_scheduler(opt_config, optimizer, max_train_steps)
        except (ValueError, TypeError) as e:
            raise SystemExit(f"error: --optimizer_type {opt_config.optimizer_type}: {e}") from None

    try:
        optimizer = build_optimizer(opt_config, param_groups)
    except (ValueError, TypeError) as e:  # torch's own checks, e.g. an unexpected keyword from --optimizer_args
        given = f" with --optimizer_args {' '.join(args.optimizer_args)}" if args.optimizer_args else ""
        raise SystemExit(f"error: --optimizer_type {opt_config.optimizer_type}{given}: the optimizer refused its "
                         f"arguments ({e}); check the argument names and values (and --learning_rate)") from None
    if getattr(args, "deepspeed", False) and args.offload_optimizer_device:
        from library.deepspeed_engine import cpu_adam_for

        optimizer = cpu_adam_for(optimizer)
    try:
        lr_scheduler = build_scheduler(opt_config, optimizer, max_train_steps)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if getattr(args, "deepspeed", False):
        return optimizer, lr_scheduler  # prepared together with the model by the DeepSpeed engine (Trainer.run)
    optimizer = accelerator.prepare_optimizer(optimizer, device_placement=False)
    if args.full_fp16 and accelerator.scaler is not None:
        allow_fp16_gradient_unscaling(accelerator.scaler)
    return optimizer, lr_scheduler


def fused_step_fingerprint(args: argparse.Namespace) -> dict:
    """The fused step in a resume fingerprint (its per-parameter clipping differs from the normal step's), only when
    one is asked for, so that states of runs without it keep their fingerprint."""
    flag = fused_step_flag(args)
    if not flag:
        return {}
    return {"fused_step": flag, "fused_optimizer_groups": args.fused_optimizer_groups}


def loop_config(args: argparse.Namespace, start: RunStart, family, max_train_steps: int, *,
                default_project: str) -> LoopConfig:
    return LoopConfig(
        output_dir=start.output_dir, output_name=start.output_name, max_train_steps=max_train_steps,
        batch_size=args.train_batch_size, gradient_accumulation_steps=args.gradient_accumulation_steps,
        seed=start.seed,
        # A fused step clips inside backward (per parameter / share): no gradients are left for the loop to clip.
        max_grad_norm=0.0 if fused_step_flag(args) else start.optimizer.max_grad_norm,
        vae_scale_factor=family.vae_scale_factor,
        save_every_n_steps=args.save_every_n_steps, save_every_n_epochs=args.save_every_n_epochs,
        save_last_n_steps=args.save_last_n_steps, save_last_n_epochs=args.save_last_n_epochs,
        save_n_epoch_ratio=args.save_n_epoch_ratio, save_last_n_steps_state=args.save_last_n_steps_state,
        save_last_n_epochs_state=args.save_last_n_epochs_state,
        save_state=args.save_state, save_state_on_train_end=args.save_state_on_train_end,
        sample_every_n_steps=args.sample_every_n_steps, sample_every_n_epochs=args.sample_every_n_epochs,
        sample_at_first=args.sample_at_first,
        log=train_args.log_settings(args, default_project=default_project, output_dir=start.output_dir),
        data_loader_workers=min(args.max_data_loader_n_workers, os.cpu_count() or 1),
        persistent_data_loader_workers=args.persistent_data_loader_workers,
        stop_after_steps=stop_after_steps(),
        hub=hub_settings(args), **initial_step(args, max_train_steps))


def initial_step(args: argparse.Namespace, max_train_steps: int) -> dict:
    """--initial_step / --initial_epoch / --skip_until_initial_step as LoopConfig fields (checked here: the loop
    turns an epoch into its first step once it knows the steps per epoch, see Trainer._start_at)."""
    step, epoch = getattr(args, "initial_step", None), getattr(args, "initial_epoch", None)
    if step is None and epoch is None:
        if getattr(args, "skip_until_initial_step", False):
            raise SystemExit("error: --skip_until_initial_step needs --initial_step or --initial_epoch")
        return {}
    if args.resume:
        raise SystemExit("error: --initial_step / --initial_epoch with --resume: the state already holds the step and "
                         "the data position; drop one of them")
    if step is not None and (step < 0 or step >= max_train_steps):
        raise SystemExit(f"error: --initial_step {step}: must be at least 0 and below --max_train_steps "
                         f"{max_train_steps}")
    if step is None and epoch < 1:
        raise SystemExit(f"error: --initial_epoch {epoch}: epochs count from 1")
    return {"initial_step": step, "initial_epoch": None if step is not None else epoch,
            "skip_until_initial_step": args.skip_until_initial_step}


def text_conditioner(args: argparse.Namespace, models: SDModels, *, pad_to_longest: bool = False) -> TextConditioner:
    """The family's captions -> U-Net conditioning, with kohya's caption-encoding flags (`pad_to_longest`: train_db's
    --no_token_padding)."""
    encoding = CaptionEncoding(max_token_length=args.max_token_length, clip_skip=args.clip_skip,
                               weighted=args.weighted_captions, pad_to_longest=pad_to_longest)
    try:
        return conditioner_for(models.family, models.tokenizers, models.text_encoders, encoding)
    except ValueError as e:  # a flag the family's conditioning cannot honour (SDXL and --clip_skip)
        raise SystemExit(f"error: {e}") from None


def wants_text_encoder_cache(args: argparse.Namespace) -> bool:
    """--cache_text_encoder_outputs or --cache_text_encoder_outputs_to_disk (flags of the trainers that implement
    the cache; the others refuse the first by name and lack the second)."""
    return bool(getattr(args, "cache_text_encoder_outputs", None) or
                getattr(args, "cache_text_encoder_outputs_to_disk", None))


def cache_text_encoder_outputs(args: argparse.Namespace, dataset: TrainingDataset, conditioner: TextConditioner,
                               models: SDModels, accelerator, *, keep_encoders: bool, batch_size: int | None = None):
    """--cache_text_encoder_outputs / --cache_text_encoder_outputs_to_disk: every caption encoded now, each process
    its share (cache_split.py); the conditioner the training step then uses answers from the cache. The text
    encoders are released afterwards unless `keep_encoders` (sample prompts still need them). Without the flags: `conditioner` itself.
    `batch_size`: captions per encoder call (tools/cache_text_encoder_outputs.py's --text_encoder_batch_size)."""
    if not wants_text_encoder_cache(args):
        return conditioner
    from library.text_encoder_cache import ENCODE_BATCH, TextEncoderOutputCache, release_text_encoders

    try:
        cache = TextEncoderOutputCache(conditioner, to_disk=args.cache_text_encoder_outputs_to_disk,
                                       autocast=accelerator.autocast, batch_size=batch_size or ENCODE_BATCH)
        cache.build(dataset, ProcessShare.of(accelerator))
    except (ValueError, OSError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}") from None
    if keep_encoders:
        logger.info("text-encoder outputs cached; the text encoders stay in memory for the sample prompts")
    else:
        release_text_encoders(models.text_encoders)
        logger.info("text-encoder outputs cached (%d captions); the text encoders are released", len(cache.entries))
    return cache.conditioner_for_training(accelerator.device)


def load_sample_prompts(args: argparse.Namespace, family) -> list:
    """--sample_prompts, with the training resolution as the default size (kohya uses a fixed 512). Called before
    the models load, so a bad prompt file is reported at once. A depth or extra-channel model's prompts each name
    their depth map / condition image with `--cn <file>`; an inpainting model samples from the prompt alone."""
    if not args.sample_prompts:
        return []
    from library.generation_inputs import require_condition_images
    from library.prompt_files import PromptFileError, SamplePrompt, load_prompts

    width, height = train_args.parse_resolution(args.resolution, family.default_resolution)
    try:
        prompts = load_prompts(args.sample_prompts, SamplePrompt("", width=width, height=height))
        require_condition_images(prompts, family)  # a depth / extra-channel model's samples: each prompt's --cn
    except (PromptFileError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if family.unet_inputs == INPAINTING:
        logger.info("sample images of %s: from the prompt alone (the whole image masked)",
                    family.description.split(" (")[0])
    return prompts


def make_sampler(args: argparse.Namespace, prompts: list, models: SDModels, start: RunStart):
    if not prompts:
        return None
    from library.sampling import TrainingSampler

    try:
        return TrainingSampler(
            prompts, models=models, default_sampler=args.sample_sampler, prediction_type=models.prediction_type.value,
            output_dir=start.output_dir, output_name=start.output_name, seed=start.seed,
            encoding=CaptionEncoding(max_token_length=args.max_token_length, clip_skip=args.clip_skip),
            zero_terminal_snr=args.zero_terminal_snr, model_name=Path(args.pretrained_model_name_or_path).stem)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def make_validator(args: argparse.Namespace, dataset: TrainingDataset, start: RunStart, accelerator):
    """The validation loss over the dataset's held-out images (--validation_split or the dataset config's
    validation_split), or None without any; the --validate_* flags without held-out images are refused."""
    from library.validation import ValidationConfig, Validator, validation_timesteps

    held_out = any(item.validation for item in dataset.items)
    given = [flag for flag in ("--validate_every_n_steps", "--validate_every_n_epochs", "--max_validation_steps")
             if getattr(args, flag[2:], None) is not None]
    if not held_out:
        if given:
            raise SystemExit(f"error: {', '.join(given)}: no images are held out for validation; give "
                             "--validation_split (e.g. 0.1) or validation_split in the dataset config")
        return None
    for flag in given:
        if getattr(args, flag[2:]) < 1:
            raise SystemExit(f"error: {flag} {getattr(args, flag[2:])}: must be at least 1")
    seed = start.seed if args.validation_seed is None else args.validation_seed
    config = ValidationConfig(seed=seed, every_n_steps=args.validate_every_n_steps,
                              every_n_epochs=args.validate_every_n_epochs, max_batches=args.max_validation_steps,
                              timesteps=validation_timesteps(args.min_timestep, args.max_timestep))
    return Validator(dataset, config, num_processes=accelerator.num_processes,
                     process_index=accelerator.process_index)


def hub_settings(args: argparse.Namespace):
    from library.hub_upload import hub_settings as settings

    try:
        return settings(args)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def resume_folder(args: argparse.Namespace) -> Path | None:
    """--resume, downloaded first with --resume_from_huggingface (into <output_dir>/hub_state/)."""
    if not args.resume:
        if getattr(args, "resume_from_huggingface", False):
            raise SystemExit("error: --resume_from_huggingface needs --resume {owner}/{repo}/{state folder}")
        return None
    if not getattr(args, "resume_from_huggingface", False):
        return Path(args.resume)
    from library.hub_upload import download_state, parse_hub_state

    try:
        return download_state(parse_hub_state(args.resume), args.huggingface_token, Path(args.output_dir) / "hub_state")
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def run_trainer(trainer: Trainer, args: argparse.Namespace) -> None:
    try:
        trainer.run(resume=resume_folder(args))
    except (ValueError, FloatingPointError) as e:  # FloatingPointError: NonFiniteLossError (names the step)
        raise SystemExit(f"error: {e}") from None
    trainer.engine.finish()


def stop_after_steps() -> int | None:
    # Testing aid for the resume tests: simulate a run killed after N steps (no final save).
    value = os.environ.get("SDTRAIN_STOP_AFTER_STEPS")
    return int(value) if value else None
