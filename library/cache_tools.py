"""The trainers' caches filled ahead of training: the command line and setup shared by tools/cache_latents.py and
tools/cache_text_encoder_outputs.py (kohya's names and flags).

A tool takes the training run's own flags (the trainers' shared groups: model, dataset, precision, caption
encoding, embeddings) and runs the trainers' own setup steps (library/training_setup.py: read_base_model,
build_dataset, load_models, cache_latents / cache_text_encoder_outputs), so each entry it writes carries exactly
the key the training run computes for it: that run finds every entry valid and encodes nothing. A trainer's
--config_file works unchanged: its keys that are flags of a trainer but not of the tool (network, optimizer
details, ...) are skipped with a log line. Only the models a cache needs are loaded (the VAE, or the text
encoders). Entries always go to disk (as kohya's tools): train with --cache_latents_to_disk /
--cache_text_encoder_outputs_to_disk to read them.
"""

from __future__ import annotations

import argparse
import importlib
import logging

from library import train_args
from library import training_setup as setup
from library.dataset_sources import ConditioningUse
from library.families import ALL_UNET_INPUTS, TEXT_TO_IMAGE
from library.sd_checkpoint import SD_ARCHS, SDCheckpoint

logger = logging.getLogger(__name__)

# The scripts whose --config_file a tool reads: their own flags are known, so a config shared with them is not
# an error, while a misspelt key still is.
TRAINER_SCRIPTS = ("train_network", "sdxl_train_network", "train_db", "fine_tune", "sdxl_train", "train_controlnet",
                   "sdxl_train_control_net", "train_textual_inversion", "sdxl_train_textual_inversion")

# kohya's cache tools also parse the FLUX / SD3 (DiT) options; this suite has no such models.
DIT_FLAGS = ("--flux", "--ae", "--clip_l", "--t5xxl", "--t5xxl_dtype", "--t5xxl_max_token_length",
             "--apply_t5_attn_mask", "--controlnet_model_name_or_path", "--guidance_scale", "--timestep_sampling",
             "--sigmoid_scale", "--model_prediction_type", "--discrete_flow_shift", "--model_type",
             "--weighting_scheme", "--logit_mean", "--logit_std", "--mode_scale", "--blocks_to_swap")


def setup_parser(description: str, *, text_encoder_tool: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    train_args.add_common_training_arguments(p, implemented=(train_args.TEXT_ENCODER_CACHE_FLAG,
                                                             train_args.FP8_BASE_FLAG))
    train_args.add_text_encoder_cache_arguments(p)
    train_args.add_embedding_arguments(p)
    for action in p._actions:
        if action.dest == "output_dir":
            action.required = False  # nothing is written there; a training command's value is accepted
    g = p.add_argument_group("cache tool (kohya's flags)")
    g.add_argument("--sdxl", action="store_true", help="the model is SDXL (detected from the weights; checked)")
    g.add_argument(train_args.FP8_BASE_FLAG, action="store_true",
                   help="accepted, changes nothing here: the entries do not depend on it (the trainers fill their "
                        "caches before storing the base model in float8)")
    g.add_argument("--skip_existing", action="store_true",
                   help="implied: valid entries are always kept, stale ones recomputed (kohya: deprecated)")
    g.add_argument("--text_encoder_batch_size", type=int, default=None,
                   help="captions per text-encoder call while caching (default 8; the entries do not depend on it)"
                        + ("" if text_encoder_tool else "; used by tools/cache_text_encoder_outputs.py"))
    if text_encoder_tool:
        # train_network.py merges --base_weights into the text encoders before caching their outputs.
        g.add_argument("--base_weights", nargs="*", default=None, help=argparse.SUPPRESS)
        g.add_argument("--base_weights_multiplier", type=float, nargs="*", default=None, help=argparse.SUPPRESS)
    g = p.add_argument_group("FLUX / SD3 options of kohya's tools (refused: this suite has no such models)")
    for flag in DIT_FLAGS:
        g.add_argument(flag, default=None, nargs="?", const=True,
                       help="refused: an option of kohya's FLUX / SD3 models; this suite has none")
    return p


def trainer_only_keys(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Config keys that are trainer flags the tool lacks: key -> the first trainer script that has it."""
    own = {action.dest for action in parser._actions}
    keys: dict[str, str] = {}
    for name in TRAINER_SCRIPTS:
        for action in importlib.import_module(name).setup_parser()._actions:
            if action.dest not in own and action.dest != "help":
                keys.setdefault(action.dest, f"{name}.py")
    return keys


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config_file", default=None)
    early, _ = pre.parse_known_args(argv)
    elsewhere = trainer_only_keys(parser) if early.config_file else None
    args = train_args.parse_args(parser, argv, config_keys_elsewhere=elsewhere)
    given = [flag for flag in DIT_FLAGS if getattr(args, flag[2:]) is not None]
    if given:
        raise SystemExit(f"error: {', '.join(given)}: FLUX / SD3 options; this suite trains and caches for SD 1.x, "
                         "2.x and SDXL models only. Remove the flag(s)")
    if args.fp8_base:
        logger.info("--fp8_base: nothing to change; the trainers fill their caches before storing the base model in "
                    "float8, so the entries are the same with or without it")
    if args.text_encoder_batch_size is not None and args.text_encoder_batch_size < 1:
        raise SystemExit(f"error: --text_encoder_batch_size must be at least 1, got {args.text_encoder_batch_size}")
    return args


def open_model(args: argparse.Namespace, tool: str) -> SDCheckpoint:
    """The base model, checked as the trainers check it (any family: the tool serves every trainer)."""
    train_args.check_training_flags(args)
    checkpoint = setup.read_base_model(args, setup.TrainedArchs(tool, SD_ARCHS + ("sdxl",), inputs=ALL_UNET_INPUTS))
    if args.sdxl and checkpoint.family.arch != "sdxl":
        checkpoint.close()
        raise SystemExit(f"error: --sdxl, but {args.pretrained_model_name_or_path} is "
                         f"{checkpoint.family.description}; drop --sdxl (the family is read from the weights)")
    return checkpoint


def build_dataset(args: argparse.Namespace, checkpoint: SDCheckpoint):
    """The training run's dataset. --conditioning_data_dir without --masked_loss on a text-to-image model can only
    come from a ControlNet training command: its folder then holds control images (the trainers' reading)."""
    family = checkpoint.family
    control = bool(args.conditioning_data_dir and not args.masked_loss and family.unet_inputs == TEXT_TO_IMAGE)
    dataset, _ = setup.build_dataset(
        args, family, args.seed if args.seed is not None else 0,  # no entry depends on the seed
        conditioning_use=ConditioningUse.CONTROL if control else ConditioningUse.LOSS_MASK,
        unet_in_channels=checkpoint.configs.unet.get("in_channels"))
    return dataset


def with_flags(args: argparse.Namespace, **flags) -> argparse.Namespace:
    """A copy of the arguments with the cache flags a tool implies (the parsed namespace stays as given)."""
    return argparse.Namespace(**{**vars(args), **flags})
