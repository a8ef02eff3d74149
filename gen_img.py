"""Generate images with a Stable Diffusion 1.x / 2.x / SDXL model (kohya-ss/sd-scripts' gen_img.py interface).

    python gen_img.py --ckpt model.safetensors --outdir outputs --W 512 --H 512 --steps 30 --sampler euler_a \\
        --network_weights my_lora.safetensors --network_mul 0.8 --seed 42 --images_per_prompt 4 \\
        --prompt "a photo of a (red:1.2) car --n blurry, lowres"

The recipe: check options -> open the model (any layout, family detected) -> read the prompts -> load the weights
-> apply or merge the networks -> plan seeds and batches (kohya's rules) -> generate with `library/sampling.py`
(the code the trainers' sample images use) -> save PNGs that carry WebUI's "parameters" text.

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
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from library import guidance, sampling  # noqa: E402
from library import generation_inputs as gi  # noqa: E402
from library.families import ALL_UNET_INPUTS, DEPTH, EXTRA_CHANNELS, INPAINTING, TEXT_TO_IMAGE  # noqa: E402
from library import textual_inversion as ti  # noqa: E402
from library.highres_fix import FIRST_STAGE_MULTIPLE, HighresFix, load_upscaler  # noqa: E402
from library.model_loading import SDModels, TextModelShim, instantiate_models, replace_vae  # noqa: E402
from library.sampling import ImageJob, PromptFileError, SamplePrompt  # noqa: E402
from library.sd_checkpoint import FamilyHints, SDCheckpoint, read_checkpoint, require_arch  # noqa: E402
from library.tensor_files import CheckpointError, open_tensor_file  # noqa: E402
from library.text_encoding import CHUNK, fitting_token_length, token_count  # noqa: E402
from library.train_args import add_console_log_arguments, configure_console_log  # noqa: E402
from library.text_conditioning import CaptionEncoding, conditioner_for  # noqa: E402
from networks.lora_files import other_unet_inputs_note  # noqa: E402

logger = logging.getLogger("gen_img")


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--ckpt", required=True, help="model: original .safetensors / .ckpt, or a diffusers folder")
    g.add_argument("--vae", default=None, help="use this VAE (file, full checkpoint or diffusers folder)")
    family = g.add_mutually_exclusive_group()
    family.add_argument("--v1", action="store_true", help="assert an SD 1.x model (detected anyway)")
    family.add_argument("--v2", action="store_true", help="assert an SD 2.x model (detected anyway)")
    family.add_argument("--sdxl", action="store_true", help="assert an SDXL model (detected anyway)")
    g.add_argument("--v_parameterization", action="store_true",
                   help="the model predicts v (SD 2.x 768-v); only needed when the file does not say so itself")
    g.add_argument("--zero_terminal_snr", action="store_true", help="sample with a zero-terminal-SNR schedule")
    g.add_argument("--allow_unsafe_pickle", action="store_true", help="load .ckpt files that need arbitrary code")
    g.add_argument("--fp16", action="store_true", help="run in fp16 (CUDA only)")
    g.add_argument("--bf16", action="store_true", help="run in bf16 (CUDA or CPU)")
    g.add_argument("--no_half_vae", action="store_true",
                   help="keep the VAE in fp32 under --fp16 / --bf16 (the SDXL VAE overflows in fp16)")
    g.add_argument("--vae_batch_size", type=float, default=None,
                   help="the VAE decodes (and encodes) at most this many images at a time (memory); below 1: that "
                        "fraction of the batch (kohya's rule)")
    g.add_argument("--xformers", action="store_true", help="accepted for kohya compatibility; PyTorch SDPA is used")
    g.add_argument("--diffusers_xformers", dest="xformers", action="store_true", help="kohya's alias of --xformers")
    g.add_argument("--sdpa", action="store_true", help="accepted for kohya compatibility (the default)")
    g.add_argument("--opt_channels_last", action="store_true",
                   help="U-Net, VAE, ControlNets and networks in channels-last memory format (speed on some GPUs; "
                        "same numbers)")
    g.add_argument("--tokenizer_cache_dir", default=None, help="accepted for compatibility; tokenizers are shipped")

    g = p.add_argument_group("prompts and output")
    g.add_argument("--prompt", default=None, help="the prompt, with kohya's per-prompt options (--n, --d, ...)")
    g.add_argument("--from_file", default=None, help="prompt file: one prompt per line (.txt), or .toml / .json")
    g.add_argument("--outdir", default="outputs", help="output folder")
    g.add_argument("--sequential_file_name", action="store_true", help="name files im_000000.png, ... (no seed)")
    g.add_argument("--images_per_prompt", type=int, default=1)
    g.add_argument("--n_iter", type=int, default=1, help="repeat the whole prompt list this many times")
    g.add_argument("--batch_size", type=int, default=1)
    g.add_argument("--seed", type=int, default=None,
                   help="the seed of a single image, or of the seeds of several (kohya's rule)")
    g.add_argument("--iter_same_seed", action="store_true", help="one seed for every prompt of an iteration")
    g.add_argument("--shuffle_prompts", action="store_true",
                   help="shuffle the prompt list at the start of every iteration (seeded by --seed when given)")
    g.add_argument("--use_original_file_name", action="store_true",
                   help="with --image_path: name each image after its input image (<input name>.png; _<number> "
                        "added when several share it)")
    g.add_argument("--interactive", action="store_true",
                   help="read prompts (with their options) from the terminal, one per line, until end of input")
    g.add_argument("--no_preview", action="store_true", help="--interactive: do not show each image")
    g.add_argument("--from_module", default=None,
                   help="a Python file whose get_prompter(args, pipe, networks) returns kohya's prompter: called as "
                        "prompter(args, pipe, seed_random, iter_seed, prompt_index, global_step) until it returns "
                        "None, every iteration")
    g.add_argument("--prompter_module_args", default=None,
                   help="for the --from_module prompter, which reads it from args (kohya passes it that way)")

    g = p.add_argument_group("sampling")
    g.add_argument("--sampler", default="ddim",
                   help=f"one of {', '.join(list(sampling.SAMPLERS) + list(sampling.SAMPLER_ALIASES))}")
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--scale", type=float, default=7.5, help="CFG scale")
    g.add_argument("--negative_scale", type=float, default=None,
                   help="kohya's negative scale: guide with U + scale (T - U) - negative_scale (N - U), U the empty "
                        "prompt's prediction, N the negative prompt's (prompt option --nl; needs --scale > 1)")
    g.add_argument("--W", type=int, default=None, help="width (default: the model family's resolution)")
    g.add_argument("--H", type=int, default=None, help="height (default: the model family's resolution)")
    g.add_argument("--clip_skip", type=int, default=None, help="condition on the n-th last text-encoder layer")
    g.add_argument("--textual_inversion_embeddings", nargs="*", default=None,
                   help="embedding files (.pt / .safetensors); the prompt word is each file's name without extension")
    g.add_argument("--max_embeddings_multiples", type=int, choices=[1, 2, 3], default=None,
                   help="CLIP windows per prompt (75 tokens each); default: as many as the longest prompt needs")
    g.add_argument("--max_token_length", type=int, choices=[75, 150, 225], default=None,
                   help="the same in tokens (this suite's training flag)")
    g.add_argument("--original_width", type=int, default=None,
                   help="SDXL: the original width the model is told (default: the image width); prompt option --ow")
    g.add_argument("--original_height", type=int, default=None, help="SDXL: likewise the height (--oh)")
    g.add_argument("--original_width_negative", type=int, default=None,
                   help="SDXL: the negative prompt's original width (default: --original_width); --nw")
    g.add_argument("--original_height_negative", type=int, default=None, help="SDXL: likewise the height (--nh)")
    g.add_argument("--crop_top", type=int, default=None, help="SDXL: crop conditioning, top (default 0); --ct")
    g.add_argument("--crop_left", type=int, default=None, help="SDXL: crop conditioning, left (default 0); --cl")
    g.add_argument("--image_path", default=None, help="img2img: an image, or a folder of images used in turn")
    g.add_argument("--mask_path", default=None,
                   help="inpainting: the mask of each --image_path image (white: repaint), a file or a folder used in "
                        "turn; with a text-to-image model, masked img2img")
    g.add_argument("--strength", type=float, default=None,
                   help="img2img / inpainting denoising strength (default 0.8; inpainting models: 1.0)")
    g.add_argument("--depth_path", default=None,
                   help="SD 2.x depth models: the depth map (white: near), a file or a folder used in turn (not in "
                        "kohya's gen_img); a prompt's --cn gives its own")
    g.add_argument("--condition_path", default=None,
                   help="extra-channel models (tools/add_input_channels.py --extra_channels N): the condition image "
                        "with N bands, as in training; a file or a folder used in turn; a prompt's --cn gives its own")

    g.add_argument("--noise_offset_prob", type=float, default=None,
                   help="txt2img: the probability that an image's starting noise gets an offset (--noise_offset_range)")
    g.add_argument("--noise_offset_range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="the offset: randn() * (HIGH - LOW) + LOW (kohya's formula)")
    g.add_argument("--pyramid_noise_prob", type=float, default=None,
                   help="txt2img: the probability that an image's starting noise gets pyramid noise")
    g.add_argument("--pyramid_noise_discount_range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="its discount, drawn uniformly from LOW..HIGH")
    g.add_argument("--force_scheduler_zero_steps_offset", action="store_true",
                   help="accepted: img2img here always counts its steps without the scheduler's steps_offset, as "
                        "diffusers' pipelines do (kohya's behaviour with this flag)")
    g.add_argument("--emb_normalize_mode", choices=["original", "none", "abs"], default="original",
                   help="weighted prompts: after weighting, restore the embedding's mean (original, WebUI's), its "
                        "mean absolute value (abs), or neither (none)")

    g = p.add_argument_group("highres fix (kohya's; library/highres_fix.py)")
    g.add_argument("--highres_fix_scale", type=float, default=None,
                   help="make each image first at this fraction of its size (e.g. 0.5), then again at full size by "
                        "img2img from the enlarged first image")
    g.add_argument("--highres_fix_steps", type=int, default=None, help="the first stage's steps (default 28)")
    g.add_argument("--highres_fix_strength", type=float, default=None,
                   help="with --image_path: the first stage's img2img strength (default: --strength); the second "
                        "stage's is --strength / --t (default 0.8)")
    g.add_argument("--highres_fix_save_1st", action="store_true",
                   help="also save the first-stage images (<name>_1st.png)")
    g.add_argument("--highres_fix_latents_upscaling", action="store_true",
                   help="enlarge the first stage's latents (bicubic) instead of its image (LANCZOS)")
    g.add_argument("--highres_fix_upscaler", default=None,
                   help="an upscaler module with kohya's interface (create_upscaler(**kwargs)); none ships here")
    g.add_argument("--highres_fix_upscaler_args", default=None, help="its arguments: 'key=value;key=value'")

    g.add_argument("--highres_fix_disable_control_net", action="store_true",
                   help="ControlNet guides the first stage only")

    g = p.add_argument_group("ControlNet guidance (kohya's flags; library/guidance.py)")
    g.add_argument("--control_net_models", nargs="*", default=None,
                   help="ControlNets: original-layout files (lllyasviel's, train_controlnet.py's), diffusers folders "
                        "or single files (SDXL), kohya's SDXL layout")
    g.add_argument("--control_net_preps", nargs="*", default=None,
                   help="per ControlNet: the guide image's preprocessor: canny, canny_<low>_<high> (default 63, 191) "
                        "or none (default)")
    g.add_argument("--control_net_multipliers", type=float, nargs="*", default=None,
                   help="per ControlNet: its strength (default 1)")
    g.add_argument("--control_net_ratios", type=float, nargs="*", default=None,
                   help="per ControlNet: the share of the steps it guides, from the first (default 1: all)")
    g.add_argument("--guide_image_path", nargs="*", default=None,
                   help="guide images (files or folders), used in turn; with several ControlNets one per ControlNet "
                        "for each generated image, in order. A prompt's --cn gives its own (one ControlNet)")

    add_console_log_arguments(p)
    add_refused_arguments(p)

    g = p.add_argument_group("networks (LoRA)")
    g.add_argument("--network_module", nargs="*", default=None,
                   help="module per network (default networks.lora; one value applies to all)")
    g.add_argument("--network_weights", nargs="*", default=None, help="network files")
    g.add_argument("--network_mul", type=float, nargs="*", default=None, help="multiplier per network (default 1)")
    g.add_argument("--network_args", nargs="*", default=None, help="per network: 'key=value;key=value'")
    g.add_argument("--network_merge", action="store_true", help="merge all networks into the weights (faster)")
    g.add_argument("--network_merge_n_models", type=int, default=None, help="merge only the first N networks")
    g.add_argument("--network_pre_calc", action="store_true",
                   help="merge the applied networks into the weights for each batch, at its multipliers (--am), and "
                        "take them out again after it (kohya's; faster, like --network_merge, but --am still works)")
    g.add_argument("--network_show_meta", action="store_true", help="log each network file's metadata")
    return p


# kohya gen_img flags of features this suite does not have, each refused with the reason when given (none is parsed
# and ignored): flag -> (argparse settings, why).
REFUSED = {
    "--vae_slices": ({"type": int}, "kohya's row-sliced VAE (library/slicing_vae.py, SD 1.x-sized configs hard-coded "
                                    "in it) is not implemented here; for VAE memory use --vae_batch_size 1"),
    "--control_net_lllite_models": ({"nargs": "*"}, "ControlNet-LLLite is kohya's own network type "
                                                    "(networks/control_net_lllite.py), not implemented here; "
                                                    "--control_net_models takes ControlNets"),
    "--clip_vision_strength": ({"type": float}, "it needs OpenAI's CLIP ViT-bigG vision model from the Hugging Face "
                                                "Hub, and nothing is downloaded here"),
    "--network_regional_mask_max_color_codes": ({"type": int}, "regional LoRA (kohya's networks limited to mask "
                                                               "regions with AND-separated sub-prompts) is not "
                                                               "implemented here"),
    "--ds_depth_1": ({"type": int}, "Deep Shrink runs inside kohya's own U-Net implementation; not implemented for "
                                    "diffusers' U-Net here"),
    "--ds_timesteps_1": ({"type": int}, "Deep Shrink (see --ds_depth_1)"),
    "--ds_depth_2": ({"type": int}, "Deep Shrink (see --ds_depth_1)"),
    "--ds_timesteps_2": ({"type": int}, "Deep Shrink (see --ds_depth_1)"),
    "--ds_ratio": ({"type": float}, "Deep Shrink (see --ds_depth_1)"),
    "--gradual_latent_timesteps": ({"type": int}, "Gradual Latent needs kohya's own Euler-ancestral scheduler "
                                                  "variant (EulerAncestralDiscreteSchedulerGL); not implemented here"),
    "--gradual_latent_ratio": ({"type": float}, "Gradual Latent (see --gradual_latent_timesteps)"),
    "--gradual_latent_ratio_step": ({"type": float}, "Gradual Latent (see --gradual_latent_timesteps)"),
    "--gradual_latent_every_n_steps": ({"type": int}, "Gradual Latent (see --gradual_latent_timesteps)"),
    "--gradual_latent_s_noise": ({"type": float}, "Gradual Latent (see --gradual_latent_timesteps)"),
    "--gradual_latent_unsharp_params": ({}, "Gradual Latent (see --gradual_latent_timesteps)"),
}


def add_refused_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("kohya features not implemented here (refused with the reason when given)")
    for flag, (settings, why) in REFUSED.items():
        g.add_argument(flag, default=None, help=f"refused: {why}", **settings)


# ----------------------------------------------------------------------------------------------------------
# Options -> typed pieces (a problem a user can fix is one "error: ..." line, found before the model loads where
# possible: prompt files are read once the model's family is known, before its weights are)


@dataclass(frozen=True)
class NetworkSpec:
    module: str
    weights: Path
    multiplier: float
    kwargs: dict
    merge: bool


def fail(message: str) -> SystemExit:
    return SystemExit(f"error: {message}")


def check_args(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    for flag, (_, why) in REFUSED.items():
        if getattr(args, flag[2:]) is not None:
            raise fail(f"{flag}: not supported here: {why}; remove it")
    sources = [flag for flag in ("--prompt", "--from_file", "--from_module", "--interactive")
               if getattr(args, flag[2:]) not in (None, False)]
    if len(sources) != 1:
        raise fail(f"give one prompt source: --prompt, --from_file, --from_module or --interactive "
                   f"({', '.join(sources) + ' given' if sources else 'none given'})")
    if args.interactive and not sys.stdin.isatty():
        raise fail("--interactive reads prompts from a terminal, and standard input is not one (a pipe or file?); "
                   "for prompts from a file use --from_file")
    if args.no_preview and not args.interactive:
        raise fail("--no_preview is about --interactive's preview; without --interactive nothing is shown anyway")
    if args.prompter_module_args is not None and not args.from_module:
        raise fail("--prompter_module_args is for the --from_module prompter; give --from_module")
    if args.use_original_file_name and not args.image_path:
        raise fail("--use_original_file_name names images after their --image_path inputs; give --image_path")
    check_noise_args(args)
    for flag in ("images_per_prompt", "n_iter", "batch_size", "steps"):
        if getattr(args, flag) < 1:
            raise fail(f"--{flag} must be at least 1")
    if args.vae_batch_size is not None and args.vae_batch_size <= 0:
        raise fail(f"--vae_batch_size {args.vae_batch_size}: give a count (1, 2, ...) or a fraction of the batch in "
                   "(0, 1)")
    for flag in ("W", "H"):
        value = getattr(args, flag)
        if value is not None and (value < 64 or value % 8):
            raise fail(f"--{flag} {value}: use a multiple of 8, at least 64")
    if args.strength is not None and not 0.0 < args.strength <= 1.0:
        raise fail(f"--strength {args.strength}: must be in (0, 1]")
    if args.strength is not None and not args.image_path and args.highres_fix_scale is None:
        raise fail("--strength needs --image_path (the image that img2img / inpainting starts from) or "
                   "--highres_fix_scale (the second stage's strength)")
    check_highres_args(args)
    check_controlnet_args(args)
    if args.mask_path and not args.image_path:
        raise fail("--mask_path needs --image_path (the image whose masked area is repainted)")
    if args.max_embeddings_multiples and args.max_token_length and \
            args.max_embeddings_multiples * CHUNK != args.max_token_length:
        raise fail("--max_embeddings_multiples and --max_token_length disagree; give one")
    try:
        sampling.sampler_name(args.sampler)
    except ValueError as e:
        raise fail(f"--sampler: {e}") from None
    if args.fp16 and args.bf16:
        raise fail("give one of --fp16 / --bf16")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.fp16 and device.type == "cpu":
        raise fail("--fp16 needs a CUDA GPU (no GPU found); on CPU use --bf16, or neither for fp32")
    if args.xformers:
        logger.info("--xformers: using PyTorch's scaled-dot-product attention instead (same results)")
    return device, (torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32)


def check_noise_args(args: argparse.Namespace) -> None:
    for prob, span in (("noise_offset_prob", "noise_offset_range"), ("pyramid_noise_prob",
                                                                      "pyramid_noise_discount_range")):
        p, r = getattr(args, prob), getattr(args, span)
        if (p is None) != (r is None):
            raise fail(f"--{prob} and --{span} go together (how often, and how much); give both")
        if p is not None and not 0.0 <= p <= 1.0:
            raise fail(f"--{prob} {p}: a probability, in [0, 1]")
        if p is not None and args.image_path:
            raise fail(f"--{prob}: the noise options change the starting noise of txt2img; with --image_path every "
                       "image starts from an image (kohya's gen_img ignores them there)")


def start_noise(args: argparse.Namespace) -> guidance.StartNoise | None:
    if args.noise_offset_prob is None and args.pyramid_noise_prob is None:
        return None
    return guidance.StartNoise(args.noise_offset_prob, tuple(args.noise_offset_range or ()) or None,
                               args.pyramid_noise_prob, tuple(args.pyramid_noise_discount_range or ()) or None)


HIGHRES_FLAGS = ("highres_fix_steps", "highres_fix_strength", "highres_fix_save_1st", "highres_fix_latents_upscaling",
                 "highres_fix_upscaler", "highres_fix_upscaler_args")


def check_highres_args(args: argparse.Namespace) -> None:
    if args.highres_fix_scale is None:
        given = [f"--{flag}" for flag in HIGHRES_FLAGS if getattr(args, flag) not in (None, False)]
        if given:
            raise fail(f"{', '.join(given)}: set the highres fix up, which --highres_fix_scale turns on; give it")
        return
    if not 0.0 < args.highres_fix_scale <= 1.0:
        raise fail(f"--highres_fix_scale {args.highres_fix_scale}: the first stage's size as a fraction of the "
                   "image's, in (0, 1]")
    if args.highres_fix_steps is not None and args.highres_fix_steps < 1:
        raise fail("--highres_fix_steps must be at least 1")
    if args.highres_fix_strength is not None:
        if not args.image_path:
            raise fail("--highres_fix_strength is the first stage's img2img strength: it needs --image_path (without "
                       "it the first stage is txt2img; the second stage's strength is --strength)")
        if not 0.0 < args.highres_fix_strength <= 1.0:
            raise fail(f"--highres_fix_strength {args.highres_fix_strength}: must be in (0, 1]")
    if args.highres_fix_upscaler and args.highres_fix_latents_upscaling:
        raise fail("--highres_fix_upscaler and --highres_fix_latents_upscaling: the upscaler module decides whether it "
                   "takes latents (kohya's rule); give one")
    if args.highres_fix_upscaler_args and not args.highres_fix_upscaler:
        raise fail("--highres_fix_upscaler_args needs --highres_fix_upscaler (the module they are for)")


CONTROLNET_LISTS = ("control_net_preps", "control_net_multipliers", "control_net_ratios")


def check_controlnet_args(args: argparse.Namespace) -> None:
    models = args.control_net_models
    if not models:
        given = [f"--{flag}" for flag in (*CONTROLNET_LISTS, "guide_image_path") if getattr(args, flag)]
        if given:
            raise fail(f"{', '.join(given)}: for ControlNet guidance; give --control_net_models")
        if args.highres_fix_disable_control_net:
            raise fail("--highres_fix_disable_control_net: there is no ControlNet to disable (--control_net_models)")
        return
    for flag in CONTROLNET_LISTS:
        values = getattr(args, flag) or []
        if len(values) > len(models):
            raise fail(f"--{flag}: {len(values)} values for {len(models)} --control_net_models (one per ControlNet; "
                       "the ones left out take the default)")
    if any(ratio < 0 for ratio in args.control_net_ratios or []):
        raise fail("--control_net_ratios: each is the share of the steps a ControlNet guides, at least 0")
    for name in args.control_net_preps or []:
        try:
            guidance.preprocessor(name)
        except ValueError as e:
            raise fail(f"--control_net_preps: {e}") from None
    if args.highres_fix_disable_control_net and args.highres_fix_scale is None:
        raise fail("--highres_fix_disable_control_net is about the highres fix's second stage; give "
                   "--highres_fix_scale, or leave it out")


def highres_fix(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> HighresFix | None:
    if args.highres_fix_scale is None:
        return None
    upscaler = None
    if args.highres_fix_upscaler:
        try:
            upscaler = load_upscaler(args.highres_fix_upscaler, args.highres_fix_upscaler_args, device=device,
                                     dtype=dtype)
        except ValueError as e:
            raise fail(str(e)) from None
    return HighresFix(args.highres_fix_scale, steps=args.highres_fix_steps or 28, strength=args.highres_fix_strength,
                      latents_upscaling=args.highres_fix_latents_upscaling, upscaler=upscaler)


def network_specs(args: argparse.Namespace) -> list[NetworkSpec]:
    files = args.network_weights or []
    modules = args.network_module or ["networks.lora"]
    if args.network_module and not files:
        raise fail("--network_module needs --network_weights (one file per network)")
    if len(modules) not in (1, len(files)) and files:
        raise fail(f"{len(modules)} --network_module values for {len(files)} --network_weights files: give one "
                   "module for all, or one per file")
    multipliers = args.network_mul or [1.0] * len(files)
    if len(multipliers) != len(files):
        raise fail(f"{len(multipliers)} --network_mul values for {len(files)} --network_weights files: give one "
                   "per file")
    network_args = args.network_args or []
    if len(network_args) > len(files):
        raise fail(f"{len(network_args)} --network_args values for {len(files)} networks")
    merged = len(files) if args.network_merge else (args.network_merge_n_models or 0)
    specs = []
    for i, (file, multiplier) in enumerate(zip(files, multipliers)):
        if not Path(file).is_file():
            raise fail(f"--network_weights {file}: no such file")
        kwargs = network_kwargs(network_args[i]) if i < len(network_args) else {}
        specs.append(NetworkSpec(modules[i] if len(modules) > 1 else modules[0], Path(file), multiplier, kwargs,
                                 merge=i < merged))
    return specs


def network_kwargs(text: str) -> dict[str, str]:
    """kohya's per-network `--network_args` value: `key=value;key=value`."""
    kwargs = {}
    for item in filter(None, text.split(";")):
        key, sep, value = item.partition("=")
        if not sep:
            raise fail(f"--network_args {item!r}: expected key=value (several separated by ';')")
        kwargs[key.strip()] = value.strip()
    return kwargs


