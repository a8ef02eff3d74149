"""Convert a Stable Diffusion 1.x / 2.x / SDXL model between the original single-file layout (WebUI / ComfyUI
`.safetensors` / `.ckpt`) and diffusers folders, or between single-file formats and precisions.

kohya-ss/sd-scripts' interface:

    python tools/convert_diffusers20_original_sd.py model.safetensors out_diffusers_folder --use_safetensors
    python tools/convert_diffusers20_original_sd.py diffusers_folder out.safetensors --fp16

The output format follows the output path: `.safetensors`, `.ckpt`, or a folder (diffusers; `--use_safetensors`
for `.safetensors` weights inside). The family (SD 1.x, 2.x base, 2.x 768-v, SDXL base, SDXL refiner, and their
inpainting, depth and extra-channel models) is detected from the weights; `--v1` / `--v2` / `--v_parameterization`
are checked against it. (kohya's converter handles SD 1.x / 2.x only, and no inpainting or depth model; a folder is
the family's pipeline: StableDiffusionXLPipeline, StableDiffusionInpaintPipeline, StableDiffusionDepth2ImgPipeline...)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from library.atomic_files import OutputPathError, check_writable_output  # noqa: E402
from library.checkpoint_writer import SaveFormat, parse_save_precision, save_checkpoint  # noqa: E402
from library.sd_checkpoint import FamilyHints, read_checkpoint, with_linear_projection  # noqa: E402
from library.tensor_files import CheckpointError  # noqa: E402

logger = logging.getLogger("convert")


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    family = p.add_mutually_exclusive_group()
    family.add_argument("--v1", action="store_true", help="assert the model is SD 1.x (detected anyway)")
    family.add_argument("--v2", action="store_true", help="assert the model is SD 2.x (detected anyway)")
    p.add_argument("--v_parameterization", action="store_true",
                   help="the model predicts v (SD 2.x 768-v); only needed when the file does not say so itself")
    p.add_argument("--unet_use_linear_projection", action="store_true",
                   help="store the UNet's proj_in/proj_out as Linear (as stabilityai's SD 2.x diffusers models do)")
    p.add_argument("--fp16", action="store_true", help="save in fp16 (same as --save_precision_as fp16)")
    p.add_argument("--bf16", action="store_true", help="save in bf16 (same as --save_precision_as bf16)")
    p.add_argument("--float", action="store_true", help="save in fp32 (same as --save_precision_as float)")
    p.add_argument("--save_precision_as", choices=["fp16", "bf16", "float"], default=None,
                   help="save precision (default: as loaded)")
    p.add_argument("--epoch", type=int, default=None, help="epoch written into a .ckpt (default: the source's, else 0)")
    p.add_argument("--global_step", type=int, default=None,
                   help="global_step written into a .ckpt (default: the source's, else 0)")
    p.add_argument("--reference_model", default=None,
                   help="a local diffusers folder whose scheduler config to use when writing diffusers "
                        "(configs and tokenizer are shipped with this project; hub ids are not needed)")
    p.add_argument("--use_safetensors", action="store_true",
                   help="write .safetensors weights inside a diffusers folder")
    p.add_argument("--vae", default=None, help="replace the VAE with this file or folder while converting")
    p.add_argument("--extract_ema", action="store_true", help="use the EMA weights of an original checkpoint")
    p.add_argument("--allow_unsafe_pickle", action="store_true",
                   help="load a .ckpt that needs arbitrary Python objects; runs code from the file: only for "
                        "files you trust")
    p.add_argument("--variant", default=None,
                   help="read a diffusers folder's variant weight files, e.g. fp16 (diffusion_pytorch_model.fp16."
                        "safetensors, as diffusers' variant=)")
    p.add_argument("--metadata", default=None,
                   help="metadata to write into an output .safetensors: a dict as JSON or a Python literal, e.g. "
                        "'{\"modelspec.title\": \"my model\"}' (kohya's flag; read with ast.literal_eval, never run)")
    p.add_argument("model_to_load", help="original .safetensors/.ckpt file, or diffusers folder")
    p.add_argument("model_to_save", help="output: .safetensors, .ckpt, or a folder (diffusers)")
    return p


def save_precision(args: argparse.Namespace) -> str | None:
    chosen = [name for name, on in (("fp16", args.fp16), ("bf16", args.bf16), ("float", args.float)) if on]
    if args.save_precision_as:
        chosen.append(args.save_precision_as)
    if len(set(chosen)) > 1:
        raise SystemExit(f"error: conflicting precisions {chosen}: give one of --fp16 / --bf16 / --float / "
                         "--save_precision_as")
    return chosen[0] if chosen else None


def convert(args: argparse.Namespace) -> Path:
    source, dest = Path(args.model_to_load), Path(args.model_to_save)
    fmt = SaveFormat.from_path(dest, use_safetensors=args.use_safetensors)
    dtype = parse_save_precision(save_precision(args))
    inputs = [source] + ([Path(args.vae)] if args.vae else [])
    check_writable_output(dest, sources=inputs)
    check_no_overlap(dest, inputs)
    hints = FamilyHints(v2=True if args.v2 else (False if args.v1 else None),
                        v_parameterization=args.v_parameterization)
    metadata = parse_metadata(args.metadata, fmt)
    with read_checkpoint(source, hints, extract_ema=args.extract_ema,
                         allow_unsafe_pickle=args.allow_unsafe_pickle, variant=args.variant) as checkpoint:
        logger.info("%s: %s", source, checkpoint.family.description)
        if args.vae:
            from library.model_loading import replace_vae

            replace_vae(checkpoint, args.vae, allow_unsafe_pickle=args.allow_unsafe_pickle)
        if args.unet_use_linear_projection:
            checkpoint = with_linear_projection(checkpoint)
        if args.reference_model:
            checkpoint = _with_reference_scheduler(checkpoint, Path(args.reference_model))
        if metadata:
            from dataclasses import replace

            checkpoint = replace(checkpoint, metadata={**checkpoint.metadata, **metadata})
        return save_checkpoint(checkpoint, dest, fmt, dtype=dtype, epoch=args.epoch, global_step=args.global_step,
                               progress=True)


def parse_metadata(text: str | None, fmt: SaveFormat) -> dict[str, str]:
    """--metadata: a dict (JSON, or a Python literal as kohya's examples write it) of names to values, written as
    strings into the .safetensors header. kohya eval()s the text; a literal is all a dict needs, and nothing runs."""
    if text is None:
        return {}
    import ast

    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
        raise ValueError(f"--metadata {text!r}: not a dict literal ({e}); e.g. "
                         "'{\"modelspec.title\": \"my model\"}'") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"--metadata {text!r}: give a dict of names (strings) to values")
    if fmt is not SaveFormat.SAFETENSORS:
        raise ValueError("--metadata: only a single .safetensors file holds metadata; save to a .safetensors path")
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in value.items()}


def check_no_overlap(dest: Path, sources: list[Path]) -> None:
    """Refuse an output that would replace or delete an input: a diffusers output folder replaces the whole folder
    (everything inside it, the input file too), and writing into an input diffusers folder overwrites its files."""
    def spellings(path: Path) -> set[Path]:
        return {Path(os.path.normpath(os.path.abspath(path))), Path(os.path.realpath(path))}

    for source in sources:
        for d in spellings(dest):
            for s in spellings(source):
                if s.is_relative_to(d) or d.is_relative_to(s):
                    where = "inside the input" if d.is_relative_to(s) else "a folder that contains the input"
                    raise OutputPathError(f"output path {dest} is {where} {source}; writing it would destroy the "
                                          "input - choose an output path outside it")


def _with_reference_scheduler(checkpoint, reference: Path):
    import json
    from dataclasses import replace

    config_path = reference / "scheduler" / "scheduler_config.json"
    if not config_path.is_file():
        logger.warning("--reference_model %s is not a local diffusers folder; using the shipped %s scheduler config "
                       "(no hub access is needed)", reference, checkpoint.family.name)
        return checkpoint
    scheduler = json.loads(config_path.read_text())
    scheduler = {k: v for k, v in scheduler.items() if not k.startswith("_") or k == "_class_name"}
    scheduler["prediction_type"] = checkpoint.prediction_type.value  # the model's, not the reference's
    return replace(checkpoint, configs=replace(checkpoint.configs, scheduler=scheduler))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    args = setup_parser().parse_args(argv)
    try:
        convert(args)
    except (CheckpointError, OutputPathError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
