"""The one module that knows argparse: kohya-ss/sd-scripts' training flags, `--config_file` and `--output_config`.

Entry scripts build a parser from the groups they support, call `parse_args`, and turn the namespace into typed
config objects once (`optimizer_config`, `objective_config`, `caption_options` below). Not everything is typed yet:
`training_setup.py`, `full_finetune.py` and `training_metadata.py` still read the namespace itself.

Flag names, defaults and meanings follow kohya (see ../shared/reference/kohya_sd_scripts.md section 2), with two
deliberate differences: the model family is detected from the weights (`--v2` / `--v_parameterization` are checked
against it), and flags this suite does not implement yet are refused by name instead of being silently ignored.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from pathlib import Path

import tomllib

import toml  # writes --output_config; reading uses the strict tomllib (toml.loads reads "x = [4" as x = [])

from library import compilation, run_logging
from library.data_parallel import DDPSettings, check_ddp_flags
from library.hub_upload import add_hub_arguments

logger = logging.getLogger(__name__)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", required=True,
                   help="base model: WebUI .safetensors/.ckpt or a diffusers folder")
    g.add_argument("--v2", action="store_true", help="SD 2.x model (detected from the weights; checked if given)")
    g.add_argument("--v_parameterization", action="store_true",
                   help="v-prediction model, when the file does not say so itself")
    g.add_argument("--vae", default=None, help="replace the model's VAE with this file or folder")
    g.add_argument("--allow_unsafe_pickle", action="store_true",
                   help="load .ckpt files that need arbitrary Python objects (runs code from the file)")
    g.add_argument("--tokenizer_cache_dir", default=None, help="accepted for compatibility; tokenizers are shipped")
    g.add_argument("--disable_mmap_load_safetensors", action="store_true",
                   help="accepted, changes nothing: kohya's switch away from memory-mapped loading (slow on some "
                        "file systems); this suite always reads .safetensors tensor by tensor without mmap "
                        "(library/safetensors_io.py)")


def add_dataset_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dataset")
    g.add_argument("--train_data_dir", default=None,
                   help="parent folder of '<repeats>_<identifier> <class>' image folders")
    g.add_argument("--reg_data_dir", default=None, help="parent folder of '<repeats>_<class>' regularisation folders")
    g.add_argument("--dataset_config", type=Path, default=None, help="dataset TOML/JSON (overrides the folder flags)")
    g.add_argument("--caption_extension", default=".caption", help="caption file extension")
    g.add_argument("--caption_extention", default=None, help=argparse.SUPPRESS)  # kohya's misspelled alias
    g.add_argument("--resolution", default=None, help="training resolution: 'size' or 'width,height'")
    g.add_argument("--enable_bucket", action="store_true", help="aspect-ratio bucketing")
    g.add_argument("--min_bucket_reso", type=int, default=256)
    g.add_argument("--max_bucket_reso", type=int, default=1024)
    g.add_argument("--bucket_reso_steps", type=int, default=64)
    g.add_argument("--bucket_no_upscale", action="store_true")
    g.add_argument("--shuffle_caption", action="store_true")
    g.add_argument("--caption_separator", default=",")
    g.add_argument("--keep_tokens", type=int, default=0)
    g.add_argument("--keep_tokens_separator", default="")
    g.add_argument("--secondary_separator", default=None)
    g.add_argument("--enable_wildcard", action="store_true")
    g.add_argument("--caption_prefix", default=None)
    g.add_argument("--caption_suffix", default=None)
    g.add_argument("--caption_dropout_rate", type=float, default=0.0)
    g.add_argument("--caption_dropout_every_n_epochs", type=int, default=0)
    g.add_argument("--caption_tag_dropout_rate", type=float, default=0.0)
    g.add_argument("--token_warmup_min", type=int, default=1)
    g.add_argument("--token_warmup_step", type=float, default=0)
    g.add_argument("--color_aug", action="store_true")
    g.add_argument("--flip_aug", action="store_true")
    g.add_argument("--random_crop", action="store_true")
    g.add_argument("--resize_interpolation", default=None,
                   help="the resize filter: lanczos, nearest, bilinear (linear), bicubic (cubic), area (box); "
                        "default area when shrinking, lanczos when enlarging (kohya's)")
    g.add_argument("--alpha_mask", action="store_true", help="use PNG alpha as the loss mask")
    g.add_argument("--cache_latents", action="store_true")
    g.add_argument("--cache_latents_to_disk", action="store_true")
    g.add_argument("--vae_batch_size", type=int, default=1)
    g.add_argument("--skip_cache_check", action="store_true")
    g.add_argument("--in_json", default=None, help="kohya metadata JSON/JSONL (fine-tune datasets)")
    g.add_argument("--caption_column", default="text",
                   help="caption column of a diffusers imagefolder metadata.jsonl / metadata.csv")
    g.add_argument("--dataset_repeats", type=int, default=1)
    g.add_argument("--debug_dataset", action="store_true")
    g.add_argument("--cache_info", action="store_true",
                   help="keep each image folder's sizes and captions in <folder>/metadata_cache.json (kohya's file), "
                        "checked against the files' sizes and times, so a repeated scan of a large dataset is quick")


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--output_dir", required=True)
    g.add_argument("--output_name", default=None)
    g.add_argument("--save_precision", choices=["float", "fp16", "bf16"], default=None)
    g.add_argument("--save_every_n_epochs", type=int, default=None)
    g.add_argument("--save_every_n_steps", type=int, default=None)
    g.add_argument("--save_last_n_epochs", type=int, default=None)
    g.add_argument("--save_last_n_steps", type=int, default=None)
    g.add_argument("--save_n_epoch_ratio", type=int, default=None,
                   help="save about N times in the run: every floor(epochs / N) epochs, at least 1 (wins over "
                        "--save_every_n_epochs)")
    g.add_argument("--save_last_n_epochs_state", type=int, default=None,
                   help="keep the states of the newest N epoch saves (default: as --save_last_n_epochs)")
    g.add_argument("--save_last_n_steps_state", type=int, default=None,
                   help="keep the states of the step saves of the last N steps (default: as --save_last_n_steps)")
    g.add_argument("--save_state", action="store_true")
    g.add_argument("--save_state_on_train_end", action="store_true")
    g.add_argument("--resume", default=None, help="state folder to resume from")
    g.add_argument("--train_batch_size", type=int, default=1)
    # 75 / 150 / 225 is checked in check_training_flags, also for values from --config_file
    g.add_argument("--max_token_length", type=int, default=None)
    g.add_argument("--max_train_steps", type=int, default=1600)
    g.add_argument("--max_train_epochs", type=int, default=None)
    g.add_argument("--max_data_loader_n_workers", type=int, default=8,
                   help="image-loading worker processes (capped at the CPU count; 0 = main process)")
    g.add_argument("--persistent_data_loader_workers", action="store_true",
                   help="keep the data-loading workers alive between epochs (saves their start-up each epoch)")
    g.add_argument("--lowram", action="store_true",
                   help="accepted for kohya compatibility, changes nothing: weights are already read lazily from "
                        "memory-mapped files into the models, one component at a time")
    g.add_argument("--highvram", action="store_true",
                   help="accepted for kohya compatibility, changes nothing: latent caching never clears the GPU "
                        "cache here")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--cpu_offload_checkpointing", action="store_true",
                   help="refused: kohya's flag for its FLUX / SD3 transformers; SD and SDXL U-Nets do not offload "
                        "checkpointed activations (kohya's SD scripts fail with it too)")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    g.add_argument("--full_fp16", action="store_true")
    g.add_argument("--full_bf16", action="store_true")
    g.add_argument("--no_half_vae", action="store_true")
    g.add_argument("--clip_skip", type=int, default=None)
    g.add_argument("--xformers", action="store_true",
                   help="accepted, not used: attention runs through PyTorch SDPA (the same memory savings; xformers "
                        "cannot run on CPU); a warning says so")
    g.add_argument("--sdpa", action="store_true", help="accepted: PyTorch SDPA is the attention here anyway")
    g.add_argument("--mem_eff_attn", action="store_true",
                   help="accepted: PyTorch SDPA, the attention here anyway, is memory-efficient (kohya's own "
                        "chunked attention is not needed)")
    g.add_argument("--torch_compile", action="store_true",
                   help="compile the models each step runs (U-Net, text encoders; a cache tool's VAE encoder or text "
                        "encoders) with torch.compile: slower start, faster steps. accelerate launch's --dynamo_mode / "
                        "--dynamo_use_fullgraph / --dynamo_use_dynamic / --dynamo_use_regional_compilation apply")
    g.add_argument("--dynamo_backend", choices=compilation.KOHYA_BACKENDS, default=None,
                   help="torch.compile's backend with --torch_compile (default inductor; kohya's list: those the "
                        "installed torch lacks are refused by name)")
    g.add_argument("--logging_dir", default=None)
    g.add_argument("--log_with", choices=["tensorboard", "wandb", "all"], default=None)
    g.add_argument("--log_prefix", default=None)
    g.add_argument("--log_tracker_name", default=None, help="wandb project name (default: the script's name)")
    g.add_argument("--wandb_run_name", default=None)
    g.add_argument("--wandb_api_key", default=None, help="prefer `wandb login` or WANDB_API_KEY: a key on the "
                   "command line is visible to other users of the machine")
    g.add_argument("--log_tracker_config", default=None, help="TOML with a [wandb] table of wandb.init arguments")
    g.add_argument("--log_config", action="store_true", help="record the run's arguments with the wandb run")
    g.add_argument("--prior_loss_weight", type=float, default=1.0)
    g.add_argument("--config_file", default=None, help="TOML of training arguments (command-line values win)")
    g.add_argument("--output_config", action="store_true", help="write the arguments to --config_file and exit")
    g = p.add_argument_group("several processes (accelerate launch --num_processes N): DDP")
    g.add_argument("--ddp_timeout", type=int, default=None,
                   help="minutes a process waits for the others in a collective operation before it gives up "
                        "(default: torch's, 10 minutes with NCCL, 30 with gloo)")
    g.add_argument("--ddp_gradient_as_bucket_view", action="store_true",
                   help="the gradients are views into DDP's communication buckets: one copy of the trained "
                        "gradients less in memory")
    g.add_argument("--ddp_static_graph", action="store_true",
                   help="the same parameters get gradients in every step: DDP finds them once instead of searching "
                        "after each forward; refused with gradient accumulation and where that changes mid-run")
    add_deepspeed_arguments(p)


def add_deepspeed_arguments(p: argparse.ArgumentParser) -> None:
    """kohya's DeepSpeed flags (library/deepspeed_engine.py); deepspeed itself is an optional install."""
    g = p.add_argument_group("DeepSpeed ZeRO (pip install deepspeed; accelerate launch --num_processes N ...)")
    g.add_argument("--deepspeed", action="store_true",
                   help="train with DeepSpeed ZeRO: optimizer state (and gradients) split over the processes")
    g.add_argument("--zero_stage", type=int, default=2, choices=[0, 1, 2, 3],
                   help="1: optimizer state split; 2: also the gradients (default); 3: also the weights themselves "
                        "(full-model trainers)")
    g.add_argument("--offload_optimizer_device", default=None, choices=[None, "cpu", "nvme"],
                   help="keep the optimizer state and step on the CPU (DeepSpeed's CPU Adam; AdamW / Adam only)")
    g.add_argument("--offload_optimizer_nvme_path", default=None, help="with --offload_optimizer_device nvme")
    g.add_argument("--offload_param_device", default=None, choices=[None, "cpu", "nvme"],
                   help="--zero_stage 3: keep the partitioned weights on the CPU (or NVMe) between uses")
    g.add_argument("--offload_param_nvme_path", default=None, help="with --offload_param_device nvme")
    # "refused: ..." is the README's mark of a flag always refused (tests/test_kohya_flags.py lists them from it).
    g.add_argument("--zero3_init_flag", action="store_true",
                   help="refused: the models are loaded whole before training (deepspeed.zero.Init would have to "
                        "build them); stage 3 partitions them when training starts")
    g.add_argument("--zero3_save_16bit_model", action="store_true",
                   help="accepted: a stage 3 save always gathers the full weights (in --save_precision), so "
                        "DeepSpeed's 16-bit gathering switch changes nothing")
    g.add_argument("--fp16_master_weights_and_gradients", action="store_true",
                   help="fp16 master weights and gradients (DeepSpeed: --mixed_precision fp16, --zero_stage 2, "
                        "--offload_optimizer_device cpu); --full_fp16 with --deepspeed means the same")