def prompt_defaults(args: argparse.Namespace, family) -> SamplePrompt:
    """A prompt line's settings before its own options: the flags, and the family's resolution."""
    size = family.default_resolution
    return SamplePrompt("", width=args.W or size, height=args.H or size, scale=args.scale, steps=args.steps,
                        sampler=sampling.sampler_name(args.sampler), original_width=args.original_width,
                        original_height=args.original_height, negative_original_width=args.original_width_negative,
                        negative_original_height=args.original_height_negative, crop_top=args.crop_top,
                        crop_left=args.crop_left, negative_scale=args.negative_scale)


def read_prompts(args: argparse.Namespace, family, applied_networks: int) -> list[SamplePrompt]:
    """The prompts of --prompt / --from_file, checked (--interactive and --from_module give theirs later)."""
    if args.prompt is None and args.from_file is None:
        return []
    defaults = prompt_defaults(args, family)
    try:
        if args.prompt is not None:
            prompts = [sampling.parse_prompt_line(args.prompt, defaults, where="--prompt")]
        else:
            prompts = sampling.load_prompts(args.from_file, defaults)
    except (PromptFileError, ValueError) as e:
        raise fail(str(e)) from None
    if not prompts:  # else the run would end "successfully" having written nothing
        raise fail(f"--from_file {args.from_file}: no prompts in the file; add at least one")
    check_prompts(args, family, prompts, applied_networks)
    return prompts


