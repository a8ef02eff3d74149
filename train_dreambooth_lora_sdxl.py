"""DreamBooth LoRA for SDXL with the flags of diffusers' examples/dreambooth/train_dreambooth_lora_sdxl.py, trained by
sdxl_train_network.py's recipe (so a diffusers user switches without relearning).

    accelerate launch train_dreambooth_lora_sdxl.py --pretrained_model_name_or_path sdxl-base-folder \\
        --instance_data_dir dog --instance_prompt "a photo of sks dog" --output_dir lora-trained-xl \\
        --resolution 1024 --train_batch_size 1 --gradient_accumulation_steps 4 --learning_rate 1e-4 \\
        --lr_scheduler constant --lr_warmup_steps 0 --max_train_steps 500 --mixed_precision bf16 \\
        --validation_prompt "a photo of sks dog in a bucket" --validation_epochs 25 --seed 0

The output is `<output_dir>/pytorch_lora_weights.safetensors` in diffusers' layout (`pipe.load_lora_weights(
output_dir)`), and with `--output_kohya_format` also `pytorch_lora_weights_kohya.safetensors` for WebUI / ComfyUI,
as the example writes them. The flags are translated once into sdxl_train_network.py's (the translation is logged,
and the dataset is written as `<output_dir>/dataset_from_flags.toml`, kohya's dataset format), so everything
below the command line is the shared recipe. Where the two differ:
- The LoRA covers kohya's module set (attention, feed-forward and projection layers of the transformer blocks), a
  superset of the example's attention-only layers; `--rank` is its rank, with alpha = rank (scale 1) as there.
- Prior preservation mixes class images into the batches with `--prior_loss_weight` (kohya's way) rather than
  pairing one class image with each instance image; missing class images are generated into --class_data_dir.
- Validation images are sample images: `--num_validation_images` seeds of `--validation_prompt` every
  `--validation_epochs` epochs, saved under `<output_dir>/sample/` and logged.
- Models and datasets are local paths (nothing is downloaded); flags about the hub, model variants or other
  trainers' features (`--push_to_hub`, `--variant`, `--use_dora`, `--do_edm_style_training`, ...) are refused by name.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sdxl_train_network  # noqa: E402
import train_network  # noqa: E402
from library import train_args  # noqa: E402

logger = logging.getLogger("train_dreambooth_lora_sdxl")

DIFFUSERS_FILE = "pytorch_lora_weights"


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--pretrained_model_name_or_path", required=True, help="a local diffusers folder or single file")
    a("--pretrained_vae_model_name_or_path", default=None, help="a separate VAE (e.g. the fp16-fix SDXL VAE)")
    a("--dataset_name", default=None, help="a local image folder with metadata.jsonl / metadata.csv")
    a("--image_column", default="image")
    a("--caption_column", default=None, help="captions from this metadata column (default: --instance_prompt)")
    a("--instance_data_dir", default=None)
    a("--instance_prompt", required=True)
    a("--repeats", type=int, default=1)
    a("--class_data_dir", default=None)
    a("--class_prompt", default=None)
    a("--with_prior_preservation", action="store_true")
    a("--prior_loss_weight", type=float, default=1.0)
    a("--num_class_images", type=int, default=100)
    a("--sample_batch_size", type=int, default=4, help="class images generated per batch")
    a("--validation_prompt", default=None)
    a("--num_validation_images", type=int, default=4)
    a("--validation_epochs", type=int, default=50)
    a("--output_dir", default="lora-dreambooth-model")
    a("--output_kohya_format", action="store_true")
    a("--seed", type=int, default=None)
    a("--resolution", type=int, default=1024)
    a("--center_crop", action="store_true")
    a("--random_flip", action="store_true")
    a("--train_text_encoder", action="store_true")
    a("--train_batch_size", type=int, default=4)
    a("--num_train_epochs", type=int, default=1)
    a("--max_train_steps", type=int, default=None)
    a("--checkpointing_steps", type=int, default=500)
    a("--checkpoints_total_limit", type=int, default=None)
    a("--resume_from_checkpoint", default=None, help="a state folder, or 'latest' in --output_dir")
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--gradient_checkpointing", action="store_true")
    a("--learning_rate", type=float, default=1e-4)
    a("--text_encoder_lr", type=float, default=5e-6)
    a("--scale_lr", action="store_true")
    a("--lr_scheduler", default="constant")
    a("--snr_gamma", type=float, default=None)
    a("--lr_warmup_steps", type=int, default=500)
    a("--lr_num_cycles", type=int, default=1)
    a("--lr_power", type=float, default=1.0)
    a("--dataloader_num_workers", type=int, default=0)
    a("--optimizer", default="AdamW", help="AdamW or prodigy")
    a("--use_8bit_adam", action="store_true")
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=1e-4)
    a("--adam_epsilon", type=float, default=1e-8)
    a("--max_grad_norm", type=float, default=1.0)
    a("--logging_dir", default="logs", help="relative to --output_dir, as in the example")
    a("--report_to", default="tensorboard", choices=["tensorboard", "wandb", "all"])
    a("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    a("--enable_xformers_memory_efficient_attention", action="store_true")
    a("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere+ GPUs (no effect on a CPU)")
    a("--rank", type=int, default=4)
    a("--local_rank", type=int, default=-1, help="set by the launcher")
    refused = p.add_argument_group("the example's flags this suite does not implement (refused when given)")
    for flag in REFUSED:
        refused.add_argument(flag, default=None, nargs="?", const=True, help=argparse.SUPPRESS)
    return p


# The example's flags that cannot work here, and why (refused by name rather than parsed and ignored).
REFUSED = {
    "--revision": "models are local paths; pick the folder of the revision you want",
    "--variant": "model variants (fp16 file sets) are not read; convert the model or give the folder",
    "--cache_dir": "nothing is downloaded, so there is no download cache",
    "--dataset_config_name": "hub dataset configurations are not read; give a local image folder",
    "--push_to_hub": "nothing is uploaded from this suite",
    "--hub_token": "nothing is uploaded from this suite",
    "--hub_model_id": "nothing is uploaded from this suite",
    "--use_dora": "DoRA is not implemented",
    "--lora_dropout": "PEFT's input dropout is not implemented (sdxl_train_network.py has --network_dropout)",
    "--do_edm_style_training": "EDM-style training is not implemented",
    "--prior_generation_precision": "class images are generated in the training precision",
    "--prodigy_beta3": "give Prodigy's options with sdxl_train_network.py --optimizer_args",
    "--prodigy_decouple": "give Prodigy's options with sdxl_train_network.py --optimizer_args",
    "--prodigy_use_bias_correction": "give Prodigy's options with sdxl_train_network.py --optimizer_args",
    "--prodigy_safeguard_warmup": "give Prodigy's options with sdxl_train_network.py --optimizer_args",
    "--adam_weight_decay_text_encoder": "one weight decay applies to all LoRA weights (--adam_weight_decay)",
    "--image_interpolation_mode": "images are resized with Lanczos (the example's default)",
}


def translate(ex: argparse.Namespace) -> list[str]:
    """The example's flags as sdxl_train_network.py's command line (and the dataset TOML it names)."""
    given = [flag for flag in REFUSED if getattr(ex, flag[2:]) is not None]
    if given:
        raise SystemExit("error: " + "; ".join(f"{flag}: {REFUSED[flag]}" for flag in given))
    if bool(ex.instance_data_dir) == bool(ex.dataset_name):
        raise SystemExit("error: give --instance_data_dir (a folder of instance images) or --dataset_name (a local "
                         "image folder with metadata.jsonl), one of them")
    if ex.with_prior_preservation and not (ex.class_data_dir and ex.class_prompt):
        raise SystemExit("error: --with_prior_preservation needs --class_data_dir and --class_prompt")
    output = Path(ex.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    dataset = output / "dataset_from_flags.toml"
    dataset.write_text(dataset_toml(ex), encoding="utf-8")
    lr = ex.learning_rate
    if ex.scale_lr:  # the example: lr x accumulation x batch x processes
        lr *= ex.gradient_accumulation_steps * ex.train_batch_size * int(os.environ.get("WORLD_SIZE", "1"))
    argv = ["--pretrained_model_name_or_path", ex.pretrained_model_name_or_path, "--dataset_config", str(dataset),
            "--output_dir", str(output), "--output_name", DIFFUSERS_FILE,
            "--save_lora_format", "diffusers", *(["kohya"] if ex.output_kohya_format else []),
            "--network_module", "networks.lora", "--network_dim", str(ex.rank), "--network_alpha", str(ex.rank),
            "--learning_rate", str(lr), "--unet_lr", str(lr), "--lr_scheduler", ex.lr_scheduler,
            # diffusers' "constant" ignores the warmup (the example's default 500 with it); ours would refuse it
            *(["--lr_warmup_steps", str(ex.lr_warmup_steps)] if ex.lr_scheduler != "constant" else []),
            "--lr_scheduler_num_cycles", str(ex.lr_num_cycles),
            "--lr_scheduler_power", str(ex.lr_power), "--resolution", str(ex.resolution),
            # the example: --max_train_steps, when given, overrides --num_train_epochs (kohya: the reverse)
            *(["--max_train_epochs", str(ex.num_train_epochs)] if ex.max_train_steps is None else []),
            "--gradient_accumulation_steps", str(ex.gradient_accumulation_steps),
            "--max_data_loader_n_workers", str(ex.dataloader_num_workers), "--max_grad_norm", str(ex.max_grad_norm),
            "--optimizer_type", optimizer_type(ex), "--optimizer_args", f"betas=({ex.adam_beta1},{ex.adam_beta2})",
            f"weight_decay={ex.adam_weight_decay}", f"eps={ex.adam_epsilon}",
            "--logging_dir", str(output / ex.logging_dir), "--log_with", ex.report_to,
            "--save_every_n_steps", str(ex.checkpointing_steps), "--save_state"]
    if ex.train_text_encoder:
        argv += ["--text_encoder_lr", str(ex.text_encoder_lr)]
    else:
        argv += ["--network_train_unet_only"]
    if ex.checkpoints_total_limit:  # the newest N saves are those of the last (N - 1) x K steps
        argv += ["--save_last_n_steps", str((ex.checkpoints_total_limit - 1) * ex.checkpointing_steps)]
    if ex.resume_from_checkpoint:
        from library.training_loop import latest_state

        resume = latest_state(output) if ex.resume_from_checkpoint == "latest" else ex.resume_from_checkpoint
        argv += ["--resume", resume] if resume else []
    if ex.with_prior_preservation:
        argv += ["--prior_loss_weight", str(ex.prior_loss_weight)]
    for flag, value in (("--vae", ex.pretrained_vae_model_name_or_path), ("--seed", ex.seed),
                        ("--max_train_steps", ex.max_train_steps), ("--min_snr_gamma", ex.snr_gamma),
                        ("--mixed_precision", ex.mixed_precision)):
        if value is not None:
            argv += [flag, str(value)]
    argv += ["--gradient_checkpointing"] if ex.gradient_checkpointing else []
    argv += ["--xformers"] if ex.enable_xformers_memory_efficient_attention else []
    if ex.validation_prompt:
        prompts = output / "validation_prompts.txt"
        seed = ex.seed if ex.seed is not None else 0
        prompts.write_text("".join(f"{ex.validation_prompt} --w {ex.resolution} --h {ex.resolution} --d {seed + i}\n"
                                   for i in range(ex.num_validation_images)), encoding="utf-8")
        argv += ["--sample_prompts", str(prompts), "--sample_every_n_epochs", str(ex.validation_epochs)]
    return argv


def optimizer_type(ex: argparse.Namespace) -> str:
    name = ex.optimizer.lower()
    if name == "prodigy":
        return "Prodigy"
    if name != "adamw":
        raise SystemExit(f"error: --optimizer {ex.optimizer}: the example offers AdamW and prodigy")
    return "AdamW8bit" if ex.use_8bit_adam else "AdamW"


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def dataset_toml(ex: argparse.Namespace) -> str:
    """kohya's dataset TOML for the example's data flags: one instance subset (every image captioned with
    --instance_prompt, or --caption_column of a metadata image folder) and the class images as a reg subset."""
    lines = ["# Written by train_dreambooth_lora_sdxl.py from its flags (kohya's dataset format).", "[general]",
             f"resolution = {ex.resolution}", "enable_bucket = false", f"batch_size = {ex.train_batch_size}",
             f"flip_aug = {str(ex.random_flip).lower()}",
             f"random_crop = {str(not ex.center_crop).lower()}  # the example crops at random unless --center_crop",
             "", "[[datasets]]", "", "[[datasets.subsets]]"]
    if ex.dataset_name:
        folder = Path(ex.dataset_name).resolve()
        if not any((folder / name).is_file() for name in ("metadata.jsonl", "metadata.csv")):
            raise SystemExit(f"error: --dataset_name {folder}: give a local image folder with metadata.jsonl or "
                             "metadata.csv (file_name + caption columns); hub datasets cannot be downloaded here")
        lines += [f"image_dir = {_toml_string(str(folder))}"]
        if ex.caption_column:  # captions from the metadata (a fine-tune subset)
            if ex.with_prior_preservation:
                raise SystemExit("error: --caption_column with --with_prior_preservation: captions from metadata and "
                                 "class images cannot share one dataset here; leave out --caption_column (every "
                                 "image is then --instance_prompt) or train without prior preservation")
            metadata = next(folder / name for name in ("metadata.jsonl", "metadata.csv") if (folder / name).is_file())
            lines += [f"metadata_file = {_toml_string(str(metadata))}",
                      f"caption_column = {_toml_string(ex.caption_column)}"]
        else:  # no caption column: every image is the instance prompt, as in the example
            lines += [f"class_tokens = {_toml_string(ex.instance_prompt)}"]
    else:
        lines += [f"image_dir = {_toml_string(str(Path(ex.instance_data_dir).resolve()))}",
                  f"class_tokens = {_toml_string(ex.instance_prompt)}"]
    lines += [f"num_repeats = {ex.repeats}"]
    if ex.with_prior_preservation:
        lines += ["", "[[datasets.subsets]]", f"image_dir = {_toml_string(str(Path(ex.class_data_dir).resolve()))}",
                  f"class_tokens = {_toml_string(ex.class_prompt)}", "is_reg = true"]
    return "\n".join(lines) + "\n"


def class_image_step(ex: argparse.Namespace):
    """With prior preservation: the step that tops --class_data_dir up to --num_class_images with the base model
    (after it loads, before the data is scanned), or None when enough images are there."""
    if not ex.with_prior_preservation:
        return None
    from library.class_images import check_writable, generate_class_images, plan_in_folder
    from library.prompt_files import SamplePrompt

    try:
        plan = plan_in_folder(Path(ex.class_data_dir), ex.num_class_images)
        check_writable(plan)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if not plan.to_generate:
        return None

    def generate(models, start):
        prompt = SamplePrompt(ex.class_prompt, width=ex.resolution, height=ex.resolution)
        try:
            generate_class_images(plan, prompt=prompt, models=models, sampler_name="euler_a", seed=start.seed,
                                  batch_size=ex.sample_batch_size)
        except ValueError as e:  # a model that needs a condition image per image
            raise SystemExit(f"error: {e}") from None

    return generate


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ex = setup_parser().parse_args(argv)
    translated = translate(ex)
    logger.info("as sdxl_train_network.py: %s", shlex.join(translated))
    args = train_args.parse_args(sdxl_train_network.setup_parser(), translated)
    train_network.train(args, sdxl_train_network.TRAINS, before_data=class_image_step(ex))
    return 0


if __name__ == "__main__":
    sys.exit(main())
