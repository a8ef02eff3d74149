"""Generate images with a Stable Diffusion 1.x / 2.x / SDXL model (kohya-ss/sd-scripts' gen_img.py interface).

    python gen_img.py --ckpt model.safetensors --outdir outputs --W 512 --H 512 --steps 30 --sampler euler_a \\
        --network_weights my_lora.safetensors --network_mul 0.8 --seed 42 --images_per_prompt 4 \\
        --prompt "a photo of a (red:1.2) car --n blurry, lowres"

The recipe: check options -> open the model (any layout, family detected) -> read the prompts -> load the weights
-> apply or merge the networks -> plan seeds and batches (kohya's rules) -> generate with `library/sampling.py`
(the code the trainers' sample images use) -> save PNGs that carry WebUI's "parameters" text. The flags and their
checks live in `library/gen_img_args.py`, the generation once everything is loaded (batches, the highres fix's
stages, file names, interactive and module prompts) in `library/gen_img_run.py`.

Prompts (`--prompt`, or `--from_file` with one per line) take kohya's per-prompt options: `--n` negative prompt,
`--w` / `--h` size, `--d` seeds (comma list, one per image), `--l` CFG scale, `--s` steps, `--ss` sampler, `--t`
img2img strength, `--am` network multipliers, `--f` file name, and for SDXL `--ow` / `--oh` / `--nw` / `--nh` /
`--ct` / `--cl` (size conditioning; `--original_width` etc. set them for every prompt). Weights `(word:1.2)`,
`[word]` and `BREAK` are read as WebUI reads them; prompts longer than 75 tokens use 2 or 3 CLIP windows (up to
225 tokens), through both encoders for SDXL. The SDXL refiner works as img2img (`--image_path`).

Inpainting and models with extra inputs (`library/generation_inputs.py` says which diffusers pipeline gets what):
`--image_path` with `--mask_path` (kohya's flags; white: repaint) inpaints with an inpainting model, and repaints by
masked img2img with a text-to-image one; an inpainting model without `--image_path` generates from the prompt alone.
An SD 2.x depth model takes its depth map (`--depth_path`), an extra-channel model (tools/add_input_channels.py
--extra_channels N) its condition image (`--condition_path`, N bands); each, or a prompt's `--cn` file, with or
without `--image_path` (without: depth2img starts from a mid-gray image at strength 1). Each of these flags takes a
file, or a folder whose images are used in turn, image by image (kohya's rule for --image_path and --mask_path);
masks, maps and condition images are resized to their image's size and must have its aspect ratio.

kohya's highres fix (`--highres_fix_*`, `library/highres_fix.py`): each image first at a fraction of its size, then
again at full size by img2img from the enlarged first image (`BatchMaker` runs the two stages). ControlNet guidance
(`--control_net_*`, `--guide_image_path`, a prompt's `--cn`; `library/guidance.py`) through diffusers' ControlNet
pipelines.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from library import sampling  # noqa: E402
from library import textual_inversion as ti  # noqa: E402
from library import vae_row_slicing  # noqa: E402
from library.families import ALL_UNET_INPUTS  # noqa: E402
from library.gen_img_args import (NetworkSpec, check_args, check_image_inputs, fail, highres_fix,  # noqa: E402
                                  network_specs, read_prompts)
from library.gen_img_args import setup_parser as _setup_parser  # noqa: E402
from library.gen_img_run import (Generation, input_files, interactive, load_controlnets,  # noqa: E402
                                 load_init_images, module_prompts)
from library.model_loading import SDModels, TextModelShim, instantiate_models, replace_vae  # noqa: E402
from library.sd_checkpoint import FamilyHints, SDCheckpoint, read_checkpoint, require_arch  # noqa: E402
from library.tensor_files import CheckpointError, open_tensor_file  # noqa: E402
from library.text_conditioning import CaptionEncoding, conditioner_for  # noqa: E402
from library.train_args import configure_console_log  # noqa: E402
from networks.lora_files import other_unet_inputs_note  # noqa: E402

logger = logging.getLogger("gen_img")


def setup_parser() -> argparse.ArgumentParser:
    """kohya's gen_img flags (library/gen_img_args.py), with this script's docstring as the help text."""
    return _setup_parser(__doc__)


# ----------------------------------------------------------------------------------------------------------
# Models and networks


def read_model(args: argparse.Namespace) -> SDCheckpoint:
    """The model (`--ckpt`, `--vae`), family checked against `--v1` / `--v2` / `--v_parameterization`. Tensors are
    read later, by `load_models`; the family is known at once."""
    hints = FamilyHints(v2=True if args.v2 else (False if args.v1 else None),
                        v_parameterization=args.v_parameterization)
    try:
        checkpoint = read_checkpoint(args.ckpt, hints, allow_unsafe_pickle=args.allow_unsafe_pickle)
        require_arch(checkpoint, "gen_img.py", archs=("sd1", "sd2", "sdxl", "sdxl-refiner"),
                     inputs=ALL_UNET_INPUTS)
        if args.sdxl and checkpoint.family.arch not in ("sdxl", "sdxl-refiner"):
            checkpoint.close()
            raise CheckpointError(f"{args.ckpt}: --sdxl was given, but the model is {checkpoint.family.description}. "
                                  "Remove --sdxl; the family is detected from the file.")
        if checkpoint.family.arch == "sdxl-refiner" and not args.image_path:
            checkpoint.close()
            raise CheckpointError(f"{args.ckpt}: the SDXL refiner refines an image (img2img): give --image_path "
                                  "(e.g. images made with the base model)")
        if args.vae:
            replace_vae(checkpoint, args.vae, allow_unsafe_pickle=args.allow_unsafe_pickle)
    except CheckpointError as e:
        raise fail(str(e)) from None
    logger.info("%s: %s (%s)", args.ckpt, checkpoint.family.description, checkpoint.prediction_type.value)
    return checkpoint


def load_models(checkpoint: SDCheckpoint, device: torch.device, dtype: torch.dtype, *,
                no_half_vae: bool = False, channels_last: bool = False, vae_slices: int | None = None) -> SDModels:
    """The models on the device. `channels_last` (kohya's --opt_channels_last): the U-Net and VAE in PyTorch's
    channels-last memory format, which some GPU convolution kernels run faster; the same numbers either way.
    `vae_slices` (kohya's --vae_slices): the VAE encodes and decodes in that many bands of rows
    (library/vae_row_slicing.py)."""
    with checkpoint:  # --no_half_vae: the VAE stays fp32 (the SDXL VAE overflows in fp16)
        models = instantiate_models(checkpoint, dtype=dtype,
                                    component_dtypes={"vae": torch.float32} if no_half_vae else None)
    for model in (models.unet, models.vae, *models.text_encoders):
        # Not requires_grad_(False): sampling runs under no_grad anyway, and frozen weights can make CPU kernels
        # round differently from diffusers' own pipelines (seen on the SD 2.x U-Net: 6e-5).
        model.to(device)
    if channels_last:
        for model in (models.unet, models.vae):
            model.to(memory_format=torch.channels_last)
    if vae_slices is not None:
        try:
            vae_row_slicing.enable(models.vae, vae_slices)
        except ValueError as e:
            raise fail(str(e)) from None
    return models


def add_networks(specs: list[NetworkSpec], models: SDModels, device: torch.device, dtype: torch.dtype, *,
                 show_meta: bool = False, pre_calc: bool = False, channels_last: bool = False) -> list:
    """Merge or apply each network (kohya's create_network_from_weights interface); returns the applied ones with
    their `--network_mul` (`--am` changes their multipliers per prompt). `show_meta`: log each file's metadata;
    `pre_calc`: back the applied networks' layers up for kohya's per-batch pre-calculation (its networks'
    backup_weights / pre_calculation / restore_weights)."""
    applied = []
    if pre_calc and all(spec.merge for spec in specs):
        raise fail("--network_pre_calc pre-calculates applied networks per batch; "
                   + ("all networks are merged (--network_merge)" if specs else "there are none (--network_weights)"))
    for spec in specs:
        if show_meta:  # kohya logs a .safetensors file's metadata (other files have none)
            logger.info("metadata of %s: %s", spec.weights, lora_file_metadata(spec.weights) or "(none)")
        module = importlib.import_module(spec.module)
        # External kohya-interface modules name text-encoder layers by module path; see TextModelShim.
        # kohya's interface: one text encoder, or SDXL's two as a list.
        # Our modules (networks.lora, lora_fa, dylora, oft: FILE_LAYOUT) name text-encoder layers as the files do.
        encoders = models.text_encoders if getattr(module, "FILE_LAYOUT", None) else \
            [TextModelShim(encoder) for encoder in models.text_encoders]
        text_encoder = encoders[0] if len(encoders) == 1 else encoders
        try:
            network, weights = module.create_network_from_weights(spec.multiplier, str(spec.weights), models.vae,
                                                                  text_encoder, models.unet, for_inference=True,
                                                                  **spec.kwargs)
            check_fit(network, weights, spec.weights, models.family.description)
            if note := other_unet_inputs_note(str(spec.weights), lora_file_metadata(spec.weights), models.family):
                logger.info("%s", note)
            if spec.merge and not network.is_mergeable():
                logger.warning("%s: this network cannot be merged; applying it instead", spec.weights)
            if spec.merge and network.is_mergeable():
                network.merge_to(text_encoder, models.unet, weights, dtype=dtype, device=device)
                logger.info("merged %s (multiplier %s)", spec.weights, spec.multiplier)
                continue
            network.apply_to(text_encoder, models.unet)
            info = network.load_state_dict(weights, strict=False)
        except (ValueError, RuntimeError, NotImplementedError) as e:  # RuntimeError: torch's shape mismatch
            raise fail(f"--network_weights {spec.weights}: {e}") from None
        if info.unexpected_keys:
            raise fail(f"--network_weights {spec.weights}: {len(info.unexpected_keys)} key(s) the network does not "
                       f"have: {', '.join(info.unexpected_keys[:10])}")
        if info.missing_keys:
            logger.warning("%s lacks %d key(s) of its network (those modules do nothing): %s", spec.weights,
                           len(info.missing_keys), ", ".join(info.missing_keys[:10]))
        network.to(device, dtype).eval()
        if channels_last:  # kohya's --opt_channels_last, for the networks' convolutions too
            network.to(memory_format=torch.channels_last)
        if pre_calc:
            missing = [m for m in ("backup_weights", "pre_calculation", "restore_weights") if not hasattr(network, m)]
            if missing:
                raise fail(f"--network_pre_calc: {spec.module}'s network has no {', '.join(missing)} (kohya's "
                           "pre-calculation interface); run without --network_pre_calc")
            network.backup_weights()
        applied.append((network, spec.multiplier))
        logger.info("applied %s (multiplier %s)", spec.weights, spec.multiplier)
    return applied


def lora_file_metadata(path: Path) -> dict[str, str]:
    """A network file's metadata (safetensors; none in a pickle), read without its tensors."""
    if path.suffix.lower() != ".safetensors":
        return {}
    try:
        with open_tensor_file(path) as source:
            return dict(source.metadata)
    except CheckpointError:
        return {}


def check_fit(network, weights: dict, file: Path, model: str) -> None:
    """Refuse a network file whose tensors do not fit this model's layers, in one line that says how many did."""
    own = network.state_dict()
    misfits = [k for k, v in weights.items() if k not in own or tuple(v.shape) != tuple(own[k].shape)]
    if misfits:
        raise fail(f"--network_weights {file}: {len(weights) - len(misfits)} of {len(weights)} tensors fit this model "
                   f"({model}); {len(misfits)} do not, e.g. {misfits[0]} "
                   f"{tuple(weights[misfits[0]].shape)}. Is it a network for another model family?")


# ----------------------------------------------------------------------------------------------------------
# The recipe


def run(args: argparse.Namespace) -> list[Path]:
    configure_console_log(args)
    device, dtype = check_args(args)
    specs = network_specs(args)
    applied_count = sum(not spec.merge for spec in specs)
    init_files, init_images = load_init_images(args.image_path)
    files = input_files(args)
    checkpoint = read_model(args)
    try:
        prompts = read_prompts(args, checkpoint.family, applied_count)
        check_image_inputs(args, checkpoint.family, prompts)
    except SystemExit:
        checkpoint.close()
        raise
    models = load_models(checkpoint, device, dtype, no_half_vae=args.no_half_vae,
                         channels_last=args.opt_channels_last, vae_slices=args.vae_slices)
    try:  # the caption encoding must suit the family (SDXL conditions on fixed layers: no --clip_skip)
        conditioner_for(models.family, models.tokenizers, models.text_encoders, CaptionEncoding(clip_skip=args.clip_skip))
    except ValueError as e:
        raise fail(str(e)) from None
    applied = add_networks(specs, models, device, dtype, show_meta=args.network_show_meta,
                           pre_calc=args.network_pre_calc, channels_last=args.opt_channels_last)
    try:  # textual-inversion words: the prompt word is the file name (WebUI's rule)
        words = ti.load_embeddings(models, args.textual_inversion_embeddings or [])
    except ValueError as e:
        raise fail(f"--textual_inversion_embeddings: {e}") from None
    generation = Generation(args, models, applied, words, fix=highres_fix(args, device, dtype),
                            control=load_controlnets(args, models, device, dtype), init_files=init_files,
                            init_images=init_images, files=files)
    try:
        if args.interactive:
            return interactive(generation, sys.stdin)
        iterations = module_prompts(args, generation, applied_count) if args.from_module else None
        shuffle = random.Random(f"shuffle_prompts {args.seed}") if args.shuffle_prompts and args.seed is not None \
            else random.Random() if args.shuffle_prompts else None
        jobs = sampling.plan_images(prompts, images_per_prompt=args.images_per_prompt, n_iter=args.n_iter,
                                    seed=args.seed, iter_same_seed=args.iter_same_seed, shuffle=shuffle,
                                    iterations=iterations)
        written = generation.images(jobs)
    finally:
        generation.close()
    logger.info("wrote %d image(s) to %s", len(written), args.outdir)
    return written


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 once every image is written; a problem ends it through SystemExit with its message
    (exit status 1), like the other scripts. `run` returns the written paths, for callers in Python."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    run(setup_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