def check_prompts(args: argparse.Namespace, family, prompts: list[SamplePrompt], applied_networks: int) -> None:
    """Each prompt's options against the model and the run (one "error: ..." naming the prompt's line)."""
    for prompt in prompts:
        where = prompt.where or "prompt"
        if not prompt.prompt:
            raise fail(f"{where}: empty prompt")
        try:
            sampling.check_prompt_fits(prompt, family)
        except PromptFileError as e:
            raise fail(str(e)) from None
        muls = prompt.network_multipliers
        if muls is not None and not applied_networks:
            raise fail(f"{where}: --am needs networks that are applied, not merged (--network_merge) or absent")
        if muls is not None and len(muls) > applied_networks:
            raise fail(f"{where}: --am gives {len(muls)} multipliers for {applied_networks} applied network(s)")
        if prompt.negative_scale is not None:
            if prompt.scale <= 1:
                raise fail(f"{where}: a negative scale (--negative_scale / --nl) works through classifier-free "
                           f"guidance, which a CFG scale of {prompt.scale} turns off; raise --scale / --l above 1")
            if args.control_net_models:
                raise fail(f"{where}: a negative scale (--negative_scale / --nl) with ControlNet guidance is not "
                           "supported (diffusers' ControlNet pipelines run the ControlNet for the two CFG branches; "
                           "the negative scale needs a third)")
        if prompt.strength is not None and not args.image_path and args.highres_fix_scale is None:
            raise fail(f"{where}: --t (img2img strength) needs --image_path or --highres_fix_scale")


