"""Train a ControlNet for Stable Diffusion 1.x / 2.x (kohya's train_control_net.py and the diffusers
train_controlnet.py example, both interfaces).

    accelerate launch train_controlnet.py --pretrained_model_name_or_path model.safetensors \\
        --train_data_dir images --conditioning_data_dir edges --output_dir out --output_name my_controlnet \\
        --resolution 512 --learning_rate 1e-5 --max_train_steps 10000 --train_batch_size 4 \\
        --validation_image edges/0001.png --validation_prompt "a red house" --validation_steps 500

Data: `--train_data_dir` images with captions + `--conditioning_data_dir` same-stem conditioning images (kohya),
`--dataset_name` a local dataset (an image folder whose `metadata.jsonl` names the image, the conditioning image and
the caption, parquet files in the hub layout, or a `save_to_disk` folder; `--image_column`,
`--conditioning_image_column`, `--caption_column`: the diffusers example), or the dataset TOML.
The conditioning image gets exactly the photo's resize, crop and flip. The base model is frozen; the ControlNet
starts from the base U-Net (or `--controlnet_model_name_or_path`) and is saved as a diffusers folder and/or a
single `.safetensors` in the original ControlNet layout (WebUI ControlNet extension, ComfyUI).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from library import train_args  # noqa: E402
from library import training_setup as setup  # noqa: E402
from library.controlnet_training import (SAVE_LAYOUTS, ControlNetTask, ControlNetValidator,  # noqa: E402
                                         controlnet_param_groups, pair_validation)
from library.dataset_sources import ConditioningUse  # noqa: E402
from library.diffusion_objective import DiffusionObjective  # noqa: E402
from library.train_dataset import describe_samples  # noqa: E402
from library.training_loop import Trainer, latest_state  # noqa: E402
from library.training_metadata import run_metadata  # noqa: E402

logger = logging.getLogger("train_controlnet")


def setup_parser(*, control_net_lr: float | None = None) -> argparse.ArgumentParser:
    """`control_net_lr`: the default of --control_net_lr (sdxl_train_control_net.py: kohya's 1e-4)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train_args.add_common_training_arguments(p, implemented=(train_args.TEXT_ENCODER_CACHE_FLAG,
                                                             train_args.FP8_BASE_FLAG))
    train_args.add_text_encoder_cache_arguments(p)
    train_args.add_fused_step_arguments(p)  # a ControlNet is a third of an SD U-Net, half an SDXL one
    train_args.add_fp8_base_arguments(p)  # the base U-Net (and text encoders) stay frozen
    g = p.add_argument_group("ControlNet")
    g.add_argument("--controlnet_model_name_or_path", default=None,
                   help="start from this ControlNet (diffusers folder or original-layout file) instead of the U-Net")
    g.add_argument("--control_net_lr", type=float, default=control_net_lr,
                   help="learning rate of the modules a ControlNet adds (conditioning-image encoder, zero "
                        "convolutions); the copied U-Net encoder then trains at --learning_rate (kohya's "
                        "sdxl_train_control_net.py meaning). Default: " +
                        ("everything at --learning_rate" if control_net_lr is None else f"{control_net_lr:g}"))
    g.add_argument("--save_model_as", choices=SAVE_LAYOUTS, default="both",
                   help="both (default): <name>.safetensors (the single file WebUI's ControlNet extension and ComfyUI "
                        "load: the original layout for SD 1.x / 2.x, diffusers names for SDXL) and <name>_diffusers/; "
                        "or one of them")
    g.add_argument("--dataset_name", default=None, help="a local dataset (diffusers example): an image folder with "
                   "metadata.jsonl / .csv, a .parquet file or a folder of them (hub layout), or a save_to_disk "
                   "folder (extracted once to .sdtrain_extracted/); hub names cannot be downloaded here")
    g.add_argument("--image_column", default="image")
    g.add_argument("--conditioning_image_column", default="conditioning_image")
    g.add_argument("--validation_image", nargs="+", default=None)
    g.add_argument("--validation_prompt", nargs="+", default=None)
    g.add_argument("--validation_steps", type=int, default=100)
    g.add_argument("--num_validation_images", type=int, default=4)
    g.add_argument("--validation_inference_steps", type=int, default=20)
    d = p.add_argument_group("diffusers train_controlnet.py names (aliases of the flags above)")
    d.add_argument("--num_train_epochs", dest="max_train_epochs", type=int, default=argparse.SUPPRESS)
    d.add_argument("--proportion_empty_prompts", dest="caption_dropout_rate", type=float, default=argparse.SUPPRESS)
    d.add_argument("--enable_xformers_memory_efficient_attention", dest="xformers", action="store_true",
                   default=argparse.SUPPRESS)
    d.add_argument("--tracker_project_name", dest="log_tracker_name", default=argparse.SUPPRESS)
    d.add_argument("--report_to", dest="log_with", choices=["tensorboard", "wandb", "all"], default=argparse.SUPPRESS)
    d.add_argument("--checkpointing_steps", type=int, default=None,
                   help="save the ControlNet and the training state every N steps")
    d.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep only the newest N checkpoints")
    d.add_argument("--resume_from_checkpoint", default=None, help="a state folder, or 'latest' in --output_dir")
    d.add_argument("--set_grads_to_none", action="store_true",
                   help="accepted: gradients are always freed (set to None) after each step")
    return p


