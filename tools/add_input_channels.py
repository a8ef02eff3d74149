"""Widen a Stable Diffusion model's U-Net input (kohya's scripts have no such tool): make a text-to-image model an
inpainting model, or give it N channels of your own conditions. The new input weights are zero, so the widened
model generates what the original did until it is trained with the new inputs (bit for bit where the convolution
kernel sums the old channels in the same order, as the CPU's fp32 kernels do; else up to rounding: see
docs/benchmarks.md).

    python tools/add_input_channels.py --add_inpainting_channels my_model.safetensors my_model_inpainting.safetensors
    python tools/add_input_channels.py --extra_channels 3 my_model.safetensors my_model_3ch_diffusers

`--add_inpainting_channels`: RunwayML's layout, as every SD inpainting model and diffusers' inpainting pipelines
have it: 4 noisy latents, 1 mask, 4 masked-image latents (9 channels). The result is an `sd1-inpainting` /
`sd2-512-inpainting` / `sd2-768-v-inpainting` / `sdxl-inpainting` model that WebUI, ComfyUI and diffusers load as
such. `--extra_channels N`: the noisy latents, then N channels for your conditions (a `*-extra` model; N may not
make a released layout's width, which loaders would take for that kind of model).

Any layout the suite reads goes in; the output format follows the output path (`.safetensors`, `.ckpt`, or a
folder: diffusers). SD 1.x, SD 2.x and SDXL base models; the family is detected from the weights.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from library.atomic_files import OutputPathError, check_writable_output  # noqa: E402
from library.checkpoint_writer import SaveFormat, parse_save_precision, save_checkpoint  # noqa: E402
from library.families import EXTRA_CHANNELS, INPAINTING  # noqa: E402
from library.input_channels import widened  # noqa: E402
from library.sd_checkpoint import FamilyHints, read_checkpoint  # noqa: E402
from library.tensor_files import CheckpointError  # noqa: E402
from tools.convert_diffusers20_original_sd import check_no_overlap  # noqa: E402

logger = logging.getLogger("add_input_channels")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: give 1 or more channels")
    return value


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--add_inpainting_channels", action="store_true",
                      help="add a mask channel and 4 masked-image latent channels (9 in all): an inpainting model")
    what.add_argument("--extra_channels", type=_positive, metavar="N",
                      help="add N channels for conditions of your own after the noisy latents")
    p.add_argument("--v2", action="store_true", help="assert the model is SD 2.x (detected anyway)")
    p.add_argument("--v_parameterization", action="store_true",
                   help="the model predicts v (SD 2.x 768-v); only needed when the file does not say so itself")
    p.add_argument("--save_precision_as", choices=["fp16", "bf16", "float"], default=None,
                   help="save precision (default: as loaded)")
    p.add_argument("--use_safetensors", action="store_true",
                   help="write .safetensors weights inside a diffusers folder")
    p.add_argument("--allow_unsafe_pickle", action="store_true",
                   help="load a .ckpt that needs arbitrary Python objects; runs code from the file: only for "
                        "files you trust")
    p.add_argument("model_to_load", help="original .safetensors/.ckpt file, or diffusers folder")
    p.add_argument("model_to_save", help="output: .safetensors, .ckpt, or a folder (diffusers)")
    return p


def add_channels(args: argparse.Namespace) -> Path:
    source, dest = Path(args.model_to_load), Path(args.model_to_save)
    fmt = SaveFormat.from_path(dest, use_safetensors=args.use_safetensors)
    dtype = parse_save_precision(args.save_precision_as)
    check_writable_output(dest, sources=[source])
    check_no_overlap(dest, [source])
    hints = FamilyHints(v2=True if args.v2 else None, v_parameterization=args.v_parameterization)
    with read_checkpoint(source, hints, allow_unsafe_pickle=args.allow_unsafe_pickle) as checkpoint:
        inputs = INPAINTING if args.add_inpainting_channels else EXTRA_CHANNELS
        model = widened(checkpoint, inputs, extra_channels=args.extra_channels)
        logger.info("%s: %s -> %s (U-Net %s; the new channels' weights are zero)", source,
                    checkpoint.family.name, model.family.name,
                    model.family.unet_inputs.describe(model.configs.unet["in_channels"]))
        return save_checkpoint(model, dest, fmt, dtype=dtype, progress=True)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    args = setup_parser().parse_args(argv)
    try:
        dest = add_channels(args)
    except (CheckpointError, OutputPathError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"written to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