# The flag that gives each kind of model its own input, and the model a flag is for (in messages).
INPUT_FLAGS = {INPAINTING: "--mask_path", DEPTH: "--depth_path", EXTRA_CHANNELS: "--condition_path"}
FLAG_MODELS = {"--depth_path": "an SD 2.x depth model",
               "--condition_path": "an extra-channel model (tools/add_input_channels.py --extra_channels N)"}


def check_image_inputs(args: argparse.Namespace, family, prompts: list[SamplePrompt]) -> None:
    """The image flags against what the model takes, once its family is known (before its weights load): each
    model's own input is there, no flag gives a model what it does not take, and what will happen is logged."""
    inputs, model = family.unet_inputs, family.description.split(" (")[0]
    own = INPUT_FLAGS.get(inputs)
    if args.highres_fix_scale is not None and (own or args.mask_path):
        raise fail(f"--highres_fix_scale: not supported for {'masked img2img' if args.mask_path else model} here "
                   "(its second stage would need the mask / map / condition again at the full size; kohya's highres "
                   "fix has no such models either): run without it")
    check_controlnet_inputs(args, family, prompts)
    if (args.noise_offset_prob is not None or args.pyramid_noise_prob is not None) and \
            (inputs in (INPAINTING, DEPTH) or args.mask_path):
        raise fail(f"--noise_offset_prob / --pyramid_noise_prob: the noise options change the starting noise of "
                   f"text-to-image generation; {'masked img2img' if args.mask_path else model} starts elsewhere")
    for flag in ("--depth_path", "--condition_path"):
        if getattr(args, flag[2:]) and flag != own:
            raise fail(f"{flag}: {args.ckpt} is {model}, which takes no {gi.FLAG_KINDS[flag].value}; the flag is for "
                       f"{FLAG_MODELS[flag]}")
    if args.mask_path and inputs in (DEPTH, EXTRA_CHANNELS):
        raise fail(f"--mask_path: {args.ckpt} is {model}, which does not inpaint; use an inpainting model, or a "
                   "text-to-image model for masked img2img")
    if args.no_half_vae and (args.mask_path or inputs in (INPAINTING, DEPTH)):
        raise fail("--no_half_vae: the inpainting and depth2img pipelines VAE-encode their images themselves, in the "
                   "U-Net's precision; run without it (or in fp32), or use a VAE that is stable in half precision")
    if inputs == INPAINTING:
        if args.image_path and not args.mask_path:
            raise fail(f"--image_path without --mask_path: {model} repaints the white area of a mask; give "
                       "--mask_path (without --image_path it generates from the prompt alone)")
        if not args.image_path:
            logger.info("%s without --image_path: generating from the prompt alone (the whole image masked, "
                        "strength 1, as the model was trained for a share of its samples)", model)
    elif inputs in (DEPTH, EXTRA_CHANNELS):
        kind = gi.FLAG_KINDS[own].value
        missing = [p.where or "--prompt" for p in prompts if not p.condition_image]
        if missing and not getattr(args, own[2:]):
            raise fail(f"{args.ckpt} is {model}: every image needs its {kind}; give {own} (a file, or a folder "
                       f"used in turn) or --cn <file> on each prompt line ({missing[0]} has none)")
        for p in prompts:
            if p.condition_image and not Path(p.condition_image).is_file():
                raise fail(f"{p.where or '--prompt'}: --cn {p.condition_image}: no such file")
        if inputs == DEPTH and not args.image_path:
            logger.info("%s without --image_path: depth2img starts from a mid-gray image at strength 1 (the depth "
                        "map and the prompt decide the picture)", model)
    elif args.mask_path:
        try:
            pipeline = gi.inpainting_pipeline_class(family)
        except ValueError as e:
            raise fail(f"--mask_path: {e}") from None
        logger.info("%s is a text-to-image model, not an inpainting one: --mask_path repaints the white area by "
                    "masked img2img (%s with a 4-channel U-Net: outside the mask the image's own latents, noised "
                    "to each step, are kept); an inpainting model blends the new part in better", model, pipeline)


