"""Fine-tune or DreamBooth a whole SDXL base model: the U-Net, optionally either text encoder (kohya-ss/sd-scripts'
sdxl_train.py interface).

    accelerate launch sdxl_train.py --pretrained_model_name_or_path sd_xl_base_1.0.safetensors \\
        --train_data_dir data --output_dir out --output_name my_sdxl --resolution 1024 \\
        --learning_rate 1e-6 --optimizer_type Adafactor --fused_backward_pass --full_bf16 \\
        --gradient_checkpointing --max_train_steps 2000 --no_half_vae

Data as in train_db.py (DreamBooth folders, with --reg_data_dir and --prior_loss_weight) or fine_tune.py
(--in_json metadata, a diffusers image folder, the dataset TOML). `--train_text_encoder` trains CLIP ViT-L and
OpenCLIP bigG too, at `--learning_rate_te1` / `--learning_rate_te2` (default --learning_rate; 0 keeps one frozen);
`--block_lr` gives each of the U-Net's 23 blocks its own rate (0 freezes a block). The recipe is the shared
full-model one (library/full_finetune.py); the output is a complete SDXL checkpoint (single file or diffusers).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from library import train_args  # noqa: E402
from library.full_finetune import FullModelRecipe, add_full_model_arguments, train_full_model  # noqa: E402
from library.unet_blocks import parse_block_lr  # noqa: E402

logger = logging.getLogger("sdxl_train")


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train_args.add_common_training_arguments(p, implemented=(train_args.TEXT_ENCODER_CACHE_FLAG,))
    add_full_model_arguments(p)
    g = p.add_argument_group("SDXL")
    g.add_argument("--train_text_encoder", action="store_true", help="train the text encoders too")
    g.add_argument("--learning_rate_te1", type=float, default=None,
                   help="CLIP ViT-L's learning rate (default --learning_rate; 0 keeps it frozen)")
    g.add_argument("--learning_rate_te2", type=float, default=None,
                   help="OpenCLIP bigG's learning rate (default --learning_rate; 0 keeps it frozen)")
    g.add_argument("--block_lr", default=None,
                   help="23 comma-separated learning rates, one per U-Net block (0: time/label embeddings, 1-9: "
                        "input_blocks, 10-12: middle_block, 13-21: output_blocks, 22: out); 0 freezes a block")
    g.add_argument("--diffusers_xformers", dest="xformers", action="store_true", help="kohya's alias of --xformers")
    train_args.add_text_encoder_cache_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = train_args.parse_args(setup_parser(), argv)
    if args.learning_rate_te is not None:
        raise SystemExit("error: --learning_rate_te: SDXL has two text encoders; use --learning_rate_te1 (CLIP ViT-L) "
                         "and --learning_rate_te2 (OpenCLIP bigG)")
    try:
        block_lrs = tuple(parse_block_lr(args.block_lr)) if args.block_lr else None
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    recipe = FullModelRecipe(
        name="sdxl_train", train_text_encoder=args.train_text_encoder,
        text_encoder_lrs=(args.learning_rate_te1, args.learning_rate_te2), unet_block_lrs=block_lrs,
        families=("sdxl",), elsewhere=(("sd1", "train_db.py or fine_tune.py"), ("sd2", "train_db.py or fine_tune.py")))
    train_full_model(args, recipe)
    return 0


if __name__ == "__main__":
    sys.exit(main())
