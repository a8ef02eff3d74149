"""Training the whole U-Net (and optionally the text encoder): the recipe train_db.py and fine_tune.py share.

They differ only in their data flags and defaults (`FullModelRecipe`); what trains (all U-Net weights, the text
encoder until `stop_text_encoder_at`), how it is saved (a complete checkpoint in any format, WebUI layout, source
extras carried over, ss_* + modelspec metadata) and the optional EMA are here once. The training step itself is the
shared `Trainer`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from library import train_args
from library import training_setup as setup
from library.checkpoint_writer import SaveFormat, save_checkpoint
from library.data_parallel import UnusedParameters
from library.diffusion_objective import DiffusionObjective
from library.families import ALL_UNET_INPUTS
from library.model_loading import SDModels, checkpoint_from_models
from library.sd_checkpoint import SDCheckpoint
from library.tensor_files import CheckpointError
from library.train_dataset import TrainingDataset, describe_samples
from library.training_loop import Trainer
from library.textual_inversion import (AddedTokenEmbedding, CaptionRewrite, embeddings_dir, expand_tokens,
                                       original_token_embedding, save_beside)
from library.training_metadata import run_metadata

logger = logging.getLogger(__name__)


def add_full_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("full model training and saving")
    g.add_argument("--learning_rate_te", type=float, default=None,
                   help="text-encoder learning rate (default: --learning_rate)")
    g.add_argument("--save_model_as", choices=[f.value for f in SaveFormat], default=None,
                   help="ckpt, safetensors, diffusers or diffusers_safetensors (default: the base model's format)")
    g.add_argument("--use_safetensors", action="store_true",
                   help="without --save_model_as: safetensors files (and diffusers_safetensors for folders)")
    g.add_argument("--use_ema", action="store_true",
                   help="keep an exponential moving average of the trained weights and save it as the model")
    g.add_argument("--ema_decay", type=float, default=0.9999)
    g.add_argument("--ema_cpu", action="store_true", help="keep the EMA copy in CPU memory (saves GPU memory)")
    train_args.add_embedding_arguments(p)
    train_args.add_fused_step_arguments(p)

@dataclass(frozen=True)
class FullModelRecipe:
    """What differs between train_db.py, fine_tune.py and sdxl_train.py."""

    name: str  # log tracker default and modelspec / ss_* training info
    train_text_encoder: bool
    # Each text encoder's learning rate (family order): None = --learning_rate, 0 = that encoder stays frozen.
    text_encoder_lrs: tuple[float | None, ...] = (None,)
    unet_block_lrs: tuple[float, ...] | None = None  # sdxl_train --block_lr: one per block, 0 freezes a block
    families: tuple[str, ...] = setup.SD_ARCHS  # the families (ModelFamily.arch) this script trains
    elsewhere: tuple[tuple[str, str], ...] = (("sdxl", "sdxl_train.py"),)  # (arch, the script that trains it)
    stop_text_encoder_at: int | None = None  # global step after which only the U-Net trains (train_db)
    pad_captions_to_longest: bool = False  # train_db --no_token_padding
    # Work with the loaded base models before the dataset is scanned (train_db: generate missing class images).
    before_data: Callable[[SDModels, "setup.RunStart"], None] | None = None


def save_format(args: argparse.Namespace) -> SaveFormat:
    """--save_model_as, or the base model's own format (kohya: a folder saves as diffusers, a file as a file)."""
    if args.save_model_as:
        return SaveFormat(args.save_model_as)
    source = Path(args.pretrained_model_name_or_path)
    if source.is_dir():
        return SaveFormat.DIFFUSERS_SAFETENSORS if args.use_safetensors else SaveFormat.DIFFUSERS
    if args.use_safetensors:
        return SaveFormat.SAFETENSORS
    return SaveFormat.from_path(source) if source.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth") \
        else SaveFormat.SAFETENSORS


def carried_extras(checkpoint) -> dict[str, torch.Tensor]:
    """Extra tensors of the source checkpoint to write back (schedule buffers, SD 2.x's unused last text layer), in
    memory: the source file closes after loading. A source EMA (`model_ema.*`) describes the old weights, so it is
    dropped rather than saved beside the new ones."""
    kept = {k: v.load().clone() for k, v in checkpoint.extras.items() if not k.startswith("model_ema.")}
    if len(kept) < len(checkpoint.extras):
        logger.info("the base model's EMA weights (model_ema.*) are not carried over: they would be stale")
    return kept


