"""Caption images with GIT (kohya's finetune/make_captions_by_git.py; its flags and caption files), through
transformers' GitForCausalLM from a local model folder.

    python finetune/make_captions_by_git.py images --model_id git-large-textcaps --batch_size 8 \\
        [--max_length 50] [--remove_words] [--caption_extension .caption] [--recursive] [--debug]

writes `images/<stem>.caption` for each image: the caption and a newline, what the trainers read with their
default --caption_extension and `finetune/merge_captions_to_metadata.py` merges into fine-tune metadata.

--model_id is a local transformers GIT folder, e.g. kohya's default microsoft/git-large-textcaps downloaded
elsewhere and copied here; a hub id is not downloaded (HF_HUB_OFFLINE=1) and is refused with how to get the
folder. Decoding is kohya's (library/git_captioning.py): generate() from the image with --max_length (tokens, the
start token included), greedy as the model's generation config says. --remove_words cuts kohya's "with the words
xxx" / "that says xxx" phrases, which GIT (trained on captions of images with text) writes for text that is often
not in the image.

Differs from kohya, on purpose: images are read as the trainers read them (EXIF rotation applied, transparency
on white); --remove_words also tidies the spaces its cuts leave; caption files are written atomically; an
unreadable image is reported by name and the others are still captioned (exit status 1 at the end).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from library import folder_captioning as captioning  # noqa: E402
from library import git_captioning as git  # noqa: E402

logger = logging.getLogger("make_captions_by_git")


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("train_data_dir", help="folder of the images to caption")
    p.add_argument("--caption_extension", default=".caption", help="extension of the caption files")
    p.add_argument("--model_id", default=git.KOHYA_DEFAULT_MODEL,
                   help=f"local transformers GIT folder (e.g. {git.KOHYA_DEFAULT_MODEL}, downloaded elsewhere); "
                        "hub ids are not downloaded")
    p.add_argument("--batch_size", type=int, default=1, help="images per model call")
    p.add_argument("--max_data_loader_n_workers", type=int, default=None,
                   help="read images in this many worker processes (default: in the main process)")
    p.add_argument("--max_length", type=int, default=50, help="longest caption in tokens (with the start token)")
    p.add_argument("--remove_words", action="store_true",
                   help="remove phrases like 'with the words xxx' and 'that says xxx' from the captions")
    p.add_argument("--debug", action="store_true", help="log each caption (and each --remove_words change)")
    p.add_argument("--recursive", action="store_true", help="also caption images in subfolders")
    return p


def run(args: argparse.Namespace) -> list[str]:
    """Caption the folder; returns the problems with single images (the others are written)."""
    import torch

    problems = captioning.batching_problems(args.batch_size, args.max_data_loader_n_workers)
    if args.max_length < 2:  # the start token, then at least one generated token
        problems.append(f"--max_length must be at least 2, got {args.max_length}")
    if problems:
        raise captioning.CaptioningError("\n       ".join(problems))
    images = captioning.images_to_caption(Path(args.train_data_dir), recursive=args.recursive,
                                          caption_extension=args.caption_extension)
    model_folder = git.model_folder(args.model_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor = git.load_model(model_folder, device)
    logger.info("loaded GIT from %s on %s; %d image(s)", model_folder, device, len(images))

    def caption_batch(batch: list) -> list[str]:
        captions = git.caption_batch(model, processor, batch, max_length=args.max_length)
        if not args.remove_words:
            return captions
        removed = [git.remove_text_phrases(c) for c in captions]
        for before, after in zip(captions, removed):
            if args.debug and after != before:
                logger.info("--remove_words: %r -> %r", before, after)
        return removed

    return captioning.write_captions(images, caption_batch, batch_size=args.batch_size,
                                     workers=args.max_data_loader_n_workers,
                                     caption_extension=args.caption_extension, debug=args.debug)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    return captioning.exit_status(lambda: run(setup_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