def add_objective_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("noise and loss")
    g.add_argument("--noise_offset", type=float, default=None)
    g.add_argument("--noise_offset_random_strength", action="store_true")
    g.add_argument("--adaptive_noise_scale", type=float, default=None)
    g.add_argument("--multires_noise_iterations", type=int, default=None)
    g.add_argument("--multires_noise_discount", type=float, default=0.3)
    g.add_argument("--ip_noise_gamma", type=float, default=None)
    g.add_argument("--ip_noise_gamma_random_strength", action="store_true")
    g.add_argument("--zero_terminal_snr", action="store_true")
    g.add_argument("--min_timestep", type=int, default=None)
    g.add_argument("--max_timestep", type=int, default=None)
    g.add_argument("--loss_type", choices=["l1", "l2", "huber", "smooth_l1"], default="l2")
    g.add_argument("--huber_schedule", choices=["constant", "exponential", "snr"], default="snr")
    g.add_argument("--huber_c", type=float, default=0.1)
    g.add_argument("--huber_scale", type=float, default=1.0)
    g.add_argument("--min_snr_gamma", type=float, default=None)
    g.add_argument("--scale_v_pred_loss_like_noise_pred", action="store_true")
    g.add_argument("--v_pred_like_loss", type=float, default=None)
    g.add_argument("--debiased_estimation_loss", action="store_true")
    g.add_argument("--weighted_captions", action="store_true")
    g.add_argument("--masked_loss", action="store_true",
                   help="weight the loss by a mask: the R channel of same-stem images in --conditioning_data_dir")
    g.add_argument("--conditioning_data_dir", default=None,
                   help="folder of same-stem images: --masked_loss masks; on an inpainting / depth / extra-channel "
                        "model its masks (white: repaint), depth maps or condition images")