def take_untrained_from_source(checkpoint: SDCheckpoint, source: SDCheckpoint, components: list[str]) -> None:
    """Write `components` (untrained) from the base model's own tensors rather than the live models: the precision
    policy holds frozen weights in the half-precision compute dtype, and saving those would round a text encoder or
    VAE that nothing trained. Each component's source is first checked against the weights held in memory (the
    source cast as at load time); a component whose file changed during the run keeps the held weights."""
    for component in components:
        held, original = checkpoint.tensors[component], source.tensors[component]
        if any(lazy.load().is_meta for lazy in held.values()):
            # Released after --cache_text_encoder_outputs: the file is the only copy left.
            checkpoint.tensors[component] = dict(original)
            continue
        if held.keys() == original.keys() and all(held[k].dtype == v.dtype for k, v in original.items()):
            continue  # held in the source's own dtype (e.g. fp32 training): already exact, no re-read needed
        unchanged = held.keys() == original.keys() and all(
            torch.equal(original[k].load().to(h.dtype).to(h.device), h)
            for k, h in ((k, lazy.load()) for k, lazy in held.items()))
        if unchanged:
            checkpoint.tensors[component] = dict(original)
        else:
            logger.warning("%s: the base model's %s is not what was loaded (the file changed during training); "
                           "saving the %s as held in memory, in %s", source.source, component, component,
                           next(iter(held.values())).dtype)


