"""Fine-tune a whole Stable Diffusion 1.x / 2.x model (U-Net, optionally the text encoder) from captioned images
(kohya-ss/sd-scripts' fine_tune.py interface).

    accelerate launch fine_tune.py --pretrained_model_name_or_path model.safetensors \\
        --train_data_dir images --in_json meta_lat.json --output_dir out --output_name my_model \\
        --resolution 512 --learning_rate 2e-6 --max_train_epochs 10 --use_ema

Data: kohya metadata (`--in_json`, JSON or JSONL, from the finetune/ tools), a diffusers image folder with
`metadata.jsonl` / `metadata.csv`, or the dataset TOML. The text encoder trains only with `--train_text_encoder`.
The recipe is the shared full-model one (library/full_finetune.py); the output is a complete checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from library import train_args  # noqa: E402
from library.full_finetune import FullModelRecipe, add_full_model_arguments, train_full_model  # noqa: E402

logger = logging.getLogger("fine_tune")


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train_args.add_common_training_arguments(p)
    add_full_model_arguments(p)
    p.add_argument("--train_text_encoder", action="store_true", help="train the text encoder too")
    p.add_argument("--diffusers_xformers", dest="xformers", action="store_true", help="kohya's alias of --xformers")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = train_args.parse_args(setup_parser(), argv)
    train_full_model(args, FullModelRecipe(name="fine_tune", train_text_encoder=args.train_text_encoder,
                                           text_encoder_lrs=(args.learning_rate_te,)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
