"""Convert an SD 1.x / 2.x / SDXL ControlNet between the single file WebUI's ControlNet extension and ComfyUI load
and a diffusers ControlNetModel folder, or change its precision.

    python tools/convert_controlnet.py control_v11p_sd15_canny.safetensors canny_diffusers --base_family sd1
    python tools/convert_controlnet.py canny_diffusers canny.safetensors --save_precision fp16

The output layout follows the output path: `.safetensors` = one file (modelspec metadata; `.pth` / `.ckpt` also
work, without metadata) with the key names that family's files use (SD 1.x / 2.x: lllyasviel's original
`control_model.*` layout; SDXL: diffusers names, as every public SDXL ControlNet), a folder = diffusers. An original file does not record
its config: it is derived from the base model (`--base_family`, or `--base_model` to take the base's own U-Net
config) and checked against the file's shapes.
SD 1.x is detected without either; SD 2.x needs to be told base (512) or 768-v. Inputs: original `.safetensors`
/ `.pth` / `.ckpt` (with or without the `control_model.` prefix) or a diffusers folder.
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
from library.checkpoint_writer import parse_save_precision  # noqa: E402
from library.controlnet_checkpoint import (  # noqa: E402
    CONTROLNET_FAMILIES, ControlNetLayout, read_controlnet, save_controlnet)
from library.sd_checkpoint import read_checkpoint, require_arch  # noqa: E402
from library.tensor_files import CheckpointError  # noqa: E402
from tools.convert_diffusers20_original_sd import check_no_overlap  # noqa: E402

logger = logging.getLogger("convert_controlnet")


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    base = p.add_mutually_exclusive_group()
    base.add_argument("--base_family", choices=list(CONTROLNET_FAMILIES), default=None,
                      help="the base model family the ControlNet belongs to (checked against the weights)")
    base.add_argument("--base_model", default=None,
                      help="the base model (original file or diffusers folder); its U-Net config is used")
    p.add_argument("--save_precision", choices=["float", "fp16", "bf16"], default=None,
                   help="save precision (default: as loaded)")
    p.add_argument("--allow_unsafe_pickle", action="store_true",
                   help="load a .pth/.ckpt that needs arbitrary Python objects; runs code from the file: only for "
                        "files you trust")
    p.add_argument("input", help="original .safetensors/.pth/.ckpt ControlNet, or a diffusers ControlNet folder")
    p.add_argument("output",
                   help="output: .safetensors (one file; .pth/.ckpt without metadata) or a folder (diffusers)")
    return p


def convert(args: argparse.Namespace) -> Path:
    source, dest = Path(args.input), Path(args.output)
    ControlNetLayout.from_path(dest)  # an unusable suffix fails before any work
    dtype = parse_save_precision(args.save_precision)
    inputs = [source] + ([Path(args.base_model)] if args.base_model else [])
    check_writable_output(dest, sources=inputs)
    check_no_overlap(dest, inputs)
    family = CONTROLNET_FAMILIES[args.base_family] if args.base_family else None
    base_unet_config = None
    if args.base_model:
        with read_checkpoint(args.base_model, allow_unsafe_pickle=args.allow_unsafe_pickle) as base:
            require_arch(base, "convert_controlnet.py", tuple(sorted({f.arch for f in CONTROLNET_FAMILIES.values()})))
            family, base_unet_config = base.family, base.configs.unet
        logger.info("base model %s: %s", args.base_model, family.description)
    with read_controlnet(source, family=family, base_unet_config=base_unet_config,
                         allow_unsafe_pickle=args.allow_unsafe_pickle) as checkpoint:
        return save_controlnet(checkpoint, dest, dtype=dtype, progress=True)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    args = setup_parser().parse_args(argv)
    try:
        written = convert(args)
    except (CheckpointError, OutputPathError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logger.info("wrote %s", written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