def check_controlnet_inputs(args: argparse.Namespace, family, prompts: list[SamplePrompt]) -> None:
    """ControlNet guidance against the model, and the prompts' own guide images (--cn on a text-to-image model)."""
    model = family.description.split(" (")[0]
    if args.control_net_models and (family.controlnet_pipeline_class is None or args.mask_path or
                                    family.unet_inputs != TEXT_TO_IMAGE):
        raise fail(f"--control_net_models: ControlNet guidance runs through the text-to-image and img2img ControlNet "
                   f"pipelines of SD 1.x, 2.x and SDXL base; not {'masked img2img' if args.mask_path else model}")
    if family.unet_inputs != TEXT_TO_IMAGE:
        return  # a depth / extra-channel model's --cn is its own input (check_image_inputs)
    with_cn = [p for p in prompts if p.condition_image]
    if with_cn and not args.control_net_models:
        raise fail(f"{with_cn[0].where or '--prompt'}: --cn names a ControlNet guide image (or a depth / extra-channel "
                   f"model's input); {model} has neither: give --control_net_models, or remove --cn")
    if with_cn and len(args.control_net_models) > 1:
        raise fail(f"{with_cn[0].where or '--prompt'}: --cn gives one guide image, for one ControlNet; with "
                   f"{len(args.control_net_models)} use --guide_image_path (one image per ControlNet, in order)")
    for p in with_cn:
        if not Path(p.condition_image).is_file():
            raise fail(f"{p.where or '--prompt'}: --cn {p.condition_image}: no such file")
    without = [p for p in prompts if not p.condition_image]
    if args.control_net_models and without and not args.guide_image_path:
        raise fail(f"--control_net_models: every image needs a guide image: give --guide_image_path, or --cn on each "
                   f"prompt line ({without[0].where or '--prompt'} has none)")


def load_controlnets(args: argparse.Namespace, models: SDModels, device: torch.device,
                     dtype: torch.dtype) -> guidance.ControlNetRun | None:
    """The ControlNets (any layout controlnet_checkpoint reads, checked to fit the model) with their settings and
    the --guide_image_path images, read before the first image is made."""
    if not args.control_net_models:
        return None
    from library.controlnet_checkpoint import load_controlnet

    count = len(args.control_net_models)

    def nth(values, i, default):
        return values[i] if values and i < len(values) else default
    guides = []
    for i, path in enumerate(args.control_net_models):
        try:
            model = load_controlnet(path, family=models.family, base_unet_config=dict(models.unet.config), dtype=dtype,
                                    allow_unsafe_pickle=args.allow_unsafe_pickle)
        except CheckpointError as e:
            raise fail(f"--control_net_models {path}: {e}") from None
        if args.opt_channels_last:
            model.to(memory_format=torch.channels_last)
        guides.append(guidance.ControlNetGuide(model.to(device), multiplier=nth(args.control_net_multipliers, i, 1.0),
                                               ratio=nth(args.control_net_ratios, i, 1.0)))
        logger.info("ControlNet %d: %s (multiplier %s, ratio %s, preprocessor %s)", i + 1, path, guides[-1].multiplier,
                    guides[-1].ratio, nth(args.control_net_preps, i, "none"))
    preps = tuple(guidance.preprocessor(nth(args.control_net_preps, i, None)) for i in range(count))
    files = []
    for path in args.guide_image_path or []:
        try:
            files += gi.image_files(path, "--guide_image_path")
        except ValueError as e:
            raise fail(str(e)) from None
    if len(files) % count:
        raise fail(f"--guide_image_path: {len(files)} images for {count} ControlNets: give a multiple of {count} (one "
                   "image per ControlNet for each generated image, in order)")
    return guidance.ControlNetRun(tuple(guides), preps, tuple(read_guide_image(file, "--guide_image_path")
                                                             for file in files))


def read_guide_image(path, flag: str) -> Image.Image:
    try:
        return Image.open(path).convert("RGB")
    except OSError as e:
        raise fail(f"{flag} {path}: cannot read the image ({e})") from None


def own_guide_images(prompts: list[SamplePrompt]) -> dict[str, Image.Image]:
    """The guide images the prompts' --cn name (text-to-image models with ControlNet), each read once."""
    return {path: read_guide_image(path, f"{where}: --cn") for path, where in
            {p.condition_image: p.where or "--prompt" for p in prompts if p.condition_image}.items()}


def input_files(args: argparse.Namespace) -> dict[str, list[Path]]:
    """--mask_path / --depth_path / --condition_path given: flag -> its files, used in turn (kohya's rule)."""
    try:
        return {flag: gi.image_files(getattr(args, flag[2:]), flag) for flag in gi.FLAG_KINDS
                if getattr(args, flag[2:])}
    except ValueError as e:
        raise fail(str(e)) from None