def add_extra_input_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inpainting models (synthetic masks, for images without a mask in "
                             "--conditioning_data_dir)")
    g.add_argument("--inpaint_full_mask_prob", type=float, default=0.25,
                   help="share of samples with the whole image masked, so the model keeps generating from text "
                        "alone (default 0.25, as RunwayML trained SD inpainting)")
    g.add_argument("--inpaint_mask_max_shapes", type=int, default=3,
                   help="each synthetic mask has 1 to N random rectangles and ellipses (default 3)")
    g.add_argument("--inpaint_mask_size", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="a shape's width and height as shares of the image's, drawn between MIN and MAX (default "
                        "0.1 0.5)")


def add_initial_step_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("starting at a later step (kohya's flags; --resume restores a run exactly)")
    g.add_argument("--initial_epoch", type=int, default=None,
                   help="start counting at this epoch (1: the first, as without the flag); the learning-rate schedule "
                        "still starts from its beginning")
    g.add_argument("--initial_step", type=int, default=None,
                   help="start counting at this optimizer step (overrides --initial_epoch); the run trains until "
                        "--max_train_steps")
    g.add_argument("--skip_until_initial_step", action="store_true",
                   help="also start the data where those steps would have left it (else at the start of that epoch)")


def add_validation_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("validation loss (kohya's flags; library/validation.py)")
    g.add_argument("--validation_split", type=float, default=None,
                   help="hold out this share of each training folder's images (e.g. 0.1) and report the loss on them, "
                        "never trained on; also the dataset config key validation_split")
    g.add_argument("--validation_seed", type=int, default=None,
                   help="the seed of the hold-out and of the validation noise (default: --seed)")
    g.add_argument("--validate_every_n_steps", type=int, default=None,
                   help="validate every N optimizer steps (default: once per epoch)")
    g.add_argument("--validate_every_n_epochs", type=int, default=None, help="validate every N epochs (default: 1)")
    g.add_argument("--max_validation_steps", type=int, default=None,
                   help="at most this many validation batches per pass (default: all)")


