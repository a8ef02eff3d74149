"""Train a LoRA / LoCon network for Stable Diffusion 1.x / 2.x (kohya-ss/sd-scripts' interface; SDXL:
sdxl_train_network.py, the same recipe). Other network types by kohya's module names: --network_module
networks.lora_fa (LoRA-FA), networks.dylora (DyLoRA), networks.oft (OFT), or an external one (lycoris.kohya).

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
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from library import train_args  # noqa: E402
from library import training_setup as setup  # noqa: E402
from library.checkpoint_writer import modelspec_date, modelspec_keys  # noqa: E402
from library.diffusion_objective import DiffusionObjective  # noqa: E402
from library.families import ALL_UNET_INPUTS  # noqa: E402
from library.model_loading import SDModels, TextModelShim  # noqa: E402
from library.data_parallel import UnusedParameters  # noqa: E402
from networks.lora import AdapterNetwork, original_layout_lora_names, renamed_modules  # noqa: E402
from library.textual_inversion import (CaptionRewrite, bundle_tensors, embeddings_dir, expand_tokens,  # noqa: E402
                                       save_beside)
from library.training_metadata import additional_networks_hashes, run_metadata  # noqa: E402
from library.train_dataset import TrainingDataset, describe_samples  # noqa: E402
from library.training_loop import Trainer, micro_step_seed  # noqa: E402

logger = logging.getLogger("train_network")


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train_args.add_common_training_arguments(p, implemented=(train_args.TEXT_ENCODER_CACHE_FLAG,
                                                             train_args.FP8_BASE_FLAG))
    train_args.add_embedding_arguments(p)
    train_args.add_fused_step_arguments(p)
    train_args.add_fp8_base_arguments(p)
    g = p.add_argument_group("network")
    g.add_argument("--network_module", default="networks.lora",
                   help="networks.lora (LoRA / LoCon), networks.lora_fa (LoRA-FA), networks.dylora (DyLoRA), "
                        "networks.oft (OFT), or an external kohya-interface module (lycoris.kohya)")
    g.add_argument("--network_dim", type=int, default=None,
                   help="rank (networks.lora default: 4); networks.oft: the number of blocks")
    g.add_argument("--network_alpha", type=float, default=1.0,
                   help="scale = alpha / dim (kohya default 1); networks.oft: the constraint (e.g. 1e-3)")
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
    g.add_argument("--bundle_embeddings", action="store_true",
                   help="with --pivotal_token: the trained word inside the LoRA file (bundle_emb.*, read by WebUI "
                        "and ComfyUI; diffusers' load_lora_weights refuses such files) instead of beside it")
    g.add_argument("--save_lora_format", nargs="+", choices=["kohya", "diffusers"], default=["kohya"],
                   help="the layout(s) of the saved LoRA: kohya (WebUI, ComfyUI, kohya's tools; default) and/or "
                        "diffusers (PEFT lora_A / lora_B, what diffusers' training examples write). The first is "
                        "<output_name>.safetensors, another <output_name>_<format>.safetensors")
    train_args.add_text_encoder_cache_arguments(p)
    return p


# ----------------------------------------------------------------------------------------------------------
# The network as a training task


PIVOT_STATE_KEY = "pivotal_embedding"  # the first text encoder's vectors; "pivotal_embedding_2": SDXL's bigG


class LoRATask:
    def __init__(self, network, *, train_text_encoder: bool, save_dtype, save_model_as: str, metadata: dict,
                 scale_weight_norms: float | None = None, pivot=None, bundle_embeddings: bool = False,
                 save_formats: tuple[str, ...] = ("kohya",), models=None, unet_renames: dict[str, str] | None = None,
                 seed: int = 0):
        self.network = network
        self.seed = seed  # for the networks that draw something per step (DyLoRA's rank)
        self.drawn_rank: int | None = None
        # An external module's diffusers-path U-Net names -> kohya's names for this family (SDXL), applied on saving.
        self.unet_renames = unet_renames or {}
        self.save_formats = save_formats  # --save_lora_format: the first names <name>.<ext>, others <name>_<format>
        self.models = models  # for the diffusers layout's module paths
        self.trains_text_encoder_lora = train_text_encoder
        self.save_dtype = save_dtype
        self.save_model_as = save_model_as
        self.metadata = metadata
        self.scale_weight_norms = scale_weight_norms
        self.pivot = pivot  # a token trained in the same run (pivotal tuning), saved with the LoRA
        self.bundle_embeddings = bundle_embeddings  # in the LoRA file (bundle_emb.*) rather than beside it

    @property
    def train_text_encoder(self) -> bool:  # gradients must flow through the text encoder
        return self.trains_text_encoder_lora or (self.pivot is not None and self.pivot.training)

    def before_step(self, global_step: int) -> None:
        if self.pivot is not None:
            self.pivot.before_step(global_step)
        begin_step = getattr(self.network, "begin_step", None)
        if begin_step is not None:  # DyLoRA: this step's rank, from the run seed and the step (so resumes agree)
            self.drawn_rank = begin_step(micro_step_seed(self.seed, global_step, 0, "network"))

    def unused_parameters(self, text_conditioner) -> list[UnusedParameters]:
        """Why some trained parameters can get no gradient in a step (what DDP must know, data_parallel.py)."""
        unused = []
        if self.trains_text_encoder_lora and text_conditioner.skips_last_layer:
            unused.append(UnusedParameters("the LoRA of a text encoder's last layer, which the conditioning skips "
                                           "(--clip_skip; SDXL: the penultimate layer)", same_every_step=True))
        if not isinstance(self.network, AdapterNetwork):
            unused.append(UnusedParameters("an external --network_module's modules may skip themselves (module "
                                           "dropout)", same_every_step=False,
                                           same_on_every_process=False))
        elif getattr(self.network, "begin_step", None) is not None:
            unused.append(UnusedParameters("networks.dylora: a step trains only the unit of ranks it draws (the "
                                           "others have no gradient that step)", same_every_step=False,
                                           same_on_every_process=False))
        elif any(getattr(lora, "module_dropout", None) for lora in self.network.loras):  # OFT: none
            unused.append(UnusedParameters("--network_args module_dropout: a dropped module gets no gradient",
                                           same_every_step=False, same_on_every_process=False))
        if self.pivot is not None and self.pivot.train_steps is not None:
            unused.append(UnusedParameters("--pivotal_steps: the word stops training mid-run", same_every_step=False))
        return unused

    def after_optimizer_step(self) -> dict[str, float]:
        """--scale_weight_norms: max-norm regularisation after each step (logged as kohya does); DyLoRA's rank."""
        logs = {} if self.drawn_rank is None else {"dylora/rank": self.drawn_rank}
        if not self.scale_weight_norms:
            return logs
        scaled, mean_norm, max_norm = self.network.apply_max_norm_regularization(self.scale_weight_norms)
        return {**logs, "max_norm/keys_scaled": scaled, "max_norm/average_key_norm": mean_norm,
                "max_norm/max_key_norm": max_norm}

    def trainable_state(self):
        state = {k: v.detach().clone() for k, v in self.network.state_dict().items()}
        if self.pivot is not None:
            state.update(self.pivot.word.state(PIVOT_STATE_KEY))
        return state

    def load_trainable_state(self, state):
        state = dict(state)
        if self.pivot is not None:
            self.pivot.word.load_state(state, PIVOT_STATE_KEY)
            for key in self.pivot.word.state_keys(PIVOT_STATE_KEY):
                state.pop(key)
        self.network.load_state_dict(state)

    def model_file_suffix(self) -> str:
        return "." + self.save_model_as

    def _kohya_state(self) -> dict[str, torch.Tensor]:
        """The network's tensors under the names the kohya-layout file has."""
        state = self.network.state_dict()
        return renamed_modules(state, self.unet_renames) if self.unet_renames else state

    def _save_renamed(self, path: Path, metadata: dict) -> None:
        """An external module's file with kohya's U-Net names (what its own save_weights would write, renamed),
        written atomically."""
        from library.atomic_files import atomic_file
        from library.safetensors_io import save_tensors

        tensors = {k: v.detach().to("cpu", self.save_dtype if self.save_dtype is not None and v.is_floating_point()
                                    else v.dtype).contiguous() for k, v in self._kohya_state().items()}
        if self.save_model_as == "safetensors":
            save_tensors(path, tensors, metadata)
        else:
            with atomic_file(path) as tmp:
                torch.save(tensors, tmp)

    def _save_diffusers_layout(self, path: Path, metadata: dict) -> None:
        from library.safetensors_io import save_tensors
        from networks.lora_diffusers import diffusers_lora_state_dict

        models = self.models
        tensors = diffusers_lora_state_dict(self.network, models.text_encoders, models.unet,
                                            [slot.component for slot in models.family.text_encoders], self.save_dtype)
        # sshs_* are hashes of the kohya-layout tensors (WebUI's additional-networks extension); not of these.
        save_tensors(path, tensors, {k: v for k, v in metadata.items() if not k.startswith("sshs_")})

    def _format_paths(self, path_stem: Path) -> list[tuple[str, Path]]:
        return [(fmt, path_stem.with_name(path_stem.name + ("" if i == 0 else f"_{fmt}") + self.model_file_suffix()))
                for i, fmt in enumerate(self.save_formats)]

    def model_paths(self, path_stem: Path) -> list[Path]:
        paths = [path for _, path in self._format_paths(path_stem)]
        return paths + ([embeddings_dir(path_stem)] if self.pivot is not None and not self.bundle_embeddings else [])

    def save_model(self, path_stem: Path, *, epoch: int, global_step: int) -> Path:
        path = self._format_paths(path_stem)[0][1]
        metadata = dict(self.metadata, ss_epoch=str(epoch), ss_steps=str(global_step),
                        ss_training_finished_at=str(time.time()))
        metadata["modelspec.date"] = modelspec_date()  # when this file is written, not when the run began
        if self.save_model_as == "safetensors":
            metadata.update(additional_networks_hashes(self._kohya_state(), self.save_dtype, metadata))
        bundle = {}
        if self.pivot is not None and self.bundle_embeddings:  # inside the LoRA: WebUI and ComfyUI read it there
            bundle = bundle_tensors(self.pivot.word)
        for fmt, file in self._format_paths(path_stem):
            if fmt == "kohya" and self.unet_renames:
                self._save_renamed(file, metadata)
            elif fmt == "kohya":
                self.network.save_weights(file, self.save_dtype,
                                          metadata if self.save_model_as == "safetensors" else None,
                                          **({"extra_tensors": bundle} if bundle else {}))  # external modules lack it
            else:
                self._save_diffusers_layout(file, metadata)
        if self.pivot is not None and not self.bundle_embeddings:
            save_beside(path_stem, self.pivot, step=global_step, metadata=metadata)
        logger.info("saved %s", path)
        return path