def diffusers_example_flags(args: argparse.Namespace) -> argparse.Namespace:
    """The diffusers example's conventions mapped onto the shared flags, once, right after parsing."""
    values = vars(args).copy()
    if args.dataset_name:
        if args.train_data_dir:
            raise SystemExit("error: --dataset_name and --train_data_dir name the same thing; give one")
        from library.hf_datasets import Columns, DatasetSourceError, image_folder_for

        # A parquet / save_to_disk dataset becomes an image folder with metadata.jsonl (extracted once, reused while
        # the source is unchanged); an image folder is used as it is.
        columns = Columns(image=args.image_column, conditioning_image=args.conditioning_image_column,
                          caption=args.caption_column)
        try:
            values["train_data_dir"] = str(image_folder_for(Path(args.dataset_name), columns))
        except DatasetSourceError as e:
            raise SystemExit(f"error: --dataset_name {args.dataset_name}: {e}") from None
    if args.log_with and not args.logging_dir:
        values["logging_dir"] = str(Path(args.output_dir) / "logs")  # the example's default
    if args.checkpointing_steps:
        values["save_every_n_steps"] = args.checkpointing_steps
        values["save_state"] = True
        if args.checkpoints_total_limit:
            # kohya's --save_last_n_steps keeps the saves of the last N steps: with a save every K steps, the
            # newest `limit` saves are those of the last (limit - 1) * K steps.
            values["save_last_n_steps"] = (args.checkpoints_total_limit - 1) * args.checkpointing_steps
    elif args.checkpoints_total_limit:
        raise SystemExit("error: --checkpoints_total_limit needs --checkpointing_steps")
    if args.resume_from_checkpoint:
        values["resume"] = latest_state(Path(args.output_dir)) if args.resume_from_checkpoint == "latest" \
            else args.resume_from_checkpoint
    return argparse.Namespace(**values)


def initial_controlnet(args, checkpoint, family):
    """From --controlnet_model_name_or_path (any layout, family checked), or the base U-Net's encoder in fp32
    (ControlNetModel.from_unet: read before the U-Net is cast to the training precision)."""
    from diffusers import ControlNetModel

    from library.controlnet_checkpoint import load_controlnet
    from library.model_loading import instantiate_component

    if args.controlnet_model_name_or_path:
        try:
            return load_controlnet(args.controlnet_model_name_or_path, family=family,
                                   base_unet_config=checkpoint.configs.unet,
                                   allow_unsafe_pickle=args.allow_unsafe_pickle)
        except (ValueError, OSError) as e:  # CheckpointError (a ValueError) names the key or the problem
            raise SystemExit(f"error: --controlnet_model_name_or_path {args.controlnet_model_name_or_path}: {e}") \
                from None
    unet = instantiate_component(checkpoint, "unet", dtype=torch.float32)
    # from_unet copies the encoder and zeroes the zero convolutions, but initialises the conditioning embedding
    # (hint block) randomly: a fixed seed makes that start the same in every run.
    torch.manual_seed(0)
    return ControlNetModel.from_unet(unet)


TRAINS = setup.TrainedArchs("train_controlnet.py", setup.SD_ARCHS, elsewhere=(("sdxl", "sdxl_train_control_net.py"),))