def job_inputs(jobs: list[ImageJob], init_files: list[Path], files: dict[str, list[Path]], family,
               in_channels: int) -> dict[int, dict[str, torch.Tensor]]:
    """Each image's mask / depth map / condition (generate_images' per-image inputs, by job index), paired with the
    images as kohya pairs --mask_path with --image_path (the n-th image takes file n modulo the count; a prompt's
    --cn comes first), at the image's size. All are loaded here, before the first image is made, so a bad file
    stops the run with nothing written; each (file, size) is loaded once."""
    own = INPUT_FLAGS.get(family.unet_inputs)
    wanted = [flag for flag in files if flag == own or (flag == "--mask_path" and own is None)]
    if own in ("--depth_path", "--condition_path") and own not in wanted:
        wanted.append(own)  # every prompt has its --cn (check_image_inputs)
    channels = in_channels - family.unet_inputs.fixed_channels if own == "--condition_path" else 1
    argument = {"--mask_path": "masks", "--depth_path": "depth_maps", "--condition_path": "conditions"}
    loaded: dict[tuple, torch.Tensor] = {}
    out = {}
    for job in jobs:
        size = (job.prompt.width, job.prompt.height)
        init = init_files[job.index % len(init_files)] if init_files else None
        goes_with = f" ({init})" if init else " (the prompt's size)"
        out[job.index] = {}
        for flag in wanted:
            cn = job.prompt.condition_image if flag != "--mask_path" else None
            path = Path(cn) if cn else files[flag][job.index % len(files[flag])]
            where = f"{job.prompt.where or '--prompt'}: --cn" if cn else flag
            if (path, size) not in loaded:
                try:
                    loaded[path, size] = gi.load_condition(path, gi.FLAG_KINDS[flag], size, flag=where,
                                                           channels=channels, goes_with=goes_with)
                except ValueError as e:
                    raise fail(str(e)) from None
            out[job.index][argument[flag]] = loaded[path, size]
    return out


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
                no_half_vae: bool = False, channels_last: bool = False) -> SDModels:
    """The models on the device. `channels_last` (kohya's --opt_channels_last): the U-Net and VAE in PyTorch's
    channels-last memory format, which some GPU convolution kernels run faster; the same numbers either way."""
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
        encoders = models.text_encoders if spec.module == "networks.lora" else \
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
# Images in and out


