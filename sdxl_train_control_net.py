"""Train a ControlNet for SDXL (kohya-ss/sd-scripts' sdxl_train_control_net.py, and the diffusers
train_controlnet_sdxl.py example's flags).

    accelerate launch sdxl_train_control_net.py --pretrained_model_name_or_path sd_xl_base_1.0.safetensors \\
        --train_data_dir images --conditioning_data_dir edges --output_dir out --output_name my_controlnet \\
        --resolution 1024 --learning_rate 1e-5 --control_net_lr 1e-4 --max_train_steps 10000 \\
        --cache_text_encoder_outputs --validation_image edges/0001.png --validation_prompt "a red house"

The recipe is train_controlnet.py's, unchanged: the SDXL family record supplies the two text encoders, their pooled
output and each image's size/crop conditioning (which the ControlNet receives as the U-Net does), the VAE scale and
32 px buckets. As in kohya's script, `--control_net_lr` (default 1e-4) is the learning rate of the modules a
ControlNet adds (conditioning-image encoder, zero convolutions) and `--learning_rate` that of the copied U-Net
encoder. Saved as `<name>.safetensors` with diffusers' key names (how SDXL ControlNets are shared; WebUI's
ControlNet extension and ComfyUI load them) and/or a diffusers folder for `StableDiffusionXLControlNetPipeline`.
`--controlnet_model_name_or_path` also reads kohya's own SDXL ControlNet files and original-layout ones.
"""

from __future__ import annotations

import argparse
import logging
import sys

import train_controlnet
from library import train_args
from library import training_setup as setup

TRAINS = setup.TrainedArchs("sdxl_train_control_net.py", ("sdxl",),
                            elsewhere=(("sd1", "train_controlnet.py"), ("sd2", "train_controlnet.py")))
KOHYA_CONTROL_NET_LR = 1e-4  # kohya's default --control_net_lr in sdxl_train_control_net.py


def setup_parser() -> argparse.ArgumentParser:
    parser = train_controlnet.setup_parser(control_net_lr=KOHYA_CONTROL_NET_LR)
    parser.description = __doc__
    d = parser.add_argument_group("diffusers train_controlnet_sdxl.py names")
    d.add_argument("--pretrained_vae_model_name_or_path", dest="vae", default=argparse.SUPPRESS,
                   help="= --vae (e.g. the fp16-fix SDXL VAE)")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = train_controlnet.diffusers_example_flags(train_args.parse_args(setup_parser(), argv))
    train_controlnet.train(args, TRAINS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
