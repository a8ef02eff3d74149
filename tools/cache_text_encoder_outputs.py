"""Encode a training dataset's captions ahead of training, into the trainers' own text-encoder output cache (kohya's
tools/cache_text_encoder_outputs.py).

    python tools/cache_text_encoder_outputs.py --pretrained_model_name_or_path sd_xl_base_1.0.safetensors \\
        --train_data_dir data --resolution 1024 --mixed_precision bf16 [--max_token_length 225] [--clip_skip 2]
    python tools/cache_text_encoder_outputs.py --config_file my_training.toml

then train with the same dataset, caption and precision flags plus --cache_text_encoder_outputs_to_disk (and
frozen text encoders, e.g. train_network.py's --network_train_unet_only): every image's
`<stem>_te_outputs.safetensors` is found valid and no caption is encoded. The flags are the trainers' (see
library/cache_tools.py): captions as the dataset gives them (prefix, suffix, --caption_extension, metadata), the
text encoders in the training precision with --textual_inversion_embeddings added, the encoding flags
(--max_token_length, --clip_skip, --weighted_captions). Only the text encoders are loaded.
--text_encoder_batch_size sets how many captions go through the encoders at once (default 8).

Every family works (kohya's tool: SDXL and FLUX). Refused by name, as the trainers refuse them with the cache:
caption options that change a caption per step (shuffle, dropout, wildcards, token warmup), --pivotal_token
(the word trains, so its outputs change), and train_network.py's --base_weights (merged into the text encoders
before caching; this tool does not merge them). Several GPUs or machines: `accelerate launch --num_processes N
tools/cache_text_encoder_outputs.py ...`; each process encodes its share of the captions and writes its images'
files (the same bytes one process writes; library/cache_split.py). Differs from kohya: kohya's .npz files are not
read or written; --skip_existing is implied; --sdxl is checked against the weights; FLUX / SD3 options are refused.
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

logger = logging.getLogger("cache_text_encoder_outputs")


def setup_parser():
    return cache_tools.setup_parser(__doc__, text_encoder_tool=True)


def cache(argv: list[str] | None = None) -> int:
    """The number of images whose entries are on disk."""
    args = cache_tools.parse(setup_parser(), argv)
    if args.pivotal_token:
        raise SystemExit("error: --pivotal_token trains its word during the run, so the text encoders' outputs for "
                         "captions holding it change every step and cannot be cached (the trainers refuse "
                         "--cache_text_encoder_outputs with it too); drop it")
    if args.base_weights:
        raise SystemExit("error: --base_weights: train_network.py merges these LoRAs into the text encoders before "
                         "caching their outputs, which this tool does not do, so its entries would not match that "
                         "run; let the training run fill the cache (--cache_text_encoder_outputs_to_disk)")
    if args.cache_latents or args.cache_latents_to_disk:
        logger.info("latents are cached by tools/cache_latents.py, not by this tool")
    checkpoint = cache_tools.open_model(args, "tools/cache_text_encoder_outputs.py")
    accelerator = setup.make_accelerator(args)
    dataset = cache_tools.build_dataset(args, checkpoint)
    encoders = tuple(slot.component for slot in checkpoint.family.text_encoders)
    models, precision = setup.load_models(args, checkpoint, accelerator, components=encoders)
    added_tokens, _ = setup.add_embeddings(args, models, precision)
    if added_tokens:
        from library.textual_inversion import CaptionRewrite

        dataset.caption_rewrite = CaptionRewrite(added_tokens)  # as the trainers: a token string stands for its vectors
    setup.cache_text_encoder_outputs(cache_tools.with_flags(args, cache_text_encoder_outputs=True,
                                                            cache_text_encoder_outputs_to_disk=True),
                                     dataset, setup.text_conditioner(args, models), models, accelerator,
                                     keep_encoders=True, batch_size=args.text_encoder_batch_size)
    return len({str(item.record.path) for item in dataset.items})


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    images = cache(argv)
    logger.info("text-encoder outputs of %d images are on disk beside them; train with the same dataset, caption "
                "and precision flags and --cache_text_encoder_outputs_to_disk to use them", images)
    return 0


if __name__ == "__main__":
    sys.exit(main())
