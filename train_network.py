"""Train a LoRA / LoCon network for Stable Diffusion 1.x / 2.x (kohya-ss/sd-scripts' interface).

    accelerate launch train_network.py --pretrained_model_name_or_path model.safetensors \\
        --train_data_dir data --output_dir out --output_name my_lora \\
        --resolution 512 --network_dim 16 --network_alpha 8 --learning_rate 1e-4 --max_train_epochs 10

The recipe: parse config -> load models -> build data -> cache latents -> create network -> train -> save.
The data pipeline, training step, saving and resume are the shared ones in `library/`.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from library import train_args  # noqa: E402
from library.dataset_config import DatasetConfigError, build_training_dataset  # noqa: E402
from library.dataset_sources import DatasetError  # noqa: E402
from library.diffusion_objective import DiffusionObjective  # noqa: E402
from library.images import ImageError  # noqa: E402
from library.latent_cache import CacheSettings, LatentCache  # noqa: E402
from library.model_loading import TextModelShim, instantiate_models, replace_vae  # noqa: E402
from library.network_metadata import additional_networks_hashes, dataset_metadata  # noqa: E402
from library.optimizers import build_optimizer, build_scheduler, optimizer_class  # noqa: E402
from library.precision import allow_fp16_gradient_unscaling, check_device_supports, precision_policy  # noqa: E402
from library.sd_checkpoint import FamilyHints, read_checkpoint  # noqa: E402
from library.tensor_files import CheckpointError  # noqa: E402
from library.train_dataset import EpochBatches, TrainingDataset, describe_samples  # noqa: E402
from library.training_loop import LoopConfig, Trainer  # noqa: E402

logger = logging.getLogger("train_network")


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train_args.add_common_training_arguments(p)
    g = p.add_argument_group("network")
    g.add_argument("--network_module", default="networks.lora")
    g.add_argument("--network_dim", type=int, default=None, help="rank (networks.lora default: 4)")
    g.add_argument("--network_alpha", type=float, default=1.0, help="scale = alpha / dim (kohya default 1)")
    g.add_argument("--network_dropout", type=float, default=None)
    g.add_argument("--network_args", nargs="*", default=None, help="key=value options, e.g. conv_dim=4")
    g.add_argument("--network_weights", default=None, help="start from these LoRA weights")
    g.add_argument("--dim_from_weights", action="store_true", help="take ranks from --network_weights")
    g.add_argument("--unet_lr", type=float, default=None)
    g.add_argument("--text_encoder_lr", type=float, nargs="*", default=None)
    g.add_argument("--network_train_unet_only", action="store_true")
    g.add_argument("--network_train_text_encoder_only", action="store_true")
    g.add_argument("--save_model_as", choices=["safetensors", "ckpt", "pt"], default="safetensors")
    g.add_argument("--no_metadata", action="store_true")
    g.add_argument("--scale_weight_norms", type=float, default=None,
                   help="max-norm regularisation of each LoRA module's delta W (1.0 is a common choice)")
    g.add_argument("--base_weights", nargs="*", default=None,
                   help="LoRA files merged into the base model before training (differential LoRA)")
    g.add_argument("--base_weights_multiplier", type=float, nargs="*", default=None)
    g.add_argument("--training_comment", default=None)
    return p


# ----------------------------------------------------------------------------------------------------------
# Data


def build_dataset(args, family, seed: int) -> tuple[TrainingDataset, dict]:
    cli = train_args.dataset_cli_values(args, family.default_resolution)
    try:
        return build_training_dataset(cli, Path(args.dataset_config) if args.dataset_config else None,
                                      family_step=family.bucket_reso_step, seed=seed,
                                      prior_loss_weight=args.prior_loss_weight, max_train_steps=args.max_train_steps)
    except (DatasetError, DatasetConfigError, ImageError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


# ----------------------------------------------------------------------------------------------------------
# The network as a training task


class LoRATask:
    def __init__(self, network, *, train_text_encoder: bool, save_dtype, save_model_as: str, metadata: dict,
                 scale_weight_norms: float | None = None):
        self.network = network
        self.train_text_encoder = train_text_encoder
        self.save_dtype = save_dtype
        self.save_model_as = save_model_as
        self.metadata = metadata
        self.scale_weight_norms = scale_weight_norms

    def after_optimizer_step(self) -> dict[str, float]:
        """--scale_weight_norms: max-norm regularisation after each step (logged as kohya does)."""
        if not self.scale_weight_norms:
            return {}
        scaled, mean_norm, max_norm = self.network.apply_max_norm_regularization(self.scale_weight_norms)
        return {"max_norm/keys_scaled": scaled, "max_norm/average_key_norm": mean_norm, "max_norm/max_key_norm": max_norm}

    def trainable_state(self):
        return {k: v.detach().clone() for k, v in self.network.state_dict().items()}

    def load_trainable_state(self, state):
        self.network.load_state_dict(state)

    def model_file_suffix(self) -> str:
        return "." + self.save_model_as

    def save_model(self, path_stem: Path, *, epoch: int, global_step: int) -> Path:
        path = path_stem.with_name(path_stem.name + self.model_file_suffix())
        metadata = dict(self.metadata, ss_epoch=str(epoch), ss_steps=str(global_step),
                        ss_training_finished_at=str(time.time()))
        if self.save_model_as == "safetensors":
            metadata.update(additional_networks_hashes(self.network.state_dict(), self.save_dtype, metadata))
        self.network.save_weights(path, self.save_dtype,
                                  metadata if self.save_model_as == "safetensors" else None)
        logger.info("saved %s", path)
        return path


def lora_metadata(args, family, prediction_type, dataset: TrainingDataset, seed: int, max_train_steps: int,
                  network_args: dict, data_summary: dict) -> dict[str, str]:
    """kohya's ss_* training metadata (all strings) plus modelspec for the LoRA."""
    v = prediction_type.value == "v_prediction"
    base = {
        "ss_network_module": args.network_module, "ss_network_dim": str(args.network_dim or 4),
        "ss_network_alpha": str(args.network_alpha), "ss_network_args": json.dumps(network_args),
        "ss_v2": str(family.is_v2), "ss_base_model_version": family.ss_base_model_version + ("" if not v or
                                                                                              family.is_v2 else "_v"),
        "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": family.modelspec_architecture + "/lora",
        "modelspec.implementation": "diffusers", "modelspec.prediction_type": prediction_type.modelspec_name,
        "modelspec.title": args.output_name or "last",
        "modelspec.resolution": "{}x{}".format(*train_args.parse_resolution(args.resolution, family.default_resolution)),
    }
    if args.no_metadata:
        return base
    base.update(dataset_metadata(dataset, data_summary))
    base.update({
        "ss_session_id": str(random.randint(0, 2 ** 32)), "ss_training_started_at": str(time.time()),
        "ss_output_name": args.output_name or "last", "ss_learning_rate": str(args.learning_rate),
        "ss_unet_lr": str(args.unet_lr), "ss_text_encoder_lr": str(args.text_encoder_lr),
        "ss_max_train_steps": str(max_train_steps), "ss_seed": str(seed), "ss_lr_scheduler": args.lr_scheduler,
        "ss_lr_warmup_steps": str(args.lr_warmup_steps), "ss_optimizer": args.optimizer_type or "AdamW",
        "ss_mixed_precision": args.mixed_precision, "ss_full_fp16": str(args.full_fp16),
        "ss_gradient_checkpointing": str(args.gradient_checkpointing),
        "ss_gradient_accumulation_steps": str(args.gradient_accumulation_steps),
        "ss_batch_size_per_device": str(args.train_batch_size), "ss_resolution": base["modelspec.resolution"],
        "ss_clip_skip": str(args.clip_skip), "ss_max_token_length": str(args.max_token_length),
        "ss_cache_latents": str(args.cache_latents), "ss_enable_bucket": str(args.enable_bucket),
        "ss_min_bucket_reso": str(args.min_bucket_reso), "ss_max_bucket_reso": str(args.max_bucket_reso),
        "ss_bucket_no_upscale": str(args.bucket_no_upscale), "ss_flip_aug": str(args.flip_aug),
        "ss_random_crop": str(args.random_crop), "ss_shuffle_caption": str(args.shuffle_caption),
        "ss_keep_tokens": str(args.keep_tokens), "ss_noise_offset": str(args.noise_offset),
        "ss_min_snr_gamma": str(args.min_snr_gamma), "ss_prior_loss_weight": str(args.prior_loss_weight),
        "ss_loss_type": args.loss_type, "ss_zero_terminal_snr": str(args.zero_terminal_snr),
        "ss_network_dropout": str(args.network_dropout), "ss_training_comment": str(args.training_comment),
        "ss_sd_model_name": Path(args.pretrained_model_name_or_path).name,
    })
    return base