def add_optimizer_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer_type", default="")
    g.add_argument("--use_8bit_adam", action="store_true")
    g.add_argument("--use_lion_optimizer", action="store_true")
    g.add_argument("--learning_rate", type=float, default=2e-6)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--optimizer_args", nargs="*", default=None)
    g.add_argument("--lr_scheduler", default="constant")
    g.add_argument("--lr_warmup_steps", default="0")
    g.add_argument("--lr_scheduler_num_cycles", type=int, default=1)
    g.add_argument("--lr_scheduler_power", type=float, default=1.0)
    g.add_argument("--lr_decay_steps", default="0",
                   help="warmup_stable_decay: steps of the final decay (an int, a ratio below 1 of the run, or N%%)")
    g.add_argument("--lr_scheduler_timescale", type=int, default=None,
                   help="inverse_sqrt: the timescale in steps (default: --lr_warmup_steps, else 10000)")
    g.add_argument("--lr_scheduler_min_lr_ratio", type=float, default=None,
                   help="cosine_with_min_lr / warmup_stable_decay: the lowest learning rate as a ratio of the initial")
    g.add_argument("--lr_scheduler_type", default="",
                   help="a scheduler class instead of --lr_scheduler: a torch.optim.lr_scheduler name (e.g. "
                        "CosineAnnealingLR) or module.Class; stepped once per optimizer step")
    g.add_argument("--lr_scheduler_args", nargs="*", default=None,
                   help="key=value arguments (Python literals) of --lr_scheduler_type's class, e.g. T_max=1000 "
                        "eta_min=1e-6; with --lr_scheduler piecewise_constant: step_rules='1:100,0.1'")


def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sample images")
    g.add_argument("--sample_every_n_steps", type=int, default=None)
    g.add_argument("--sample_every_n_epochs", type=int, default=None)
    g.add_argument("--sample_at_first", action="store_true")
    g.add_argument("--sample_prompts", default=None)
    g.add_argument("--sample_sampler", default="ddim",
                   help="ddim, pndm, lms, euler, euler_a, heun, dpm_2, dpm_2_a, dpmsolver, dpmsolver++, dpmsingle, k_*")


# kohya flags a trainer here does not implement, and why (flag -> reason, shown in --help and in the error, and in
# the README's list of refused flags). Setting one is an error that says so, never a silent no-op (kohya's own dead
# flags, e.g. train_db's --no_token_padding, are a known trap). A trainer that implements one adds it itself
# (`implemented` of add_common_training_arguments).
NOT_YET_IMPLEMENTED = {
    "--face_crop_aug_range": "not implemented: kohya's crop augmentation around a face whose box the image's file name "
                             "gives (<name>_<cx>_<cy>_<w>_<h>); crop such images beforehand",
    "--fp8_base": "this trainer trains the U-Net itself, and float8 storage is for a frozen base model (the LoRA, "
                  "textual-inversion and ControlNet trainers have it; kohya's full-model scripts ignore it)",
    "--cache_text_encoder_outputs": "this trainer has no text-encoder output cache (its text encoders take part in "
                                    "what trains); the LoRA, SDXL and ControlNet trainers have it",
    "--dataset_class": "not implemented: kohya's hook for a Python dataset class of your own; datasets here come from "
                       "folders, a dataset TOML, metadata files or a local Hugging Face dataset",
}


class _NotYetImplemented(argparse.Action):
    """A flag parsed only to be refused by name, with the reason (`refuse_not_yet_implemented`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)


def add_not_yet_implemented(p: argparse.ArgumentParser, implemented: tuple[str, ...] = ()) -> None:
    """The refused flags, except those this parser's trainer implements itself (`implemented`)."""
    g = p.add_argument_group("kohya flags not available here (refused with the reason when given)")
    for flag, reason in NOT_YET_IMPLEMENTED.items():
        if flag not in implemented:
            g.add_argument(flag, default=None, nargs="?", const=True, help=f"refused: {reason}",
                           action=_NotYetImplemented)


