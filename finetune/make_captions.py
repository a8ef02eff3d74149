"""Caption images with BLIP (kohya's finetune/make_captions.py; its flags and caption files), through transformers'
BlipForConditionalGeneration from a local model folder.

    python finetune/make_captions.py images --model_dir blip-large --batch_size 8 \\
        [--beam_search --num_beams 3] [--top_p 0.9] [--max_length 75] [--min_length 5] \\
        [--caption_extension .caption] [--recursive] [--seed 42]

writes `images/<stem>.caption` for each image: the caption and a newline, what the trainers read with their
default --caption_extension and `finetune/merge_captions_to_metadata.py` merges into fine-tune metadata.

The model is a transformers BLIP captioning folder, e.g. Salesforce/blip-image-captioning-large (the converted
form of kohya's default BLIP-large weights) downloaded elsewhere and copied here; give it as --model_dir, or as
--caption_weights (kohya's flag, which takes a URL or a .pth file there: those are refused here, since nothing is
downloaded and the original checkpoint format is not read). Decoding is kohya's (library/blip_captioning.py):
nucleus sampling by default (--top_p), beam search with --beam_search (--num_beams); the global seed
(--seed, default 42) makes sampling repeatable for the same images, batch size and device.

Differs from kohya, on purpose: images are read as the trainers read them (EXIF rotation applied, transparency
on white; kohya drops the alpha channel, so transparent areas show whatever colour they hide); caption files are
written atomically; an unreadable image is reported by name and the others are still captioned (exit status 1 at
the end; kohya skips it with a log line, or stops, depending on --max_data_loader_n_workers).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from library import blip_captioning as blip  # noqa: E402
from library import folder_captioning as captioning  # noqa: E402

logger = logging.getLogger("make_captions")


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("train_data_dir", help="folder of the images to caption")
    p.add_argument("--model_dir", default=None,
                   help=f"local transformers BLIP captioning folder (e.g. {blip.TRANSFORMERS_EQUIVALENT})")
    p.add_argument("--caption_weights", default=blip.KOHYA_DEFAULT_WEIGHTS,
                   help="kohya's flag: here a local model folder as --model_dir (URLs and .pth files are refused)")
    p.add_argument("--caption_extention", default=None, help=argparse.SUPPRESS)  # kohya's misspelled alias
    p.add_argument("--caption_extension", default=".caption", help="extension of the caption files")
    p.add_argument("--beam_search", action="store_true", help="beam search instead of nucleus sampling")
    p.add_argument("--batch_size", type=int, default=1, help="images per model call")
    p.add_argument("--max_data_loader_n_workers", type=int, default=None,
                   help="read images in this many worker processes (default: in the main process)")
    p.add_argument("--num_beams", type=int, default=1, help="beams of --beam_search")
    p.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling's top_p")
    p.add_argument("--max_length", type=int, default=75, help="longest caption in tokens (with the prompt's)")
    p.add_argument("--min_length", type=int, default=5, help="shortest caption in tokens (with the prompt's)")
    p.add_argument("--seed", type=int, default=42, help="seed of the sampling")
    p.add_argument("--debug", action="store_true", help="log each caption")
    p.add_argument("--recursive", action="store_true", help="also caption images in subfolders")
    return p


def check_args(args: argparse.Namespace) -> blip.Decoding:
    problems = captioning.batching_problems(args.batch_size, args.max_data_loader_n_workers)
    if args.num_beams < 1:
        problems.append(f"--num_beams must be at least 1, got {args.num_beams}")
    if not 0 < args.top_p <= 1:
        problems.append(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.min_length < 0 or args.max_length < 1 or args.min_length > args.max_length:
        problems.append(f"--min_length {args.min_length} / --max_length {args.max_length}: need 0 <= min <= max")
    if args.num_beams > 1 and not args.beam_search:
        logger.warning("--num_beams %d without --beam_search: beams are only used by beam search; this run samples "
                       "(nucleus sampling, --top_p) as kohya's does. Add --beam_search to use the beams",
                       args.num_beams)
    if problems:
        raise captioning.CaptioningError("\n       ".join(problems))
    return blip.Decoding(beam_search=args.beam_search, num_beams=args.num_beams, top_p=args.top_p,
                         max_length=args.max_length, min_length=args.min_length)


def run(args: argparse.Namespace) -> list[str]:
    """Caption the folder; returns the problems with single images (the others are written)."""
    import torch

    decoding = check_args(args)
    images = captioning.images_to_caption(Path(args.train_data_dir), recursive=args.recursive,
                                          caption_extension=args.caption_extension)
    model_folder = blip.model_folder(args.model_dir, None if args.model_dir else args.caption_weights)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor = blip.load_model(model_folder, device)
    logger.info("loaded BLIP from %s on %s; %d image(s)", model_folder, device, len(images))
    torch.manual_seed(args.seed)  # once, as kohya: sampling draws from the global generator from here on
    return captioning.write_captions(images, lambda batch: blip.caption_batch(model, processor, batch, decoding),
                                     batch_size=args.batch_size, workers=args.max_data_loader_n_workers,
                                     caption_extension=args.caption_extension, debug=args.debug)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    args = setup_parser().parse_args(argv)
    if args.caption_extention:
        args.caption_extension = args.caption_extention
    return captioning.exit_status(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
