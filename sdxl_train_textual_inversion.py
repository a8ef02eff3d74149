"""Textual inversion for SDXL: teach both text encoders a new word (kohya-ss/sd-scripts'
sdxl_train_textual_inversion.py interface).

    accelerate launch sdxl_train_textual_inversion.py --pretrained_model_name_or_path sd_xl_base_1.0.safetensors \\
        --train_data_dir data --output_dir out --output_name mychar --token_string mychar --init_word girl \\
        --num_vectors_per_token 4 --resolution 1024 --learning_rate 5e-3 --max_train_steps 2000 \\
        --no_half_vae --save_model_as safetensors

The recipe is train_textual_inversion.py's, unchanged: the SDXL family record supplies what differs. The word gets
vectors in CLIP ViT-L and in OpenCLIP bigG (each from --init_word in that encoder's own table), trained together;
the captions reach the U-Net through the family's conditioner (both encoders' hidden states, bigG's pooled output,
each image's size/crop ids). The file holds one tensor per encoder, `clip_l` [n, 768] and `clip_g` [n, 1280]: the
SDXL embedding layout WebUI and ComfyUI read (and kohya writes), `.safetensors` with metadata or the same dict in a
`.pt` (the default, as kohya). `--weights` takes such a file to continue from.
"""

from __future__ import annotations

import logging
import sys

import train_textual_inversion
from library import train_args
from library import training_setup as setup

TRAINS = setup.TrainedArchs("sdxl_train_textual_inversion.py", ("sdxl",),
                            elsewhere=(("sd1", "train_textual_inversion.py"), ("sd2", "train_textual_inversion.py")))


def setup_parser():
    parser = train_textual_inversion.setup_parser()
    parser.description = __doc__
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = train_args.parse_args(setup_parser(), argv)
    train_textual_inversion.train(args, TRAINS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