class FullModelTask:
    """The U-Net (and text encoder) as a `TrainingTask`: trainable state for resume, checkpoint saving, the text
    encoder's stop step, the EMA update."""

    def __init__(self, models: SDModels, *, trained_text_encoders: list[str], stop_text_encoder_at: int | None,
                 save_as: SaveFormat, save_dtype: torch.dtype | None, extras: dict[str, torch.Tensor],
                 source_metadata: dict[str, str], metadata: dict[str, str], ema=None, pivot=None,
                 open_source: Callable[[], SDCheckpoint] | None = None):
        self.models = models
        self.open_source = open_source  # the base model again, for saving untrained components exactly
        self.trained_text_encoders = list(trained_text_encoders)  # component names, e.g. ["text_encoder_2"]
        self.trains_text_encoder = bool(trained_text_encoders)
        self.pivot = pivot  # a token trained in the same run (pivotal tuning), saved beside the checkpoint
        self.stop_text_encoder_at = stop_text_encoder_at
        self.save_as, self.save_dtype = save_as, save_dtype
        self.extras, self.source_metadata, self.metadata = extras, source_metadata, metadata
        self.ema = ema
        # The trained models' full weights while a sharding engine (FSDP) saves: name -> state dict (set by the
        # Trainer on the main process around a save; the modules then hold only this process's share).
        self.gathered_weights: dict[str, dict[str, torch.Tensor]] | None = None

    def trained_modules(self) -> dict[str, torch.nn.Module]:
        """The trained models by component name: what FSDP shards."""
        return self._modules()

    def _modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.models.unet,
                **{name: self.models.component(name) for name in self.trained_text_encoders}}

    @property
    def train_text_encoder(self) -> bool:  # gradients must flow through the text encoder
        return self.trains_text_encoder or (self.pivot is not None and self.pivot.training)

    def untrained_components(self) -> list[str]:
        """The VAE never trains; a text encoder unless this run trains it (a --pivotal_token's vectors are saved
        beside the checkpoint, not in the text encoder)."""
        encoders = [slot.component for slot in self.models.family.text_encoders]
        return ["vae"] + [name for name in encoders if name not in self.trained_text_encoders]

    @contextlib.contextmanager
    def _source(self):
        """The base model opened again for one save, or None (with a warning) if it cannot be read any more."""
        if self.open_source is None:
            yield None
            return
        try:
            source = self.open_source()
        except CheckpointError as e:
            if any(p.is_meta for te in self.models.text_encoders for p in te.parameters()):
                raise ValueError(f"cannot read the base model again ({e}), and its text encoders were released "
                                 "after --cache_text_encoder_outputs: restore the base model file and resume from "
                                 "the last state, or train without the cache") from None
            logger.warning("cannot read the base model again (%s); its untrained components are saved as held in "
                           "memory", e)
            yield None
            return
        with source:
            yield source

    def before_step(self, global_step: int) -> None:
        if self.pivot is not None:
            self.pivot.before_step(global_step)
        if self.stop_text_encoder_at is not None and global_step >= self.stop_text_encoder_at \
                and self.trains_text_encoder:
            # Frozen from here on; the optimizer skips parameters without gradients, so its state stays as is.
            logger.info("step %d: text encoder training stops (--stop_text_encoder_training)", global_step + 1)
            pivot_vectors = {id(p) for p in self.pivot.parameters} if self.pivot is not None else set()
            for component in self.trained_text_encoders:
                for parameter in self.models.component(component).parameters():
                    if id(parameter) not in pivot_vectors:  # the word keeps its own schedule (--pivotal_steps)
                        parameter.requires_grad_(False)
            self.trains_text_encoder = False

    def unused_parameters(self, text_conditioner) -> list[UnusedParameters]:
        """Why some trained parameters can get no gradient in a step (what DDP must know, data_parallel.py)."""
        unused = []
        if self.trained_text_encoders and text_conditioner.skips_last_layer:
            unused.append(UnusedParameters("a text encoder's last layer, which the conditioning skips (--clip_skip; "
                                           "SDXL: the penultimate layer)", same_every_step=True))
        if self.trained_text_encoders and self.stop_text_encoder_at is not None:
            unused.append(UnusedParameters("--stop_text_encoder_training: the text encoder stops training mid-run",
                                           same_every_step=False))
        if self.pivot is not None and self.pivot.train_steps is not None:
            unused.append(UnusedParameters("--pivotal_steps: the word stops training mid-run", same_every_step=False))
        return unused

    def after_optimizer_step(self) -> dict[str, float]:
        if self.ema is None:
            return {}
        return {"ema/decay": self.ema.update()}

    def trainable_state(self) -> dict:
        gathered = self.gathered_weights or {}
        state = {"models": {name: {k: v.detach() for k, v in (gathered[name] if name in gathered
                                                              else module.state_dict()).items()}
                            for name, module in self._modules().items()}}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.pivot is not None:  # "pivot": the first text encoder's vectors, "pivot_2": SDXL's bigG
            state.update(self.pivot.word.state("pivot"))
        return state

    def load_trainable_state(self, state: dict) -> None:
        for name, module in self._modules().items():
            module.load_state_dict(state["models"][name])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if self.pivot is not None:
            self.pivot.word.load_state(state, "pivot")

    def model_file_suffix(self) -> str:
        return "" if self.save_as.is_diffusers else "." + self.save_as.value

    def save_model(self, path_stem: Path, *, epoch: int, global_step: int) -> Path:
        path = path_stem.with_name(path_stem.name + self.model_file_suffix())
        metadata = dict(self.metadata, ss_epoch=str(epoch), ss_steps=str(global_step),
                        ss_training_finished_at=str(time.time()))
        metadata.setdefault("modelspec.title", path_stem.name)  # --metadata_title wins
        with self.ema.applied() if self.ema is not None else contextlib.nullcontext(), \
                original_token_embedding(self.models.text_encoders), self._source() as source:
            checkpoint = checkpoint_from_models(self.models, extras=self.extras,
                                                metadata=self.source_metadata, state_dicts=self.gathered_weights)
            if source is not None:
                take_untrained_from_source(checkpoint, source, self.untrained_components())
            save_checkpoint(checkpoint, path, self.save_as, dtype=self.save_dtype, epoch=epoch,
                            global_step=global_step, metadata=metadata)
        logger.info("saved %s", path)
        if self.pivot is not None:  # a checkpoint has no place for new tokens: the word goes beside it
            save_beside(path_stem, self.pivot, step=global_step, metadata=metadata)
        return path

    def model_paths(self, path_stem: Path) -> list[Path]:
        paths = [path_stem.with_name(path_stem.name + self.model_file_suffix())]
        return paths + ([embeddings_dir(path_stem)] if self.pivot is not None else [])


def text_encoder_lr(args, recipe: FullModelRecipe, index: int) -> float:
    """The learning rate of text encoder `index`: the recipe's (--learning_rate_te, or sdxl_train's
    --learning_rate_te1 / --learning_rate_te2), else --learning_rate."""
    lrs = recipe.text_encoder_lrs
    lr = lrs[index] if index < len(lrs) else None
    return args.learning_rate if lr is None else lr


def unet_param_groups(unet: torch.nn.Module, lr: float, block_lrs: tuple[float, ...] | None
                      ) -> tuple[list[dict], list[str]]:
    """The U-Net's parameter groups: one at `lr`, or with sdxl_train's --block_lr one per block at its own rate
    (kohya's SDXL block table; a block at 0 is frozen and gets no group)."""
    unet.requires_grad_(True)
    if block_lrs is None:
        return [{"params": list(unet.parameters()), "lr": lr}], ["unet"]
    from library.unet_blocks import sdxl_block_parameters

    groups, names = [], []
    for block, (params, block_lr) in enumerate(zip(sdxl_block_parameters(unet), block_lrs)):
        if block_lr == 0:
            for parameter in params:
                parameter.requires_grad_(False)
        elif params:
            groups.append({"params": params, "lr": block_lr})
            names.append(f"unet_block{block}")
    return groups, names


