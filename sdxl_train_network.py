"""Train a LoRA / LoCon network for SDXL (kohya-ss/sd-scripts' sdxl_train_network.py interface).

    accelerate launch sdxl_train_network.py --pretrained_model_name_or_path sd_xl_base_1.0.safetensors \\
        --train_data_dir data --output_dir out --output_name my_lora --resolution 1024 \\
        --network_dim 16 --network_alpha 8 --learning_rate 1e-4 --max_train_epochs 10 --no_half_vae

The recipe is train_network.py's, unchanged: the SDXL family record supplies what differs (two text encoders,
their pooled output and each image's size/crop conditioning, 1024 px and 32 px buckets, the VAE scale), and the
LoRA file carries kohya's SDXL names (`lora_unet_input_blocks_...`, `lora_te1_`, `lora_te2_`). `--text_encoder_lr`
takes one value for both text encoders or two (CLIP ViT-L, then OpenCLIP bigG).
"""

from __future__ import annotations

import logging
import sys

import train_network
from library import train_args
from library import training_setup as setup
from library.families import ALL_UNET_INPUTS

TRAINS = setup.TrainedArchs("sdxl_train_network.py", ("sdxl",),
                            elsewhere=(("sd1", "train_network.py"), ("sd2", "train_network.py")),
                            inputs=ALL_UNET_INPUTS)


def setup_parser():
    parser = train_network.setup_parser()
    parser.description = __doc__
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = train_args.parse_args(setup_parser(), argv)
    train_network.train(args, TRAINS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