def lora_metadata(args, family, prediction_type, dataset: TrainingDataset, seed: int, max_train_steps: int,
                  network_args: dict, data_summary: dict) -> dict[str, str]:
    """kohya's ss_* training metadata (all strings) plus modelspec for the LoRA."""
    v = prediction_type.value == "v_prediction"
    resolution = "{}x{}".format(*train_args.parse_resolution(args.resolution, family.default_resolution))
    base = {
        "ss_network_module": args.network_module, "ss_network_dim": str(args.network_dim or 4),
        "ss_network_alpha": str(args.network_alpha), "ss_network_args": json.dumps(network_args),
        "ss_v2": str(family.is_v2), "ss_base_model_version": family.ss_base_model_version + ("" if not v or
                                                                                              family.is_v2 else "_v"),
        **modelspec_keys(family, prediction_type, kind="lora", implementation="diffusers", resolution=resolution),
        "modelspec.title": args.output_name or "last",
    }
    if args.no_metadata:
        return base
    base.update(run_metadata(args, dataset=dataset, data_summary=data_summary, seed=seed,
                             max_train_steps=max_train_steps, resolution=resolution))
    base.update({"ss_unet_lr": str(args.unet_lr), "ss_text_encoder_lr": str(args.text_encoder_lr),
                 "ss_network_dropout": str(args.network_dropout),
                 "ss_fp8_base": str(bool(getattr(args, "fp8_base", False))),
                 "ss_fp8_base_unet": str(bool(getattr(args, "fp8_base_unet", False)))})
    return base


