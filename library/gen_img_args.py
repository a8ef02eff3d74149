"""gen_img.py's command line: kohya's flags (and this suite's few own), and their checks, which turn a problem a
user can fix into one "error: ..." line naming the flag, found before the model loads where possible (prompt files
are read once the model's family is known, before its weights are). The only argparse user of gen_img."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from library import generation_inputs as gi
from library import guidance, prompt_files, samplers, sampling
from library.families import DEPTH, EXTRA_CHANNELS, INPAINTING, TEXT_TO_IMAGE
from library.highres_fix import HighresFix, load_upscaler
from library.prompt_files import PromptFileError, SamplePrompt
from library.text_encoding import CHUNK
from library.train_args import add_console_log_arguments

logger = logging.getLogger("gen_img")


def setup_parser(description: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    g.add_argument("--vae_slices", type=int, default=None,
                   help="the VAE encodes and decodes each image in this many horizontal bands (kohya's; 16 or 32 "
                        "for large images): less memory (on a GPU the whole activations wait in host memory), "
                        "slower; the same image to float rounding. At most the latent rows (height / 8)")
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
                   help=f"one of {', '.join(list(samplers.SAMPLERS) + list(samplers.SAMPLER_ALIASES))}")
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
                   help="module per network (default networks.lora; also networks.lora_fa, networks.dylora, "
                        "networks.oft, lycoris.kohya; one value applies to all)")
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
    if args.vae_slices is not None and args.vae_slices < 1:
        raise fail(f"--vae_slices {args.vae_slices}: give the number of horizontal bands the VAE works in (1 or "
                   "more), or leave it out")
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
        samplers.sampler_name(args.sampler)
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
                        sampler=samplers.sampler_name(args.sampler), original_width=args.original_width,
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
            prompts = [prompt_files.parse_prompt_line(args.prompt, defaults, where="--prompt")]
        else:
            prompts = prompt_files.load_prompts(args.from_file, defaults)
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