def load_init_images(path: str | None) -> tuple[list[Path], list]:
    """img2img inputs (their files, and the images: RGB, cut down to a multiple of 8 in each side (kohya: 32) by
    resizing)."""
    if path is None:
        return [], []
    try:
        files = gi.image_files(path, "--image_path")
    except ValueError as e:
        raise fail(str(e)) from None
    images = []
    for file in files:
        try:
            image = Image.open(file).convert("RGB")
        except OSError as e:
            raise fail(f"--image_path {file}: cannot read the image ({e})") from None
        size = (image.width // 8 * 8, image.height // 8 * 8)
        if min(size) < 64:
            raise fail(f"--image_path {file}: {image.width}x{image.height} is too small (at least 64x64)")
        if size != image.size:
            logger.warning("%s: resized to %dx%d (a multiple of 8)", file, *size)
            image = image.resize(size, Image.Resampling.LANCZOS)
        images.append(image)
    return files, images


def output_paths(outdir: Path, jobs: list[ImageJob], *, sequential: bool,
                 original_names: list[Path] | None = None) -> dict[int, Path]:
    """Each job's file (by job index). Deterministic names: `im_<number>_<seed>.png` (or `im_<number>.png`),
    numbered on from the highest `im_<number>` already in `outdir` (as WebUI numbers its outputs), so a second run
    never overwrites the first. A prompt's `--f` name is used as given, or with `original_names`
    (--use_original_file_name) the name of the job's --image_path input (its stem + .png, as kohya names it), with
    `_<number>` added when several images share a name."""
    taken = [int(m.group(1)) for f in (outdir.iterdir() if outdir.is_dir() else [])
             if (m := re.fullmatch(r"im_(\d{6})(?:_\d+)?\.png", f.name))]
    start = max(taken, default=-1) + 1

    def given_name(job: ImageJob) -> str | None:
        if job.prompt.filename:
            return job.prompt.filename
        return original_names[job.index % len(original_names)].stem + ".png" if original_names else None
    uses: dict[str, int] = {}
    for job in jobs:
        if name := given_name(job):
            uses[name] = uses.get(name, 0) + 1
    paths = {}
    for position, job in enumerate(jobs):
        number = f"{start + position:06d}"
        if name := given_name(job):
            stem, suffix = (name[:-4], ".png") if name.lower().endswith(".png") else (name, ".png")
            paths[job.index] = outdir / (f"{stem}_{number}{suffix}" if uses[name] > 1 else stem + suffix)
        else:
            paths[job.index] = outdir / (f"im_{number}.png" if sequential else f"im_{number}_{job.seed}.png")
    return paths


def preview(image, title: str) -> None:
    """--interactive: show the image in the system's image viewer (PIL's Image.show; kohya uses an OpenCV window)."""
    try:
        image.show(title=title[:128])
    except Exception as e:  # no viewer / no display: the image is saved either way
        logger.warning("cannot show the image (%s); --no_preview turns previews off", e)


def interactive(generation: "Generation", stream) -> list[Path]:
    """kohya's --interactive: a prompt per line (with its options) from the terminal until end of input, each made
    into --images_per_prompt images at once; seeds drawn from one generator seeded by --seed (kohya's
    seed_random) over the session. A line with an error is reported and the next one read."""
    args, family = generation.args, generation.models.family
    rng = random.Random(args.seed)
    written, start, number = [], 0, 0
    while True:
        print("Type prompt:", file=sys.stderr, flush=True)
        line = stream.readline()
        if not line:
            return written
        text = line.strip()
        if not text.split(" --")[0].strip():
            continue
        number += 1
        try:
            prompt = sampling.parse_prompt_line(text, prompt_defaults(args, family), where=f"prompt {number}")
            check_prompts(args, family, [prompt], len(generation.applied))
            check_image_inputs(args, family, [prompt])
            jobs = sampling.plan_images([prompt], images_per_prompt=args.images_per_prompt, rng=rng, start=start)
            written += generation.images(jobs)
        except (PromptFileError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        except SystemExit as e:  # a problem with this prompt (fail(...)): say it, and read the next one
            print(e, file=sys.stderr)
            continue
        start += len(jobs)


def module_prompts(args: argparse.Namespace, generation: "Generation", applied_count: int) -> list[list[SamplePrompt]]:
    """kohya's --from_module: the file's get_prompter(args, pipe, networks) gives a prompter, asked for prompt lines
    (`prompter(args, pipe, seed_random, iter_seed, prompt_index, global_step)`) until it returns None, once per
    iteration (--n_iter). `pipe` here is this run's models (kohya's is its pipeline object: a prompter that reaches
    into that fails, and says so), `networks` the applied networks; `seed_random` is a generator of the prompter's
    own (seeded by --seed), so drawing from it does not move the images' seeds, and `iter_seed` is None."""
    import importlib.util

    path = Path(args.from_module)
    spec = importlib.util.spec_from_file_location("prompt_module", path) if path.is_file() else None
    if spec is None:
        raise fail(f"--from_module {path}: no such Python file")
    module = importlib.util.module_from_spec(spec)
    where = f"--from_module {path}"
    try:
        spec.loader.exec_module(module)
        prompter = module.get_prompter(args, generation.models, [network for network, _ in generation.applied])
        seed_random = random.Random(args.seed)
        defaults = prompt_defaults(args, generation.models.family)
        iterations, global_step = [], 0
        for _ in range(args.n_iter):
            lines = []
            while (line := prompter(args, generation.models, seed_random, None, len(lines), global_step)) is not None:
                lines.append(sampling.parse_prompt_line(str(line), defaults,
                                                        where=f"{where} prompt {len(lines) + 1}"))
                global_step += args.images_per_prompt
            if not lines:
                raise fail(f"{where}: the prompter gave no prompts")
            iterations.append(lines)
    except SystemExit:
        raise
    except PromptFileError as e:
        raise fail(str(e)) from None
    except Exception as e:  # the module's own code failed: say where
        raise fail(f"{where}: the prompter module failed: {type(e).__name__}: {e} (its pipe is this suite's models, "
                   "not kohya's pipeline object)") from None
    for prompts in iterations:
        check_prompts(args, generation.models.family, prompts, applied_count)
        check_image_inputs(args, generation.models.family, prompts)
    return iterations


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
                         channels_last=args.opt_channels_last)
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


class Generation:
    """What a run has decided before its first image (models, networks, embeddings, highres fix, ControlNets,
    input images), and `images`: a planned list of images made and saved, batch by batch."""

    def __init__(self, args: argparse.Namespace, models: SDModels, applied: list, words: dict, *,
                 fix: HighresFix | None, control: guidance.ControlNetRun | None, init_files: list[Path],
                 init_images: list, files: dict[str, list[Path]]):
        self.args, self.models, self.applied, self.words = args, models, applied, words
        self.fix, self.control = fix, control
        self.init_files, self.init_images, self.files = init_files, init_images, files

    def expanded(self, p: SamplePrompt) -> SamplePrompt:  # a word with several vectors stands for all of them
        return replace(p, prompt=ti.expand_tokens(p.prompt, self.words),
                       negative_prompt=ti.expand_tokens(p.negative_prompt, self.words)) if self.words else p

    def images(self, jobs: list[ImageJob]) -> list[Path]:
        """Make and save the planned images (everything is loaded and checked before the first is made)."""
        args, models, init_images = self.args, self.models, self.init_images
        jobs = [replace(job, prompt=settle(job.prompt, init_images[job.index % len(init_images)] if init_images else
                                           None, strength=args.strength, multipliers=[m for _, m in self.applied],
                                           default_strength=1.0 if models.family.unet_inputs == INPAINTING else 0.8,
                                           img2img=self.fix is not None))
                for job in jobs]
        for p in {job.prompt for job in jobs}:
            check_steps(p, self.fix, from_image=bool(init_images))
        inputs = job_inputs(jobs, self.init_files, self.files, models.family, models.unet.config.in_channels)
        prompts = list({job.prompt: None for job in jobs})
        # (every encoder of a family shares CLIP's vocabulary: one tokenizer counts for all)
        lengths = token_lengths([self.expanded(p) for p in prompts], models.tokenizers[0], args.max_token_length or
                                (args.max_embeddings_multiples or 0) * CHUNK or None)

        def batch_key(job: ImageJob):  # what the images of one batch share
            p = self.expanded(job.prompt)
            return (p.width, p.height, p.steps, p.scale, p.negative_scale, p.strength, p.sampler,
                    p.network_multipliers, lengths[p.prompt, p.negative_prompt], sampling.size_of(p),
                    sampling.size_of(p, negative=True))

        make = BatchMaker(models, zero_terminal_snr=args.zero_terminal_snr, clip_skip=args.clip_skip, lengths=lengths,
                          init_images=init_images, inputs=inputs, fix=self.fix, keep_first=args.highres_fix_save_1st,
                          vae_batch_size=args.vae_batch_size, control=self.control,
                          own_guides=own_guide_images(prompts) if self.control else {},
                          control_second_stage=not args.highres_fix_disable_control_net,
                          start_noise=start_noise(args), weight_normalization=args.emb_normalize_mode)
        paths = output_paths(Path(args.outdir), jobs, sequential=args.sequential_file_name,
                             original_names=self.init_files if args.use_original_file_name else None)
        written = []
        with tqdm(total=len(jobs), desc="images", unit="image") as bar:
            for batch in sampling.batches(jobs, args.batch_size, batch_key):
                self.set_multipliers(batch[0].prompt.network_multipliers or ())
                images, first_images = make([replace(job, prompt=self.expanded(job.prompt)) for job in batch])
                for i, job in enumerate(batch):
                    path = paths[job.index]
                    if first_images is not None:
                        written.append(self.save(first_images[i], path.with_name(f"{path.stem}_1st{path.suffix}"),
                                                 job, first_stage=True))
                    written.append(self.save(images[i], path, job))
                    if args.interactive and not args.no_preview:
                        preview(images[i], job.prompt.prompt)
                bar.update(len(batch))
        return written

    def set_multipliers(self, multipliers) -> None:
        for (network, _), multiplier in zip(self.applied, multipliers):
            network.set_multiplier(multiplier)
        if self.args.network_pre_calc:  # kohya: out with the last batch's multipliers, in with this one's
            for network, _ in self.applied:
                network.restore_weights()
            for network, _ in self.applied:
                network.pre_calculation()

    def save(self, image, path: Path, job: ImageJob, *, first_stage: bool = False) -> Path:
        from_image = bool(self.init_images)
        if first_stage:
            text = png_text(self.fix.first_stage(job.prompt, from_image=from_image), job.seed, self.args)
        else:
            text = png_text(job.prompt, job.seed, self.args, fix=self.fix, from_image=from_image)
        return sampling.save_png(image, path, text, clip_prompt=job.prompt.clip_prompt)

    def close(self) -> None:
        """The models as loaded (for callers in Python): pre-calculated networks taken out of the weights."""
        for network, _ in self.applied if self.args.network_pre_calc else []:
            network.restore_weights()


def check_steps(prompt: SamplePrompt, fix: HighresFix | None, *, from_image: bool) -> None:
    """Every img2img stage runs at least one denoising step (diffusers' img2img runs int(steps * strength)), and the
    highres fix's first stage has a size."""
    where = prompt.where or "prompt"
    stages = [("", prompt)]
    if fix is not None:
        first = fix.first_stage(prompt, from_image=from_image)
        if min(first.width, first.height) < FIRST_STAGE_MULTIPLE:
            raise fail(f"{where}: the highres fix's first stage of a {prompt.width}x{prompt.height} image at scale "
                       f"{fix.scale} is {first.width}x{first.height} (each side rounded down to a multiple of "
                       f"{FIRST_STAGE_MULTIPLE}, kohya's rule): raise --highres_fix_scale or the size")
        stages = [("the highres fix's second stage: ", prompt), ("the highres fix's first stage: ", first)]
    for what, p in stages:
        if p.strength is not None and int(p.steps * p.strength) < 1:
            raise fail(f"{where}: {what}img2img with strength {p.strength} and {p.steps} steps runs no denoising "
                       "step (steps x strength < 1); raise the steps or the strength")


@dataclass
class BatchMaker:
    """The images of one batch (jobs that share size, steps, scale, strength, sampler, multipliers), with the run's
    fixed settings: img2img inputs, the inputs of models with extra U-Net inputs, and the highres fix (two stages,
    library/highres_fix.py). Returns the images and, with `keep_first`, the highres fix's first-stage images."""

    models: SDModels
    zero_terminal_snr: bool
    clip_skip: int | None
    lengths: dict
    init_images: list
    inputs: dict
    fix: HighresFix | None = None
    keep_first: bool = False
    vae_batch_size: float | None = None  # --vae_batch_size as given
    control: guidance.ControlNetRun | None = None
    own_guides: dict | None = None  # a prompt's --cn path -> its guide image
    control_second_stage: bool = True  # not --highres_fix_disable_control_net
    start_noise: guidance.StartNoise | None = None  # kohya's noise options, for the stages that start from noise
    weight_normalization: str = "original"  # --emb_normalize_mode

    def control_for(self, batch: list[ImageJob], size: tuple[int, int]) -> guidance.ControlGuidance | None:
        if self.control is None:
            return None
        sources = [self.control.sources(job.index, (self.own_guides or {}).get(job.prompt.condition_image))
                   for job in batch]
        return self.control.guidance(sources, size)

    def vae_chunk(self, n: int) -> int:
        """Images the VAE takes at a time in a batch of n (kohya: the batch; a fraction of it below 1)."""
        given = self.vae_batch_size
        return n if given is None else max(1, int(n * given)) if given < 1 else int(given)

    def __call__(self, batch: list[ImageJob]) -> tuple[list, list | None]:
        prompts, seeds = [job.prompt for job in batch], [job.seed for job in batch]
        init = [self.init_images[job.index % len(self.init_images)] for job in batch] if self.init_images else None
        extra = {name: [self.inputs[job.index][name] for job in batch] for name in self.inputs[batch[0].index]}
        size = (prompts[0].width, prompts[0].height)
        noise = self.start_noise if init is None else None  # (img2img starts from an image)
        if self.fix is None:
            return self.generate(prompts, seeds, init_images=init, control=self.control_for(batch, size),
                                 start_noise=noise, **extra), None
        fix, first_latents = self.fix, self.fix.first_stage_latents
        firsts = [fix.first_stage(p, from_image=init is not None) for p in prompts]
        if init is not None:  # the input reduced to the first stage's size (kohya resizes its inputs with LANCZOS)
            init = [image.resize((firsts[0].width, firsts[0].height), Image.Resampling.LANCZOS) for image in init]
        first = self.generate(firsts, seeds, init_images=init, output_type="latent" if first_latents else "pil",
                              control=self.control_for(batch, (firsts[0].width, firsts[0].height)), start_noise=noise)
        kept = None
        if self.keep_first:
            kept = sampling.latents_to_images(self.models, first, chunk=self.vae_chunk(len(batch))) if first_latents \
                else first
        width, height = prompts[0].width, prompts[0].height
        enlarged = fix.enlarge(first, width=width, height=height, vae=self.models.vae, dtype=self.models.unet.dtype,
                               vae_batch_size=self.vae_chunk(len(batch)))
        start = {"init_latents": enlarged} if isinstance(enlarged, torch.Tensor) else {"init_images": enlarged}
        control = self.control_for(batch, size) if self.control_second_stage else None
        return self.generate(prompts, [seed + 1 for seed in seeds], control=control, **start), kept  # kohya: seed + 1

    def generate(self, prompts: list[SamplePrompt], seeds: list[int], **kwargs) -> list:
        first = prompts[0]
        return sampling.generate_images(
            prompts, seeds, models=self.models,
            scheduler=sampling.make_scheduler(first.sampler, self.models.prediction_type.value,
                                              zero_terminal_snr=self.zero_terminal_snr),
            encoding=CaptionEncoding(clip_skip=self.clip_skip, weighted=True,
                                     max_token_length=self.lengths[first.prompt, first.negative_prompt],
                                     weight_normalization=self.weight_normalization),
            progress=True, vae_batch_size=self.vae_chunk(len(prompts)), **kwargs)


def settle(prompt: SamplePrompt, init_image, *, strength: float | None, multipliers: list[float],
           default_strength: float = 0.8, img2img: bool = False) -> SamplePrompt:
    """The prompt with what the run decides filled in: img2img size (the input's) and strength (`--t`, else
    `--strength`, else `default_strength`: kohya's 0.8 for img2img; 1.0, diffusers' default, for an inpainting
    model, which sees the unmasked image in its own inputs), and one multiplier per applied network (`--am` values,
    the last repeated as in kohya; else `--network_mul`). `img2img`: the image is img2img without an input image
    too (the highres fix's second stage)."""
    if init_image is not None:
        prompt = replace(prompt, width=init_image.width, height=init_image.height)
    if init_image is not None or img2img:
        prompt = replace(prompt, strength=prompt.strength or strength or default_strength)
    if multipliers:
        muls = list(prompt.network_multipliers or multipliers)
        prompt = replace(prompt, network_multipliers=tuple(muls + muls[-1:] * (len(multipliers) - len(muls))))
    return prompt


def token_lengths(prompts: list[SamplePrompt], tokenizer, fixed: int | None) -> dict[tuple[str, str], int]:
    """(prompt, negative prompt) -> the conditioning length: `fixed` (--max_token_length), or the 75 / 150 / 225
    tokens that the longer of the two needs. Part of the batch key, so an image never depends on its batch."""
    lengths = {}
    for prompt in prompts:
        texts = [prompt.prompt, prompt.negative_prompt]
        lengths[tuple(texts)] = length = fixed or fitting_token_length(tokenizer, texts, weighted=True)
        longest = max(token_count(tokenizer, text, weighted=True) for text in texts)
        if longest > length:
            logger.warning("%s: %d tokens, cut to %d (at most 225)", prompt.where or "prompt", longest, length)
    return lengths


def png_text(prompt: SamplePrompt, seed: int, args: argparse.Namespace, *, fix: HighresFix | None = None,
             from_image: bool = False) -> str:
    """WebUI's "parameters" text. A highres-fixed image is written as WebUI writes its hires fix (the first pass's
    steps and size, then "Hires resize" to the full size, "Hires steps", "Hires upscaler", and the second pass's
    "Denoising strength"), so PNG Info shows both stages."""
    extra = {}
    shown = prompt
    if fix is not None:
        shown = fix.first_stage(prompt, from_image=from_image)
        if shown.strength is not None:
            extra["First pass denoising strength"] = shown.strength
    if prompt.strength is not None:
        extra["Denoising strength"] = prompt.strength
    if prompt.negative_scale is not None:
        extra["Negative scale"] = prompt.negative_scale  # not a WebUI field (kohya's PNGs say negative-scale)
    if args.clip_skip and args.clip_skip > 1:
        extra["Clip skip"] = args.clip_skip
    if fix is not None:
        extra["Hires resize"] = f"{prompt.width}x{prompt.height}"
        extra["Hires steps"] = prompt.steps
        extra["Hires upscaler"] = (args.highres_fix_upscaler if fix.upscaler is not None else
                                   "Latent (bicubic)" if fix.latents_upscaling else "Lanczos")
    return sampling.webui_parameters(shown, sampler=sampling.WEBUI_SAMPLER_NAMES.get(prompt.sampler, prompt.sampler),
                                     seed=seed, model_name=Path(args.ckpt).stem, extra=extra)


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 once every image is written; a problem ends it through SystemExit with its message
    (exit status 1), like the other scripts. `run` returns the written paths, for callers in Python."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    run(setup_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