def checkpoint_metadata(args, recipe: FullModelRecipe, family, prediction, dataset: TrainingDataset,
                        data_summary: dict, seed: int, max_train_steps: int) -> dict[str, str]:
    resolution = "{}x{}".format(*train_args.parse_resolution(args.resolution, family.default_resolution))
    metadata = {"modelspec.resolution": resolution, "ss_training_script": recipe.name, "ss_v2": str(family.is_v2),
                "ss_base_model_version": family.ss_base_model_version, "ss_text_encoder_trained":
                str(recipe.train_text_encoder), "ss_use_ema": str(args.use_ema),
                "ss_ema_decay": str(args.ema_decay if args.use_ema else None)}
    lrs = recipe.text_encoder_lrs  # kohya: ss_learning_rate_te, or sdxl_train's ss_learning_rate_te1 / _te2
    metadata.update({"ss_learning_rate_te": str(lrs[0])} if len(lrs) == 1 else
                    {f"ss_learning_rate_te{i}": str(lr) for i, lr in enumerate(lrs, start=1)})
    if recipe.unet_block_lrs is not None:
        metadata["ss_block_lr"] = ",".join(map(str, recipe.unet_block_lrs))
    if recipe.stop_text_encoder_at is not None:
        metadata["ss_stop_text_encoder_training"] = str(recipe.stop_text_encoder_at)
    metadata.update(run_metadata(args, dataset=dataset, data_summary=data_summary, seed=seed,
                                 max_train_steps=max_train_steps, resolution=resolution))
    return metadata


def run_fingerprint(args, recipe: FullModelRecipe, family, dataset: TrainingDataset, seed: int) -> dict:
    """Settings a resumed run must share with the run that saved the state, or it would silently diverge."""
    items = hashlib.sha256("\n".join(f"{i.record.path}|{i.bucket}|{i.loss_weight}" for i in dataset.items)
                           .encode()).hexdigest()[:16]
    return {"family": family.name, "seed": seed, "dataset_items": items, "train_batch_size": args.train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps, "recipe": recipe.name,
            "train_text_encoder": recipe.train_text_encoder, "stop_text_encoder_at": recipe.stop_text_encoder_at,
            "optimizer_type": args.optimizer_type or "AdamW", "learning_rate": args.learning_rate,
            "use_ema": args.use_ema, "fused_backward_pass": args.fused_backward_pass,
            # Only where given: states saved without it keep their fingerprint (the share size sets the clipping).
            **({"fused_optimizer_groups": args.fused_optimizer_groups} if args.fused_optimizer_groups else {}),
            # Only where they exist (sdxl_train), so states of the SD 1.x / 2.x trainers keep their fingerprint.
            **({"text_encoder_lrs": list(recipe.text_encoder_lrs)} if len(recipe.text_encoder_lrs) > 1 else {}),
            **({"block_lr": list(recipe.unet_block_lrs)} if recipe.unet_block_lrs is not None else {})}


