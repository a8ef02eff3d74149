"""Encode a training dataset's VAE latents ahead of training, into the trainers' own latent cache (kohya's
tools/cache_latents.py).

    python tools/cache_latents.py --pretrained_model_name_or_path model.safetensors --train_data_dir data \\
        --resolution 512 --enable_bucket --mixed_precision bf16 [--flip_aug] [--vae_batch_size 4]
    python tools/cache_latents.py --config_file my_training.toml        # a trainer's config file works as it is

then train with the same dataset, resolution, bucket and precision flags plus --cache_latents_to_disk: every
image's `<stem>_<W>x<H>_sd_latents.safetensors` is found valid and nothing is encoded. The flags are the
trainers' (see library/cache_tools.py): the dataset comes from --train_data_dir / --reg_data_dir / --in_json /
--dataset_config exactly as a trainer builds it, the VAE from the model (or --vae) in the training precision
(--mixed_precision, --no_half_vae). Only the VAE is loaded. Entries that are already valid are kept; stale ones
(edited image, other bucket, VAE or precision) are recomputed.

Several GPUs or machines, as kohya: `accelerate launch --num_processes N tools/cache_latents.py ...`; each process
encodes its share of the images and writes its own files (the same bytes one process writes;
library/cache_split.py). Differs from kohya: kohya's .npz files are not read or written (the trainers here keep their own keyed format); --skip_existing is
implied; --sdxl is checked against the weights; kohya's FLUX / SD3 options are refused by name.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from library import cache_tools  # noqa: E402
from library import training_setup as setup  # noqa: E402

logger = logging.getLogger("cache_latents")


def setup_parser():
    return cache_tools.setup_parser(__doc__, text_encoder_tool=False)


def cache(argv: list[str] | None = None) -> int:
    """The number of latent entries the dataset has (one per image and bucket)."""
    args = cache_tools.parse(setup_parser(), argv)
    if args.text_encoder_batch_size is not None or args.cache_text_encoder_outputs or \
            args.cache_text_encoder_outputs_to_disk:
        logger.info("text-encoder outputs are cached by tools/cache_text_encoder_outputs.py, not by this tool")
    checkpoint = cache_tools.open_model(args, "tools/cache_latents.py")
    accelerator = setup.make_accelerator(args)
    dataset = cache_tools.build_dataset(args, checkpoint)  # before the VAE loads: a dataset error fails at once
    models, precision = setup.load_models(args, checkpoint, accelerator, components=("vae",))
    setup.cache_latents(cache_tools.with_flags(args, cache_latents=True, cache_latents_to_disk=True), dataset,
                        models.vae, precision, accelerator)
    return len({item.cache_id for item in dataset.items})


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    entries = cache(argv)
    logger.info("%d latent entries are on disk beside the images; train with the same dataset, resolution, bucket "
                "and precision flags and --cache_latents_to_disk to use them", entries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