def refuse_not_yet_implemented(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    given = [action.option_strings[0] for action in parser._actions if isinstance(action, _NotYetImplemented)
             and getattr(args, action.dest, None) not in (None, False)]
    if given:
        raise SystemExit("error: " + "\n       ".join(f"{flag}: {NOT_YET_IMPLEMENTED[flag]}; remove the flag"
                                                      for flag in given))


TEXT_ENCODER_CACHE_FLAG = "--cache_text_encoder_outputs"
FUSED_OPTIMIZER_GROUPS_FLAG = "--fused_optimizer_groups"


def add_text_encoder_cache_arguments(p: argparse.ArgumentParser) -> None:
    """kohya's SDXL flags for cached text-encoder outputs (library/text_encoder_cache.py); a trainer that adds them
    passes implemented=(TEXT_ENCODER_CACHE_FLAG,) to add_common_training_arguments."""
    g = p.add_argument_group("text-encoder output cache (kohya's SDXL flags)")
    g.add_argument(TEXT_ENCODER_CACHE_FLAG, action="store_true",
                   help="encode every caption once before training, then train without running (or holding) the "
                        "text encoders; needs frozen text encoders and captions that do not change per step")
    g.add_argument("--cache_text_encoder_outputs_to_disk", action="store_true",
                   help="also keep them beside the images (<stem>_te_outputs.safetensors), reused by later runs "
                        "while caption, model and settings are the same (implies --cache_text_encoder_outputs)")


def add_embedding_arguments(p: argparse.ArgumentParser) -> None:
    """Textual-inversion embeddings in LoRA / full-model training: loaded ones, and pivotal tuning."""
    g = p.add_argument_group("embeddings (pivotal tuning)")
    g.add_argument("--textual_inversion_embeddings", nargs="*", default=None,
                   help="embedding files to use (frozen); the prompt word is each file's name without extension")
    g.add_argument("--pivotal_token", default=None,
                   help="train a new token in the same run (pivotal tuning); it is saved with the model")
    g.add_argument("--pivotal_init_word", default=None, help="start the new token from this word's embedding")
    g.add_argument("--pivotal_num_vectors", type=int, default=1)
    g.add_argument("--pivotal_lr", type=float, default=5e-3, help="learning rate of the new token's vectors")
    g.add_argument("--pivotal_steps", type=int, default=None,
                   help="train the token for the first N steps, then freeze it (default: all steps)")


# kohya's --metadata_* flags (sai_model_spec.add_model_spec_arguments): flag suffix -> what it says. Each becomes
# `modelspec.<suffix>` in every model file the trainer writes (library/training_metadata.user_modelspec).
MODELSPEC_FLAGS = {
    "title": "the model's name (default: the file name)",
    "author": "who made it",
    "description": "what it is and how to use it",
    "license": "its license",
    "tags": "comma-separated tags",
    "usage_hint": "how to prompt it",
    "thumbnail": "an image file, stored in the model as a data: URL",
    "merged_from": "the models it was merged from",
    "trigger_phrase": "the phrase that calls the trained concept up",
    "preprocessor": "the preprocessor its condition images need (ControlNet)",
    "is_negative_embedding": "true if the embedding is meant for negative prompts (textual inversion)",
}


def add_fused_step_arguments(p: argparse.ArgumentParser) -> None:
    """The optimizer step inside backward (library/fused_backward.py). What it saves is the trained parameters'
    gradients: a full U-Net's in the full-model trainers, a LoRA's or an embedding's (small) in the others."""
    g = p.add_argument_group("optimizer step inside backward (memory)")
    g.add_argument("--fused_backward_pass", action="store_true",
                   help="step the optimizer inside the backward pass, parameter by parameter (no full gradient "
                        "copy of the model in memory); needs --gradient_accumulation_steps 1 and one process")
    g.add_argument(FUSED_OPTIMIZER_GROUPS_FLAG, type=int, default=None, metavar="N",
                   help="kohya's variant: step the optimizer inside the backward pass in N shares of the parameters, "
                        "each as soon as its gradients are ready (about 1/N of the gradients in memory; "
                        "--max_grad_norm clips each share by its own norm); same conditions")


FP8_BASE_FLAG = "--fp8_base"  # refused (NOT_YET_IMPLEMENTED) by the trainers without add_fp8_base_arguments


def add_fp8_base_arguments(p: argparse.ArgumentParser) -> None:
    """kohya's float8 base model (library/fp8_weights.py), for trainers whose base model stays frozen; they also pass
    implemented=(FP8_BASE_FLAG,) to add_common_training_arguments."""
    g = p.add_argument_group("float8 base model (memory)")
    g.add_argument(FP8_BASE_FLAG, action="store_true",
                   help="store the frozen U-Net's and text encoders' Linear / Conv2d weights in float8_e4m3fn (half "
                        "of bf16 / fp16), upcast to the weight dtype for each use; the trained network keeps its "
                        "dtype. Trains exactly as on a base model rounded to float8")
    g.add_argument("--fp8_base_unet", action="store_true",
                   help="the same for the U-Net only: the text encoders keep the weight dtype (also with --fp8_base)")


def add_modelspec_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model metadata (modelspec.*, kohya's --metadata_* flags)")
    for name, what in MODELSPEC_FLAGS.items():
        g.add_argument(f"--metadata_{name}", default=None, help=what)


def add_console_log_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("console log (kohya's flags)")
    g.add_argument("--console_log_level", type=str.upper, default=None,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], help="default INFO")
    g.add_argument("--console_log_file", default=None, help="also write the log to this file (appended, with times)")
    g.add_argument("--console_log_simple", action="store_true",
                   help="accepted: the console log is plain text here anyway (kohya's switch away from rich)")


def configure_console_log(args: argparse.Namespace) -> None:
    """--console_log_level on the root logger, --console_log_file as one more handler of it."""
    level, path = getattr(args, "console_log_level", None), getattr(args, "console_log_file", None)
    root = logging.getLogger()
    if level:
        root.setLevel(level)
    if path:
        try:
            handler = logging.FileHandler(path, encoding="utf-8")
        except OSError as e:
            raise SystemExit(f"error: --console_log_file {path}: cannot open it ({e.strerror})") from None
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)