# ----------------------------------------------------------------------------------------------------------


# kohya's split: this script trains SD 1.x / 2.x, sdxl_train_network.py SDXL (with the same flags and a few more).
TRAINS = setup.TrainedArchs("train_network.py", setup.SD_ARCHS, elsewhere=(("sdxl", "sdxl_train_network.py"),),
                            inputs=ALL_UNET_INPUTS)


def train(args: argparse.Namespace, trains: setup.TrainedArchs = TRAINS, *,
          before_data: Callable[[SDModels, setup.RunStart], None] | None = None) -> Path:
    """`before_data`: work with the loaded base models before the dataset is scanned (train_dreambooth_lora_sdxl.py:
    generate missing class images)."""
    start = setup.begin_run(args)
    if args.network_train_unet_only and args.network_train_text_encoder_only:
        raise SystemExit("error: --network_train_unet_only and --network_train_text_encoder_only exclude each other; "
                         "give at most one (with neither, both the U-Net and the text encoder are trained)")
    if args.dim_from_weights and not args.network_weights:
        raise SystemExit("error: --dim_from_weights takes the ranks from --network_weights: give --network_weights "
                         "FILE, or drop --dim_from_weights")
    if args.network_weights and not Path(args.network_weights).is_file():
        raise SystemExit(f"error: --network_weights {args.network_weights}: no such file; check the path")
    network_kwargs = network_kwargs_from(args.network_args)
    module = import_network_module(args.network_module)
    # Our modules (networks.lora, lora_fa, dylora, oft) name their modules as kohya's files do and say which file
    # layout they write; an external kohya-interface module (lycoris.kohya) has no FILE_LAYOUT.
    layout = getattr(module, "FILE_LAYOUT", None)
    if setup.wants_text_encoder_cache(args) and (not args.network_train_unet_only or args.pivotal_token):
        raise SystemExit("error: --cache_text_encoder_outputs encodes the captions once, before training, so the "
                         "text encoders must stay frozen: add --network_train_unet_only"
                         + (" and drop --pivotal_token" if args.pivotal_token else ""))
    if "diffusers" in args.save_lora_format and (layout != "lora" or args.save_model_as != "safetensors" or
                                                 args.bundle_embeddings):
        raise SystemExit("error: --save_lora_format diffusers writes a LoRA's modules (networks.lora, lora_fa or "
                         "dylora) as a .safetensors file without bundled embeddings: use one of those "
                         "--network_module values and the default --save_model_as, and leave out --bundle_embeddings")
    if args.bundle_embeddings and (not args.pivotal_token or layout is None):
        raise SystemExit("error: --bundle_embeddings puts the --pivotal_token word inside the network file: give "
                         "--pivotal_token, with one of this suite's --network_module values (networks.lora, lora_fa, "
                         "dylora, oft)")

    # Models
    checkpoint = setup.read_base_model(args, trains)
    family, prediction = checkpoint.family, checkpoint.prediction_type
    prompts = setup.load_sample_prompts(args, family)
    accelerator = setup.make_accelerator(args)
    start = setup.same_seed_everywhere(start, accelerator)
    setup.check_fused_step(args, start, accelerator)  # before the models load (it depends on the process count)
    models, precision = setup.load_models(args, checkpoint, accelerator)
    unet, text_encoders, vae = models.unet, models.text_encoders, models.vae
    added_tokens, pivot = setup.add_embeddings(args, models, precision)

    # Data
    if before_data is not None and accelerator.is_main_process:
        before_data(models, start)
    accelerator.wait_for_everyone()
    dataset, data_summary = setup.build_dataset(args, family, start.seed, unet_in_channels=unet.config.in_channels)
    if added_tokens:
        dataset.caption_rewrite = CaptionRewrite(added_tokens)  # a token string stands for all its vectors
        prompts = [replace(p, prompt=expand_tokens(p.prompt, added_tokens)) for p in prompts]
    batches = setup.epoch_batches(dataset, start.seed, accelerator)
    if args.debug_dataset:
        print("\n".join(describe_samples(dataset, batches)))
        return start.output_dir / (start.output_name + "." + args.save_model_as)
    setup.check_pivotal_token(args, dataset)
    max_train_steps = setup.count_steps(args, dataset, batches)
    setup.cache_latents(args, dataset, vae, precision, accelerator)

    if args.base_weights:
        merge_base_weights(args, text_encoders, unet)
    text_conditioner = setup.cache_text_encoder_outputs(args, dataset, setup.text_conditioner(args, models), models,
                                                        accelerator, keep_encoders=bool(prompts))
    setup.store_base_in_float8(args, models, precision)  # the base is final; the network wraps it next

    # Network (its initial weights come from torch's global generator: seed it so runs repeat exactly)
    torch.manual_seed(start.seed)
    # External kohya-interface modules (e.g. lycoris.kohya) name text-encoder modules from the model's own module
    # paths; transformers 5 dropped the `text_model.` level that every LoRA loader expects in those names. kohya's
    # modules take one text encoder, or SDXL's two as a list.
    # They also name U-Net modules by diffusers' paths, where kohya's SDXL files use the original layout: the file's
    # U-Net names are translated on saving and on reading --network_weights (`unet_renames`; empty for SD 1.x / 2.x).
    external = layout is None
    shown = [TextModelShim(te) for te in text_encoders] if external else text_encoders
    network_te = shown[0] if len(shown) == 1 else shown
    unet_renames = original_layout_lora_names(unet) if external else {}
    try:
        if args.dim_from_weights:
            try:
                weights = {"weights_sd": external_weights(args.network_weights, unet_renames)} if unet_renames else {}
                network, _ = module.create_network_from_weights(1.0, args.network_weights, vae, network_te, unet,
                                                                **weights, **network_kwargs)
            except ValueError as e:
                raise _weights_error(args, e) from None
        else:
            network = module.create_network(1.0, args.network_dim, args.network_alpha, vae, network_te, unet,
                                            neuron_dropout=args.network_dropout, **network_kwargs)
        network.apply_to(network_te, unet, apply_text_encoder=not args.network_train_unet_only,
                         apply_unet=not args.network_train_text_encoder_only)
        if args.network_weights:
            try:
                if unet_renames:
                    info = network.load_state_dict(external_weights(args.network_weights, unet_renames), strict=False)
                else:
                    info = network.load_weights(args.network_weights)
            except ValueError as e:
                raise _weights_error(args, e) from None
            logger.info("loaded network weights %s: %s", args.network_weights, info)
    except (ValueError, NotImplementedError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    if args.scale_weight_norms and not hasattr(network, "apply_max_norm_regularization"):
        raise SystemExit(f"error: --scale_weight_norms rescales a network's low-rank updates; --network_module "
                         f"{args.network_module} has none to rescale (networks.oft's rotations are bounded by "
                         "--network_alpha, its constraint, instead): leave the flag out")
    network.to(accelerator.device)
    network.to(precision.trained_dtype)  # fp32 unless --full_fp16 / --full_bf16 (the optimizer then steps halves)
    try:
        param_groups, group_names = network.prepare_optimizer_params(
            text_encoder_lr(args, len(text_encoders), per_encoder=not external),
            args.unet_lr, args.learning_rate)
    except ValueError as e:
        raise SystemExit(f"error: --text_encoder_lr: {e}") from None
    # A text-encoder LoRA with learning rate 0 stays applied but frozen (prepare_optimizer_params decides).
    train_text_encoder = any(p.requires_grad for lora in network.text_encoder_loras for p in lora.parameters())
    if pivot is not None:
        param_groups.append({"params": pivot.parameters, "lr": args.pivotal_lr})  # every encoder's vectors
        group_names.append("textual_inversion")
    if (train_text_encoder or pivot is not None) and args.gradient_checkpointing:
        for text_encoder in text_encoders:
            text_encoder.gradient_checkpointing_enable()
            text_encoder.train()

    # Optimizer. With several processes the loop has DDP average the network's gradients (the network is applied by
    # patching the base models and never called itself: library/data_parallel.py says how DDP still sees them).
    optimizer, lr_scheduler = setup.build_optimization(args, start.optimizer, param_groups, max_train_steps,
                                                       accelerator)

    metadata = lora_metadata(args, family, prediction, dataset, start.seed, max_train_steps, network_kwargs,
                             data_summary)
    task = LoRATask(network, train_text_encoder=train_text_encoder, save_dtype=setup.SAVE_DTYPES.get(args.save_precision),
                    save_model_as=args.save_model_as, metadata=metadata,
                    scale_weight_norms=args.scale_weight_norms, pivot=pivot,
                    bundle_embeddings=args.bundle_embeddings, save_formats=tuple(dict.fromkeys(args.save_lora_format)),
                    models=models, unet_renames=unet_renames, seed=start.seed)
    trainer = Trainer(task=task, unet=unet, vae=vae, text_conditioner=text_conditioner,
                      dataset=dataset, batches=batches, objective=DiffusionObjective(
                          train_args.objective_config(args, prediction)),
                      optimizer=optimizer, lr_scheduler=lr_scheduler, accelerator=accelerator,
                      config=setup.loop_config(args, start, family, max_train_steps, default_project="network_train"),
                      run_fingerprint=run_fingerprint(args, family, dataset, start.seed),
                      trainable_parameters=[p for g in param_groups for p in g["params"]],
                      weight_dtype=precision.weight_dtype, sampler=setup.make_sampler(args, prompts, models, start),
                      sample_trainable=task.network, lr_names=group_names,
                      validator=setup.make_validator(args, dataset, start, accelerator))
    setup.run_trainer(trainer, args)
    return start.output_dir / (start.output_name + task.model_file_suffix())


def text_encoder_lr(args, n_encoders: int, *, per_encoder: bool = True) -> float | list[float] | None:
    """--text_encoder_lr: one value for every text encoder, or (SDXL) one per encoder, as kohya reads it.
    `per_encoder` False: the network module takes a single rate (external modules such as lycoris.kohya put the
    value straight into one param group, where a list would fail only at the first optimizer step)."""
    lrs = args.text_encoder_lr or []
    if len(lrs) > max(n_encoders, 1):
        raise SystemExit(f"error: --text_encoder_lr {' '.join(map(str, lrs))}: this model has {n_encoders} text "
                         f"encoder(s); give one value{', or one per encoder' if n_encoders > 1 else ''}")
    if len(set(lrs)) > 1 and not per_encoder:
        raise SystemExit(f"error: --text_encoder_lr {' '.join(map(str, lrs))}: --network_module "
                         f"{args.network_module} takes one learning rate for all text encoders; give one value (or "
                         "use networks.lora, which takes one per encoder)")
    return lrs[0] if len(set(lrs)) == 1 else (lrs or None)


def import_network_module(name: str):
    """--network_module, imported before any model is loaded, so a misspelt name fails at once."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and name.startswith(e.name):
            raise SystemExit(f"error: --network_module {name}: no such module (this suite's: networks.lora, "
                             "networks.lora_fa, networks.dylora, networks.oft; or an installed kohya-interface "
                             "module such as lycoris.kohya)") from None
        raise


def network_kwargs_from(pairs: list[str] | None) -> dict[str, str]:
    """`--network_args key=value ...` as a dict of strings (the network module types and checks the values)."""
    kwargs = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"error: --network_args {pair!r}: expected key=value (e.g. conv_dim=4)")
        kwargs[key.strip()] = value
    return kwargs


def external_weights(path: str, unet_renames: dict[str, str]) -> dict[str, torch.Tensor]:
    """--network_weights for an external module whose U-Net names differ from the file's (kohya's SDXL names): the
    file's tensors under the module's own names."""
    from library.tensor_files import CheckpointError, open_tensor_file

    back = {kohya: ours for ours, kohya in unet_renames.items()}
    try:
        with open_tensor_file(path) as source:  # any tensor layout: the module checks its own names
            tensors = {name: lazy.load() for name, lazy in source.tensors.items()}
    except CheckpointError as e:
        raise SystemExit(f"error: --network_weights {path}: {e}") from None
    return renamed_modules(tensors, back)


def _weights_error(args, error: Exception) -> SystemExit:
    """--network_weights that do not fit the network: the loader's message (keys and shapes) and what to do."""
    if args.dim_from_weights:
        advice = ("With --dim_from_weights the ranks already come from the file, so its layers do not match this "
                  "base model: it is a LoRA for another base model family (e.g. SD 1.x vs SDXL). Train on that "
                  "base model, or start without --network_weights.")
    else:
        advice = ("If it is a LoRA for this base model with another rank, add --dim_from_weights (or give the "
                  "--network_dim / --network_args conv_dim it was trained with); a LoRA for another base model "
                  "family (e.g. SD 1.x vs SDXL) cannot be loaded: use the matching "
                  "--pretrained_model_name_or_path, or start without --network_weights.")
    return SystemExit(f"error: --network_weights {args.network_weights}: {error}\n  {advice}")


def merge_base_weights(args, text_encoders: list, unet) -> None:
    import networks.lora as lora

    try:
        lora.merge_weight_files(args.base_weights, args.base_weights_multiplier, text_encoders, unet)
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
            "learning_rate": args.learning_rate, **_embedding_fingerprint(args), **setup.fused_step_fingerprint(args),
            **setup.float8_fingerprint(args)}


def _embedding_fingerprint(args) -> dict:
    """Only when embeddings are in play, so that states of runs without them keep their fingerprint."""
    if not (args.pivotal_token or args.textual_inversion_embeddings):
        return {}
    return {"pivotal_token": args.pivotal_token, "pivotal_num_vectors": args.pivotal_num_vectors,
            "textual_inversion_embeddings": [Path(f).name for f in args.textual_inversion_embeddings or []]}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = train_args.parse_args(setup_parser(), argv)
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
