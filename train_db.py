"""DreamBooth: train the whole Stable Diffusion 1.x / 2.x model on a subject, with prior preservation
(kohya-ss/sd-scripts' train_db.py interface, plus class-image generation as in the diffusers example).

    accelerate launch train_db.py --pretrained_model_name_or_path model.safetensors \\
        --train_data_dir data --reg_data_dir reg --class_prompt "a photo of a dog" --num_class_images 200 \\
        --output_dir out --output_name sks_dog --resolution 512 --learning_rate 1e-6 \\
        --max_train_steps 1600 --stop_text_encoder_training 800 --prior_loss_weight 1.0

`--train_data_dir` holds `<repeats>_<identifier> <class>` folders (e.g. `20_sks dog`), `--reg_data_dir` holds
`<repeats>_<class>` folders; with `--class_prompt`, missing class images are generated into
`<reg_data_dir>/1_<class prompt>` with the base model before training. The recipe is the shared full-model one
(library/full_finetune.py); the output is a complete checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from library import train_args  # noqa: E402
from library.full_finetune import FullModelRecipe, add_full_model_arguments, train_full_model  # noqa: E402

logger = logging.getLogger("train_db")


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train_args.add_common_training_arguments(p)
    add_full_model_arguments(p)
    g = p.add_argument_group("DreamBooth")
    g.add_argument("--stop_text_encoder_training", type=int, default=None,
                   help="train the text encoder for this many steps, then only the U-Net (-1: never train it)")
    g.add_argument("--no_token_padding", action="store_true",
                   help="pad captions only to the longest in the batch, not to 77 tokens (original DreamBooth)")
    g.add_argument("--class_prompt", default=None,
                   help="generate missing class images for prior preservation with this prompt")
    g.add_argument("--num_class_images", type=int, default=100, help="class images wanted (with --class_prompt)")
    g.add_argument("--sample_batch_size", type=int, default=4, help="class images generated per batch")
    g.add_argument("--class_image_steps", type=int, default=30, help="sampling steps per class image")
    g.add_argument("--class_image_sampler", default="ddim", help="sampler for class images (as --sample_sampler)")
    return p


def class_image_step(args):
    """Plan (and check) class-image generation now, before any model loads; return the step that generates the
    missing images with the loaded base model, or None."""
    if not args.class_prompt:
        return None
    from library.class_images import check_writable, generate_class_images, plan_class_images
    from library.prompt_files import SamplePrompt
    from library.samplers import sampler_name

    if not args.reg_data_dir:
        raise SystemExit("error: --class_prompt needs --reg_data_dir (the class images are generated into "
                         "<reg_data_dir>/1_<class prompt>); give the folder, it is created if missing")
    if args.dataset_config:
        raise SystemExit("error: --class_prompt with --dataset_config: generate the class images once with "
                         "--reg_data_dir, then list that folder as an `is_reg = true` subset in the dataset TOML")
    if args.sample_batch_size < 1 or args.class_image_steps < 1:
        raise SystemExit("error: --sample_batch_size and --class_image_steps must be at least 1")
    try:
        sampler_name(args.class_image_sampler)
        plan = plan_class_images(Path(args.reg_data_dir), args.class_prompt, args.num_class_images)
        check_writable(plan)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if not plan.to_generate:
        logger.info("%s already holds %d class image(s); none generated", plan.folder, plan.existing)
        return None

    def generate(models, start):
        width, height = train_args.parse_resolution(args.resolution, models.family.default_resolution)
        prompt = SamplePrompt(args.class_prompt, width=width, height=height, steps=args.class_image_steps)
        try:
            generate_class_images(plan, prompt=prompt, models=models, sampler_name=args.class_image_sampler,
                                  seed=start.seed, batch_size=args.sample_batch_size, clip_skip=args.clip_skip)
        except ValueError as e:  # a model that needs a condition image per image
            raise SystemExit(f"error: {e}") from None

    return generate


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = train_args.parse_args(setup_parser(), argv)
    if args.no_token_padding and (args.weighted_captions or args.max_token_length not in (None, 75)):
        raise SystemExit("error: --no_token_padding works with one plain 75-token window: leave out "
                         "--weighted_captions and --max_token_length")
    stop = args.stop_text_encoder_training
    recipe = FullModelRecipe(
        name="train_db", train_text_encoder=stop is None or stop >= 0, text_encoder_lrs=(args.learning_rate_te,),
        stop_text_encoder_at=stop if stop is not None and stop >= 0 else None,
        pad_captions_to_longest=args.no_token_padding, before_data=class_image_step(args))
    train_full_model(args, recipe)
    return 0


if __name__ == "__main__":
    sys.exit(main())