# ----------------------------------------------------------------------------------------------------------


def train(args: argparse.Namespace) -> Path:
    train_args.check_training_flags(args)
    seed = args.seed if args.seed is not None else random.randint(0, 2 ** 31 - 1)
    logger.info("seed %d", seed)
    if args.network_train_unet_only and args.network_train_text_encoder_only:
        raise SystemExit("error: --network_train_unet_only and --network_train_text_encoder_only exclude each other; "
                         "give at most one (with neither, both the U-Net and the text encoder are trained)")
    # Flag errors that need no model: reported before minutes of model loading and latent caching.
    if args.dim_from_weights and not args.network_weights:
        raise SystemExit("error: --dim_from_weights takes the ranks from --network_weights: give --network_weights "
                         "FILE, or drop --dim_from_weights")
    if args.network_weights and not Path(args.network_weights).is_file():
        raise SystemExit(f"error: --network_weights {args.network_weights}: no such file; check the path")
    network_kwargs = network_kwargs_from(args.network_args)
    opt_config = train_args.optimizer_config(args)
    try:
        optimizer_class(opt_config.optimizer_type)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    output_name = args.output_name or "last"

    # Models
    hints = FamilyHints(v2=True if args.v2 else None, v_parameterization=args.v_parameterization)
    try:
        checkpoint = read_checkpoint(args.pretrained_model_name_or_path, hints,
                                     allow_unsafe_pickle=args.allow_unsafe_pickle)
        if args.vae:
            replace_vae(checkpoint, args.vae, allow_unsafe_pickle=args.allow_unsafe_pickle)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    family, prediction = checkpoint.family, checkpoint.prediction_type
    logger.info("%s", family.description)
    prompts = load_sample_prompts(args, family)  # a bad prompt file is reported before models load
    from accelerate import Accelerator

    try:
        accelerator = Accelerator(mixed_precision=args.mixed_precision)
    except ValueError as e:
        raise SystemExit(f"error: --mixed_precision {args.mixed_precision}: {e}") from None
    try:
        check_device_supports(args.mixed_precision, accelerator.device)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    precision = precision_policy(args.mixed_precision, full_fp16=args.full_fp16, full_bf16=args.full_bf16,
                                 no_half_vae=args.no_half_vae)
    weight_dtype, vae_dtype = precision.weight_dtype, precision.vae_dtype
    with checkpoint:
        models = instantiate_models(checkpoint, dtype=weight_dtype, component_dtypes={"vae": vae_dtype})
    unet, text_encoder, vae = (m.to(accelerator.device) for m in (models.unet, models.text_encoder, models.vae))
    for model in (unet, text_encoder, vae):
        model.requires_grad_(False)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()  # diffusers only checkpoints in training mode; dropout is 0 in SD's UNet

    # Data
    dataset, data_summary = build_dataset(args, family, seed)
    batches = EpochBatches(dataset, seed, num_processes=accelerator.num_processes,
                           process_index=accelerator.process_index)
    if args.debug_dataset:
        print("\n".join(describe_samples(dataset, batches)))
        return output_dir / (output_name + "." + args.save_model_as)
    steps_per_epoch = math.ceil(len(batches) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps
    if args.max_train_epochs:
        max_train_steps = args.max_train_epochs * steps_per_epoch
    logger.info("%d steps per epoch, %d steps (%.1f epochs)", steps_per_epoch, max_train_steps,
                max_train_steps / steps_per_epoch)
    dataset.max_train_steps = max_train_steps
    if args.cache_latents or args.cache_latents_to_disk:
        cache = LatentCache(vae, CacheSettings(to_disk=args.cache_latents_to_disk, batch_size=args.vae_batch_size,
                                               skip_cache_check=args.skip_cache_check), dtype=vae_dtype)
        try:
            cache.build(dataset)
        except (ValueError, OSError, ImageError, FloatingPointError) as e:
            raise SystemExit(f"error: {e}") from None

    if args.base_weights:
        merge_base_weights(args, text_encoder, unet)

    # Network (its initial weights come from torch's global generator: seed it so runs repeat exactly)
    torch.manual_seed(seed)
    module = importlib.import_module(args.network_module)
    # External kohya-interface modules (e.g. lycoris.kohya) name text-encoder modules from the model's own module
    # paths; transformers 5 dropped the `text_model.` level that every LoRA loader expects in those names.
    network_te = text_encoder if args.network_module == "networks.lora" else TextModelShim(text_encoder)
    try:
        if args.dim_from_weights:
            try:
                network, _ = module.create_network_from_weights(1.0, args.network_weights, vae, network_te, unet,
                                                                **network_kwargs)
            except ValueError as e:
                raise _weights_error(args, e) from None
        else:
            network = module.create_network(1.0, args.network_dim, args.network_alpha, vae, network_te, unet,
                                            neuron_dropout=args.network_dropout, **network_kwargs)
        network.apply_to(network_te, unet, apply_text_encoder=not args.network_train_unet_only,
                         apply_unet=not args.network_train_text_encoder_only)
        if args.network_weights:
            try:
                info = network.load_weights(args.network_weights)
            except ValueError as e:
                raise _weights_error(args, e) from None
            logger.info("loaded network weights %s: %s", args.network_weights, info)
    except (ValueError, NotImplementedError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    network.to(accelerator.device)
    network.to(precision.trained_dtype)  # fp32 unless --full_fp16 / --full_bf16 (the optimizer then steps halves)
    te_lr = args.text_encoder_lr[0] if args.text_encoder_lr else None
    param_groups, group_names = network.prepare_optimizer_params(te_lr, args.unet_lr, args.learning_rate)
    # A text-encoder LoRA with learning rate 0 stays applied but frozen (prepare_optimizer_params decides).
    train_text_encoder = any(p.requires_grad for lora in network.text_encoder_loras for p in lora.parameters())
    if train_text_encoder and args.gradient_checkpointing:
        text_encoder.gradient_checkpointing_enable()
        text_encoder.train()

    # Optimizer
    try:
        optimizer = build_optimizer(opt_config, param_groups)
    except (ValueError, TypeError) as e:  # torch's own checks, e.g. an unexpected keyword from --optimizer_args
        given = f" with --optimizer_args {' '.join(args.optimizer_args)}" if args.optimizer_args else ""
        raise SystemExit(f"error: --optimizer_type {opt_config.optimizer_type}{given}: the optimizer refused its "
                         f"arguments ({e}); check the argument names and values (and --learning_rate)") from None
    try:
        lr_scheduler = build_scheduler(opt_config, optimizer, max_train_steps)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    # Only the optimizer goes through accelerate: with fp16 it then unscales the GradScaler's scaled gradients
    # before clipping and stepping. The network is not wrapped for DDP (it is applied by patching the base models,
    # never called itself); the training loop averages its gradients across processes explicitly.
    optimizer = accelerator.prepare_optimizer(optimizer, device_placement=False)
    if args.full_fp16 and accelerator.scaler is not None:
        allow_fp16_gradient_unscaling(accelerator.scaler)

    save_dtype = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(args.save_precision)
    metadata = lora_metadata(args, family, prediction, dataset, seed, max_train_steps, network_kwargs, data_summary)
    task = LoRATask(network, train_text_encoder=train_text_encoder, save_dtype=save_dtype,
                    save_model_as=args.save_model_as, metadata=metadata,
                    scale_weight_norms=args.scale_weight_norms)
    fingerprint = run_fingerprint(args, family, dataset, seed)
    loop_config = LoopConfig(
        output_dir=output_dir, output_name=output_name, max_train_steps=max_train_steps,
        batch_size=args.train_batch_size, gradient_accumulation_steps=args.gradient_accumulation_steps, seed=seed,
        max_grad_norm=opt_config.max_grad_norm, max_token_length=args.max_token_length, clip_skip=args.clip_skip,
        weighted_captions=args.weighted_captions, vae_scale_factor=family.vae_scale_factor,
        save_every_n_steps=args.save_every_n_steps,
        save_every_n_epochs=args.save_every_n_epochs, save_last_n_steps=args.save_last_n_steps,
        save_last_n_epochs=args.save_last_n_epochs, save_state=args.save_state,
        save_state_on_train_end=args.save_state_on_train_end,
        sample_every_n_steps=args.sample_every_n_steps, sample_every_n_epochs=args.sample_every_n_epochs,
        sample_at_first=args.sample_at_first,
        log=train_args.log_settings(args, default_project="network_train", output_dir=output_dir),
        data_loader_workers=min(args.max_data_loader_n_workers, os.cpu_count() or 1),
        stop_after_steps=_stop_after_steps())
    sampler = None
    if prompts:
        from library.sampling import TrainingSampler

        try:
            sampler = TrainingSampler(
                prompts, models=models, default_sampler=args.sample_sampler, prediction_type=prediction.value,
                output_dir=output_dir, output_name=output_name, seed=seed, clip_skip=args.clip_skip,
                max_token_length=args.max_token_length, vae_scale_factor=family.vae_scale_factor,
                zero_terminal_snr=args.zero_terminal_snr, model_name=Path(args.pretrained_model_name_or_path).stem)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    trainer = Trainer(task=task, unet=unet, text_encoder=text_encoder, vae=vae, tokenizer=models.tokenizer,
                      dataset=dataset, batches=batches, objective=DiffusionObjective(
                          train_args.objective_config(args, prediction)),
                      optimizer=optimizer, lr_scheduler=lr_scheduler, config=loop_config, accelerator=accelerator,
                      run_fingerprint=fingerprint, trainable_parameters=[p for g in param_groups for p in g["params"]],
                      weight_dtype=weight_dtype, sampler=sampler, sample_trainable=task.network,
                      lr_names=group_names)
    try:
        trainer.run(resume=Path(args.resume) if args.resume else None)
    except (ValueError, FloatingPointError) as e:  # FloatingPointError: NonFiniteLossError (names the step)
        raise SystemExit(f"error: {e}") from None
    return output_dir / (output_name + task.model_file_suffix())


def network_kwargs_from(pairs: list[str] | None) -> dict[str, str]:
    """`--network_args key=value ...` as a dict of strings (the network module types and checks the values)."""
    kwargs = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"error: --network_args {pair!r}: expected key=value (e.g. conv_dim=4)")
        kwargs[key.strip()] = value
    return kwargs


def _weights_error(args, error: Exception) -> SystemExit:
    """--network_weights that do not fit the network: the loader's message (keys and shapes) and what to do."""
    if args.dim_from_weights:
        advice = ("With --dim_from_weights the ranks already come from the file, so its layers do not match this "
                  "base model: it is a LoRA for another base model family (e.g. SD 2.x vs SD 1.x). Train on that "
                  "base model, or start without --network_weights.")
    else:
        advice = ("If it is a LoRA for this base model with another rank, add --dim_from_weights (or give the "
                  "--network_dim / --network_args conv_dim it was trained with); a LoRA for another base model "
                  "family (e.g. SD 2.x vs SD 1.x) cannot be loaded: use the matching "
                  "--pretrained_model_name_or_path, or start without --network_weights.")
    return SystemExit(f"error: --network_weights {args.network_weights}: {error}\n  {advice}")


def load_sample_prompts(args, family) -> list:
    """--sample_prompts, with the training resolution as the default size (kohya uses a fixed 512)."""
    if not args.sample_prompts:
        return []
    from library.sampling import PromptFileError, SamplePrompt, load_prompts

    width, height = train_args.parse_resolution(args.resolution, family.default_resolution)
    try:
        return load_prompts(args.sample_prompts, SamplePrompt("", width=width, height=height))
    except (PromptFileError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


def merge_base_weights(args, text_encoder, unet) -> None:
    import networks.lora as lora

    try:
        lora.merge_weight_files(args.base_weights, args.base_weights_multiplier, text_encoder, unet)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: --base_weights: {e}") from None


def run_fingerprint(args, family, dataset: TrainingDataset, seed: int) -> dict:
    """Settings a resumed run must share with the run that saved the state, or it would silently diverge."""
    items = hashlib.sha256("\n".join(f"{i.record.path}|{i.bucket}|{i.loss_weight}" for i in dataset.items)
                           .encode()).hexdigest()[:16]
    return {"family": family.name, "seed": seed, "dataset_items": items, "train_batch_size": args.train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps, "network_module": args.network_module,
            "network_dim": args.network_dim, "network_alpha": args.network_alpha,
            "network_args": args.network_args or [], "optimizer_type": args.optimizer_type or "AdamW",
            "learning_rate": args.learning_rate}


def _stop_after_steps() -> int | None:
    # Testing aid for the resume tests: simulate a run killed after N steps (no final save).
    value = os.environ.get("SDTRAIN_STOP_AFTER_STEPS")
    return int(value) if value else None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = train_args.parse_args(setup_parser(), argv)
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