def train(args: argparse.Namespace, trains: setup.TrainedArchs = TRAINS) -> Path:
    start = setup.begin_run(args, control_images=True)
    if args.sample_prompts:
        raise SystemExit("error: --sample_prompts: ControlNet samples need a conditioning image; use "
                         "--validation_image and --validation_prompt")
    if not (args.conditioning_data_dir or args.dataset_name or args.dataset_config):
        raise SystemExit("error: ControlNet training needs conditioning images: --conditioning_data_dir (same-stem "
                         "images beside --train_data_dir's), --dataset_name (a local dataset naming both images) or a "
                         "--dataset_config with conditioning_data_dir subsets")
    try:
        pairs = pair_validation(args.validation_image, args.validation_prompt)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None

    # Models: the base frozen, the ControlNet trained
    checkpoint = setup.read_base_model(args, trains)
    family, prediction = checkpoint.family, checkpoint.prediction_type
    accelerator = setup.make_accelerator(args)
    start = setup.same_seed_everywhere(start, accelerator)
    setup.check_fused_step(args, start, accelerator)
    with checkpoint:
        controlnet = initial_controlnet(args, checkpoint, family)
        models, precision = setup.load_models(args, checkpoint, accelerator)
    controlnet.to(accelerator.device)
    if controlnet.dtype != precision.trained_dtype:
        controlnet.to(precision.trained_dtype)
    controlnet.requires_grad_(True)
    controlnet.train()
    if args.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
    if (compile_settings := setup.compile_settings(args)) is not None:  # --torch_compile, as load_models' models
        compile_settings.apply(controlnet, what="ControlNet")

    # Data: the conditioning image of each photo, aligned with it
    extra = {}
    if args.dataset_name:
        extra = {"image_column": args.image_column, "conditioning_image_column": args.conditioning_image_column}
    dataset, data_summary = setup.build_dataset(args, family, start.seed, extra_options=extra,
                                                conditioning_use=ConditioningUse.CONTROL)
    unpaired = [i.record.path.name for i in dataset.items if i.record.conditioning is None]
    if unpaired:
        raise SystemExit(f"error: {len(set(unpaired))} image(s) have no conditioning image: "
                         f"{', '.join(sorted(set(unpaired))[:5])}; give --conditioning_data_dir (or the "
                         "conditioning_data_dir of every dataset-config subset)")
    batches = setup.epoch_batches(dataset, start.seed, accelerator)
    if args.debug_dataset:
        print("\n".join(describe_samples(dataset, batches)))
        return start.output_dir / start.output_name
    max_train_steps = setup.count_steps(args, dataset, batches)
    setup.cache_latents(args, dataset, models.vae, precision, accelerator)
    # The text encoders are frozen: their outputs can be cached; validation images still need them.
    text_conditioner = setup.cache_text_encoder_outputs(args, dataset, setup.text_conditioner(args, models), models,
                                                        accelerator, keep_encoders=bool(pairs))
    setup.store_base_in_float8(args, models, precision)  # after caching: the cache holds full-precision outputs

    # Optimizer
    param_groups, lr_names = controlnet_param_groups(controlnet, learning_rate=args.learning_rate,
                                                     control_net_lr=args.control_net_lr)
    optimizer, lr_scheduler = setup.build_optimization(args, start.optimizer, param_groups, max_train_steps,
                                                       accelerator)

    resolution = train_args.parse_resolution(args.resolution, family.default_resolution)
    metadata = {"modelspec.resolution": "{}x{}".format(*resolution), "ss_training_script": Path(trains.script).stem,
                "ss_control_net_lr": str(param_groups[0]["lr"])}
    metadata.update(run_metadata(args, dataset=dataset, data_summary=data_summary, seed=start.seed,
                                 max_train_steps=max_train_steps, resolution=metadata["modelspec.resolution"]))
    task = ControlNetTask(controlnet, models.unet, family=family, save_as=args.save_model_as,
                          save_dtype=setup.SAVE_DTYPES.get(args.save_precision), metadata=metadata)
    config = setup.loop_config(args, start, family, max_train_steps, default_project=Path(trains.script).stem)
    validator = None
    if pairs:
        validator = ControlNetValidator(pairs, models=models, controlnet=controlnet, output_dir=start.output_dir,
                                        output_name=start.output_name, resolution=resolution,
                                        num_images=args.num_validation_images,
                                        steps=args.validation_inference_steps, seed=start.seed,
                                        sampler=args.sample_sampler)
        config = replace(config, sample_every_n_steps=args.validation_steps)
    fingerprint = {"family": family.name, "seed": start.seed, "train_batch_size": args.train_batch_size,
                   "gradient_accumulation_steps": args.gradient_accumulation_steps,
                   "optimizer_type": start.optimizer.optimizer_type,
                   "learning_rates": [group["lr"] for group in param_groups],
                   **setup.fused_step_fingerprint(args), **setup.float8_fingerprint(args),
                   "dataset_items": hashlib.sha256("\n".join(f"{i.record.path}|{i.record.conditioning}|{i.bucket}"
                                                             for i in dataset.items).encode()).hexdigest()[:16]}
    trainer = Trainer(task=task, unet=models.unet, vae=models.vae, text_conditioner=text_conditioner,
                      dataset=dataset, batches=batches,
                      objective=DiffusionObjective(train_args.objective_config(args, prediction)),
                      optimizer=optimizer, lr_scheduler=lr_scheduler, config=config, accelerator=accelerator,
                      run_fingerprint=fingerprint, trainable_parameters=list(controlnet.parameters()),
                      weight_dtype=precision.weight_dtype, sampler=validator, sample_trainable=controlnet,
                      lr_names=lr_names, validator=setup.make_validator(args, dataset, start, accelerator))
    setup.run_trainer(trainer, args)
    return start.output_dir / (start.output_name + task.model_file_suffix())


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = diffusers_example_flags(train_args.parse_args(setup_parser(), argv))
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