def train_full_model(args: argparse.Namespace, recipe: FullModelRecipe) -> Path:
    start = setup.begin_run(args)
    fmt = save_format(args)

    # Models
    checkpoint = setup.read_base_model(args, setup.TrainedArchs(f"{recipe.name}.py", recipe.families,
                                                                recipe.elsewhere, inputs=ALL_UNET_INPUTS))
    family, prediction = checkpoint.family, checkpoint.prediction_type
    prompts = setup.load_sample_prompts(args, family)
    accelerator = setup.make_accelerator(args)
    start = setup.same_seed_everywhere(start, accelerator)
    setup.check_fused_step(args, start, accelerator)  # before the models load (it depends on the process count)
    with checkpoint:
        extras = carried_extras(checkpoint)
        source_metadata = dict(checkpoint.metadata)
        models, precision = setup.load_models(args, checkpoint, accelerator)
    unet, text_encoders = models.unet, models.text_encoders
    added_tokens, pivot = setup.add_embeddings(args, models, precision)

    # Data
    if recipe.before_data is not None and accelerator.is_main_process:
        recipe.before_data(models, start)
    accelerator.wait_for_everyone()
    dataset, data_summary = setup.build_dataset(args, family, start.seed, unet_in_channels=unet.config.in_channels)
    if added_tokens:
        dataset.caption_rewrite = CaptionRewrite(added_tokens)  # a token string stands for all its vectors
        prompts = [replace(p, prompt=expand_tokens(p.prompt, added_tokens)) for p in prompts]
    batches = setup.epoch_batches(dataset, start.seed, accelerator)
    if args.debug_dataset:
        print("\n".join(describe_samples(dataset, batches)))
        return start.output_dir / (start.output_name + ("" if fmt.is_diffusers else "." + fmt.value))
    setup.check_pivotal_token(args, dataset)
    max_train_steps = setup.count_steps(args, dataset, batches)
    setup.cache_latents(args, dataset, models.vae, precision, accelerator)

    # What trains: every U-Net weight (by block, with --block_lr), and each text encoder with a learning rate
    # (until the stop step), each in its own parameter group.
    if unet.dtype != precision.trained_dtype:
        unet.to(precision.trained_dtype)
    unet.train()
    param_groups, lr_names = unet_param_groups(unet, args.learning_rate, recipe.unet_block_lrs)
    trained_encoders = []
    slots = models.family.text_encoders
    for i, (slot, text_encoder) in enumerate(zip(slots, text_encoders)):
        te_lr = text_encoder_lr(args, recipe, i)
        if not (recipe.train_text_encoder and recipe.stop_text_encoder_at != 0 and te_lr):
            continue
        text_encoder.to(precision.trained_dtype)
        text_encoder.requires_grad_(True)
        for module in text_encoder.modules():  # loaded embeddings stay as they are (--textual_inversion_embeddings)
            if isinstance(module, AddedTokenEmbedding) and (pivot is None or
                                                            not any(module is layer for layer in pivot.layers)):
                module.added.requires_grad_(False)
        text_encoder.train()
        if args.gradient_checkpointing:
            text_encoder.gradient_checkpointing_enable()
        param_groups.append({"params": [p for p in text_encoder.parameters() if p.requires_grad], "lr": te_lr})
        lr_names.append("textencoder" if len(slots) == 1 else f"textencoder{i + 1}")  # kohya's lr/ names
        trained_encoders.append(slot.component)
    if pivot is not None:  # the new vectors (of every encoder) train in their own group, at their own rate
        pivot_vectors = {id(p) for p in pivot.parameters}
        for group in param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in pivot_vectors]
        param_groups.append({"params": pivot.parameters, "lr": args.pivotal_lr})
        lr_names.append("textual_inversion")
    trainable = [p for g in param_groups for p in g["params"]]
    ema = None
    if args.use_ema:
        from library.ema import EMA

        ema = EMA(trainable, decay=args.ema_decay, device="cpu" if args.ema_cpu else None)

    # Optimizer
    optimizer, lr_scheduler = setup.build_optimization(args, start.optimizer, param_groups, max_train_steps,
                                                       accelerator)

    metadata = checkpoint_metadata(args, recipe, family, prediction, dataset, data_summary, start.seed,
                                   max_train_steps)
    task = FullModelTask(models, trained_text_encoders=trained_encoders, stop_text_encoder_at=recipe.stop_text_encoder_at,
                         save_as=fmt, save_dtype=setup.SAVE_DTYPES.get(args.save_precision), extras=extras,
                         source_metadata=source_metadata, metadata=metadata, ema=ema, pivot=pivot,
                         open_source=lambda: setup.open_base_model(args))
    config = setup.loop_config(args, start, family, max_train_steps, default_project=recipe.name)
    conditioner = setup.text_conditioner(args, models, pad_to_longest=recipe.pad_captions_to_longest)
    if setup.wants_text_encoder_cache(args):
        if trained_encoders or pivot is not None:
            raise SystemExit("error: --cache_text_encoder_outputs encodes the captions once, before training, so "
                             "the text encoders must stay frozen: leave out --train_text_encoder (or set both "
                             "text-encoder learning rates to 0) and --pivotal_token")
        conditioner = setup.cache_text_encoder_outputs(args, dataset, conditioner, models, accelerator,
                                                       keep_encoders=bool(prompts))
    trainer = Trainer(task=task, unet=unet, vae=models.vae, text_conditioner=conditioner,
                      dataset=dataset, batches=batches,
                      objective=DiffusionObjective(train_args.objective_config(args, prediction)),
                      optimizer=optimizer, lr_scheduler=lr_scheduler, config=config, accelerator=accelerator,
                      run_fingerprint=run_fingerprint(args, recipe, family, dataset, start.seed),
                      trainable_parameters=trainable, weight_dtype=precision.weight_dtype,
                      sampler=setup.make_sampler(args, prompts, models, start), lr_names=lr_names,
                      validator=setup.make_validator(args, dataset, start, accelerator))
    setup.run_trainer(trainer, args)
    return start.output_dir / (start.output_name + task.model_file_suffix())