def add_common_training_arguments(p: argparse.ArgumentParser, *, implemented: tuple[str, ...] = ()) -> None:
    """The groups every trainer shares (model, dataset, training, noise/loss, optimizer, samples, metadata,
    refusals). `implemented`: flags of NOT_YET_IMPLEMENTED that the trainer adds itself."""
    for add in (add_model_arguments, add_dataset_arguments, add_training_arguments, add_objective_arguments,
                add_extra_input_arguments, add_validation_arguments, add_initial_step_arguments,
                add_optimizer_arguments, add_sample_arguments, add_hub_arguments,
                add_modelspec_arguments, add_console_log_arguments):
        add(p)
    add_not_yet_implemented(p, implemented)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None, *,
               config_keys_elsewhere: Mapping[str, str] | None = None) -> argparse.Namespace:
    """Parse the command line, merging `--config_file` (kohya: every table's keys flattened, command line wins),
    and handle `--output_config` (write the non-default arguments to --config_file, then exit).
    `config_keys_elsewhere`: config keys that are another script's flags (key -> script), skipped with a log line
    instead of refused (the cache tools read a trainer's config file)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config_file", default=None)
    pre.add_argument("--output_config", action="store_true")
    early, _ = pre.parse_known_args(argv)
    if early.config_file and not early.output_config:
        flat = _read_config_file(Path(early.config_file), parser, config_keys_elsewhere or {})
        # The file's values become defaults, so anything given on the command line wins.
        parser.set_defaults(**flat)
        for action in parser._actions:
            if action.required and action.dest in flat:
                action.required = False
    args = parser.parse_args(argv)
    if args.output_config:
        _write_config_file(parser, args)
        raise SystemExit(0)
    if getattr(args, "caption_extention", None):
        args.caption_extension = args.caption_extention
    refuse_not_yet_implemented(args, parser)
    configure_console_log(args)
    note_memory_hints(args)
    return args


def note_memory_hints(args: argparse.Namespace) -> None:
    """kohya's --lowram / --highvram are memory hints for its own loading and caching code; ours needs neither, so
    they are accepted (configs keep working) with a note of what they do here: nothing."""
    if getattr(args, "lowram", False):
        logger.info("--lowram: nothing to change; the weights are read lazily from memory-mapped files into the "
                    "models one component at a time (no second copy in RAM), then moved to the device")
    if getattr(args, "highvram", False):
        logger.info("--highvram: nothing to change; latent caching here never empties the GPU cache, so there is "
                    "no cache clearing to skip")


def _read_config_file(path: Path, parser: argparse.ArgumentParser, elsewhere: Mapping[str, str]) -> dict:
    if not path.exists() and path.suffix != ".toml":
        path = path.with_suffix(".toml")  # kohya allows leaving out the suffix
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SystemExit(f"error: --config_file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: --config_file {path}: cannot be read ({e}); it must be a UTF-8 TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise SystemExit(f"error: --config_file {path}: invalid TOML: {e}; fix the file (strings need quotes, "
                         "lists need their closing bracket)") from None
    flat: dict = {}
    for key, value in data.items():
        flat.update(value if isinstance(value, dict) else {key: value})
    actions = {a.dest: a for a in parser._actions}
    skipped = sorted(key for key in flat if key not in actions and key in elsewhere)
    if skipped:
        logger.info("--config_file %s: %s (flags of %s) do not apply here", path, ", ".join(skipped),
                    ", ".join(sorted({elsewhere[key] for key in skipped})))
        flat = {key: value for key, value in flat.items() if key not in skipped}
    unknown = sorted(set(flat) - set(actions))
    if unknown:
        raise SystemExit(f"error: --config_file {path}: unknown argument(s) {', '.join(unknown)}; keys are the "
                         "flag names without '--': fix the spelling or remove them")
    problems = []
    for key, value in flat.items():
        problem, flat[key] = _config_value(actions[key], value)
        if problem:
            problems.append(f"{key} = {value!r}: {problem}")
    if problems:
        raise SystemExit(f"error: --config_file {path}: " + "\n       ".join(problems))
    return flat


def _config_value(action: argparse.Action, value):
    """(problem or None, value) for a --config_file value: it becomes a default, which argparse does not check."""
    if isinstance(value, dict):
        return "tables nest one level at most ([section] then key = value)", value
    if action.nargs == 0:  # store_true
        return (None if isinstance(value, bool) else "expected true or false (no quotes)"), value
    if action.nargs in ("*", "+") and not isinstance(value, list):
        value = [value]  # network_args = "conv_dim=4" means a one-element list
    if action.type in (int, float) and action.nargs is None and not isinstance(value, str):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (action.type is int and not isinstance(value, int)):
            return f"expected {'an integer' if action.type is int else 'a number'}", value
        value = action.type(value)
    if action.choices is not None and value not in action.choices:
        return f"expected one of {', '.join(map(str, action.choices))}", value
    return None, value


def _write_config_file(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.config_file:
        raise SystemExit("error: --output_config needs --config_file (where to write)")
    defaults = {}
    for action in parser._actions:  # an alias (a second flag with the same dest) does not change the default
        defaults.setdefault(action.dest, action.default)
    chosen = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k not in ("config_file", "output_config", *_PRIVATE_ARGUMENTS) and v is not None
              and v != defaults.get(k)}  # secrets never go into a config file users share
    Path(args.config_file).write_text(toml.dumps(chosen))
    print(f"wrote {args.config_file}")


# ----------------------------------------------------------------------------------------------------------
# Namespace -> typed config (done once, in the entry script)


def parse_resolution(text: str | None, default: int) -> tuple[int, int]:
    if text is None:
        return (default, default)
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise SystemExit(f"error: --resolution {text!r}: expected 'size' or 'width,height'") from None
    if len(values) == 1:
        return (values[0], values[0])
    if len(values) == 2:
        return (values[0], values[1])
    raise SystemExit(f"error: --resolution {text!r}: expected 'size' or 'width,height'")


def caption_options(args: argparse.Namespace):
    from library.captions import CaptionOptions

    try:
        return CaptionOptions(
            shuffle_caption=args.shuffle_caption, keep_tokens=args.keep_tokens,
            keep_tokens_separator=args.keep_tokens_separator, caption_separator=args.caption_separator,
            secondary_separator=args.secondary_separator, enable_wildcard=args.enable_wildcard,
            caption_prefix=args.caption_prefix, caption_suffix=args.caption_suffix,
            caption_dropout_rate=args.caption_dropout_rate,
            caption_dropout_every_n_epochs=args.caption_dropout_every_n_epochs,
            caption_tag_dropout_rate=args.caption_tag_dropout_rate, token_warmup_min=args.token_warmup_min,
            token_warmup_step=args.token_warmup_step)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def dataset_cli_values(args: argparse.Namespace, default_resolution: int) -> dict:
    """The dataset options given on the command line, under kohya's dataset-config names (the fallbacks of a
    --dataset_config, or the whole dataset without one)."""
    options = {name: getattr(args, name) for name in (
        "train_data_dir", "reg_data_dir", "in_json", "dataset_repeats", "enable_bucket", "min_bucket_reso",
        "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale", "caption_extension", "flip_aug", "color_aug",
        "random_crop", "resize_interpolation", "alpha_mask", "caption_column", "shuffle_caption", "keep_tokens", "keep_tokens_separator",
        "caption_separator", "secondary_separator", "enable_wildcard", "caption_prefix", "caption_suffix",
        "caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate", "token_warmup_min",
        "token_warmup_step", "conditioning_data_dir", "cache_info", "validation_split", "validation_seed")}
    options["batch_size"] = args.train_batch_size
    options["resolution"] = parse_resolution(args.resolution, default_resolution)
    return options


def objective_config(args: argparse.Namespace, prediction_type):
    from library.diffusion_objective import HuberSchedule, LossType, ObjectiveConfig

    return ObjectiveConfig(
        prediction_type=prediction_type,
        min_timestep=args.min_timestep if args.min_timestep is not None else 0,
        max_timestep=args.max_timestep if args.max_timestep is not None else 1000,
        zero_terminal_snr=args.zero_terminal_snr, noise_offset=args.noise_offset,
        noise_offset_random_strength=args.noise_offset_random_strength,
        adaptive_noise_scale=args.adaptive_noise_scale, multires_noise_iterations=args.multires_noise_iterations,
        multires_noise_discount=args.multires_noise_discount, ip_noise_gamma=args.ip_noise_gamma,
        ip_noise_gamma_random_strength=args.ip_noise_gamma_random_strength, loss_type=LossType(args.loss_type),
        huber_schedule=HuberSchedule(args.huber_schedule), huber_c=args.huber_c, huber_scale=args.huber_scale,
        min_snr_gamma=args.min_snr_gamma, scale_v_pred_loss_like_noise_pred=args.scale_v_pred_loss_like_noise_pred,
        v_pred_like_loss=args.v_pred_like_loss, debiased_estimation_loss=args.debiased_estimation_loss)


def optimizer_config(args: argparse.Namespace):
    from library.optimizers import OptimizerConfig, parse_optimizer_args, resolve_optimizer_type

    try:
        return OptimizerConfig(
            optimizer_type=resolve_optimizer_type(args.optimizer_type, use_8bit_adam=args.use_8bit_adam,
                                                  use_lion_optimizer=args.use_lion_optimizer),
            learning_rate=args.learning_rate, optimizer_args=parse_optimizer_args(args.optimizer_args),
            max_grad_norm=args.max_grad_norm, lr_scheduler=args.lr_scheduler, lr_warmup_steps=args.lr_warmup_steps,
            lr_scheduler_num_cycles=args.lr_scheduler_num_cycles, lr_scheduler_power=args.lr_scheduler_power,
            lr_scheduler_type=args.lr_scheduler_type or "",
            lr_scheduler_args=parse_optimizer_args(args.lr_scheduler_args, flag="--lr_scheduler_args"),
            lr_decay_steps=args.lr_decay_steps, lr_scheduler_timescale=args.lr_scheduler_timescale,
            lr_scheduler_min_lr_ratio=args.lr_scheduler_min_lr_ratio)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


# Arguments never sent to a tracker with --log_config: secrets, and local paths (they name users' folders).
_PRIVATE_ARGUMENTS = ("wandb_api_key", "huggingface_token")
_PATH_SUFFIXES = ("_dir", "_path", "_file", "_json", "_config", "pretrained_model_name_or_path", "vae",
                  "network_weights", "base_weights", "resume", "sample_prompts")


def log_settings(args: argparse.Namespace, *, default_project: str, output_dir: Path) -> run_logging.LogSettings | None:
    """What --logging_dir / --log_with / --log_* ask for (None: no logging)."""
    backends = run_logging.backends_for(args.log_with, args.logging_dir)
    if not backends:
        return None
    logging_dir = run_logging.timestamped_dir(args.logging_dir, args.log_prefix) if args.logging_dir else None
    wandb_init = {}
    if args.log_tracker_config:
        try:
            wandb_init = dict(tomllib.loads(Path(args.log_tracker_config).read_text(encoding="utf-8")).get("wandb", {}))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as e:
            raise SystemExit(f"error: --log_tracker_config {args.log_tracker_config}: {e}") from None
    config = {}
    if args.log_config:
        config = {k: v for k, v in vars(args).items()
                  if k not in _PRIVATE_ARGUMENTS and not k.endswith(_PATH_SUFFIXES) and v is not None}
    return run_logging.LogSettings(
        logging_dir=logging_dir, backends=backends, project=args.log_tracker_name or default_project,
        run_name=args.wandb_run_name, wandb_dir=logging_dir or output_dir, wandb_init=wandb_init,
        api_key=args.wandb_api_key, config=config)


def ddp_settings(args: argparse.Namespace) -> DDPSettings:
    """--ddp_timeout, --ddp_gradient_as_bucket_view, --ddp_static_graph (kohya's)."""
    return DDPSettings(timeout_minutes=args.ddp_timeout, gradient_as_bucket_view=args.ddp_gradient_as_bucket_view,
                       static_graph=args.ddp_static_graph)


def deepspeed_settings(args: argparse.Namespace):
    """kohya's DeepSpeed flags as typed settings; None without --deepspeed."""
    if not getattr(args, "deepspeed", False):  # the cache tools have no DeepSpeed flags
        return None
    from library.deepspeed_engine import DeepSpeedSettings

    return DeepSpeedSettings(
        zero_stage=args.zero_stage, offload_optimizer_device=args.offload_optimizer_device,
        offload_optimizer_nvme_path=args.offload_optimizer_nvme_path, offload_param_device=args.offload_param_device,
        offload_param_nvme_path=args.offload_param_nvme_path, zero3_init_flag=args.zero3_init_flag,
        zero3_save_16bit_model=args.zero3_save_16bit_model,
        fp16_master_weights_and_gradients=args.fp16_master_weights_and_gradients or args.full_fp16)


def check_deepspeed(args: argparse.Namespace) -> list[str]:
    settings = deepspeed_settings(args)
    if settings is None:
        given = [flag for flag, value in (("--zero_stage", args.zero_stage != 2),
                                           ("--offload_optimizer_device", args.offload_optimizer_device),
                                           ("--offload_optimizer_nvme_path", args.offload_optimizer_nvme_path),
                                           ("--offload_param_device", args.offload_param_device),
                                           ("--offload_param_nvme_path", args.offload_param_nvme_path),
                                           ("--zero3_init_flag", args.zero3_init_flag),
                                           ("--zero3_save_16bit_model", args.zero3_save_16bit_model),
                                           ("--fp16_master_weights_and_gradients",
                                            args.fp16_master_weights_and_gradients)) if value]
        return [f"{', '.join(given)}: DeepSpeed options; add --deepspeed (or drop them)"] if given else []
    from library.deepspeed_engine import check_deepspeed_flags

    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:  # an optional dependency
        return ["--deepspeed: the deepspeed package is not installed; install it with "
                "`DS_BUILD_OPS=0 pip install deepspeed` (its ops build when first used), or drop --deepspeed"]
    fused = "--fused_backward_pass" if getattr(args, "fused_backward_pass", False) else (
        "--fused_optimizer_groups" if getattr(args, "fused_optimizer_groups", None) else None)
    from library.optimizers import resolve_optimizer_type

    try:
        optimizer_type = resolve_optimizer_type(args.optimizer_type, use_8bit_adam=args.use_8bit_adam,
                                                use_lion_optimizer=args.use_lion_optimizer)
    except ValueError as e:
        return [str(e)]
    return check_deepspeed_flags(settings, optimizer_type=optimizer_type,
                                 mixed_precision=args.mixed_precision, full_bf16=args.full_bf16,
                                 fused_step_flag=fused)


def check_training_flags(args: argparse.Namespace, *, control_images: bool = False) -> None:
    """kohya's cross-flag rules (verify_training_args), with the flags named. `control_images`: the trainer reads
    --conditioning_data_dir as ControlNet conditions, not as --masked_loss masks."""
    problems = []
    if args.full_fp16 and args.mixed_precision != "fp16":
        problems.append("--full_fp16 requires --mixed_precision fp16")
    if args.full_bf16 and args.mixed_precision != "bf16":
        problems.append("--full_bf16 requires --mixed_precision bf16")
    if (args.cache_latents or args.cache_latents_to_disk) and (args.color_aug or args.random_crop):
        problems.append("--cache_latents cannot be combined with --color_aug or --random_crop (they change the "
                        "pixels every epoch); drop one of them")
    if args.max_token_length not in (None, 75, 150, 225):
        problems.append(f"--max_token_length {args.max_token_length}: must be 75, 150 or 225 (whole 75-token CLIP "
                        "chunks); leave it out for 75")
    if args.gradient_accumulation_steps < 1:
        problems.append("--gradient_accumulation_steps must be >= 1")
    problems += check_ddp_flags(ddp_settings(args), gradient_accumulation_steps=args.gradient_accumulation_steps)
    problems += check_deepspeed(args)
    problems += compilation.check_compile_flags(args.torch_compile, args.dynamo_backend)
    thumbnail = getattr(args, "metadata_thumbnail", None)
    if thumbnail and not Path(thumbnail).is_file():
        problems.append(f"--metadata_thumbnail {thumbnail}: no such image file")
    negative = getattr(args, "metadata_is_negative_embedding", None)
    if negative is not None and negative.lower() not in ("true", "false"):
        problems.append(f"--metadata_is_negative_embedding {negative}: give true or false")
    if args.train_batch_size < 1:
        problems.append("--train_batch_size must be >= 1")
    if (args.sample_every_n_steps or args.sample_every_n_epochs or args.sample_at_first) and not args.sample_prompts:
        problems.append("--sample_every_n_steps / --sample_every_n_epochs / --sample_at_first need --sample_prompts")
    if (problem := run_logging.check_available(args.log_with)):
        problems.append(problem)
    if args.log_tracker_config and not Path(args.log_tracker_config).is_file():
        problems.append(f"--log_tracker_config {args.log_tracker_config}: no such file")
    if args.wandb_api_key:
        logger.warning("--wandb_api_key: a key on the command line is visible to other users of this machine (and "
                       "in shell history); prefer `wandb login` or the WANDB_API_KEY environment variable")
    if control_images:
        if args.masked_loss:
            problems.append("--masked_loss: not supported in ControlNet training (--conditioning_data_dir holds the "
                            "control images)")
    elif args.masked_loss and not args.conditioning_data_dir:
        # The other half (a folder without --masked_loss) depends on the model: training_setup.check_condition_flags.
        problems.append("--masked_loss and --conditioning_data_dir go together (the masks are the R channel of "
                        "same-stem images in that folder; for PNG alpha use --alpha_mask)")
    if args.log_with in ("tensorboard", "all") and not args.logging_dir:
        problems.append(f"--log_with {args.log_with} needs --logging_dir (where to write the TensorBoard logs)")
    if getattr(args, "cpu_offload_checkpointing", False):
        problems.append("--cpu_offload_checkpointing: offloads the checkpointed activations of kohya's FLUX / SD3 "
                        "transformers; SD 1.x / 2.x / SDXL U-Nets cannot (kohya's SD scripts fail with it too): drop "
                        "it (--gradient_checkpointing alone saves the memory)")
    if args.xformers:
        logger.warning("--xformers: not used; attention runs through PyTorch SDPA (same memory savings, and "
                       "xformers cannot run on CPU)")
    if problems:
        raise SystemExit("error: " + "\n       ".join(problems))
