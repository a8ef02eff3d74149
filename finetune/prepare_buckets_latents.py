"""Assign each image of a fine-tune metadata file to its bucket and encode its VAE latents ahead of training
(kohya's finetune/prepare_buckets_latents.py).

    python finetune/prepare_buckets_latents.py train_data_dir meta_clean.json meta_lat.json model.safetensors \\
        --max_resolution 512,512 --batch_size 4 [--flip_aug]

then train with the same bucket settings:

    fine_tune.py --train_data_dir train_data_dir --in_json meta_lat.json --resolution 512,512 --enable_bucket \\
        --cache_latents_to_disk [--flip_aug] ...

The latents go into the trainer's own latent cache (library/latent_cache.py): `<stem>_<W>x<H>_sd_latents.safetensors`
beside each image, keyed by the image file, its bucket and crop, the VAE weights and the dtype. Training finds and
checks them; an entry that no longer matches (edited image, other bucket settings, VAE or precision) is
recomputed, never used. `image_size` and `train_resolution` (the bucket) are written into out_json.

Differs from kohya: kohya writes `<stem>.npz` files that its trainer reuses without checking them; here the
entries of in_json are the images (kohya also added an entry for every image in the folder, even uncaptioned ones:
such images are listed in a warning instead); valid latents are always reused and stale ones always recomputed,
so --skip_existing is implied, as are --full_path and --recursive (keys are resolved as the trainer resolves them).
Give the training run's VAE precision: --mixed_precision as for training, plus --no_half_vae if training uses it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from library.atomic_files import OutputPathError, check_writable_output  # noqa: E402
from library.buckets import BucketConfig  # noqa: E402
from library.dataset_config import DatasetConfigError, build_metadata_dataset  # noqa: E402
from library.dataset_sources import DatasetError  # noqa: E402
from library.images import ImageError  # noqa: E402
from library.latent_cache import CacheSettings, LatentCache  # noqa: E402
from library.metadata_files import MetadataError, read_metadata, resolve_image, write_metadata  # noqa: E402
from library.model_loading import instantiate_component  # noqa: E402
from library.precision import precision_policy  # noqa: E402
from library.sd_checkpoint import FamilyHints, read_checkpoint  # noqa: E402
from library.tensor_files import CheckpointError  # noqa: E402
from library.train_dataset import TrainingDataset  # noqa: E402

logger = logging.getLogger("finetune")


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("train_data_dir", help="folder of the training images (the trainer's --train_data_dir)")
    p.add_argument("in_json", help="metadata file to read")
    p.add_argument("out_json", help="metadata file to write, with image_size and train_resolution")
    p.add_argument("model_name_or_path", help="Stable Diffusion checkpoint or diffusers folder (its VAE is used)")
    p.add_argument("--v2", action="store_true", help="the model is SD 2.x (checked against the weights)")
    p.add_argument("--batch_size", type=int, default=1, help="images per VAE batch")
    p.add_argument("--max_data_loader_n_workers", type=int, default=None,
                   help="read and resize the images in this many worker processes while the VAE encodes (kohya's "
                        "DataLoader option; default: in this process). The latents are the same either way")
    p.add_argument("--max_resolution", default="512,512", help="training resolution 'width,height' (--resolution)")
    p.add_argument("--min_bucket_reso", type=int, default=256)
    p.add_argument("--max_bucket_reso", type=int, default=1024)
    p.add_argument("--bucket_reso_steps", type=int, default=64)
    p.add_argument("--bucket_no_upscale", action="store_true", help="one bucket per image size, never upscaled")
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no",
                   help="the VAE's precision: use the training run's setting")
    p.add_argument("--no_half_vae", action="store_true", help="keep the VAE in fp32 (as the trainer's flag)")
    p.add_argument("--flip_aug", action="store_true", help="also encode the mirrored images (for --flip_aug)")
    p.add_argument("--alpha_mask", action="store_true", help="also cache the images' alpha channels as loss masks")
    for flag in ("--full_path", "--recursive", "--skip_existing"):
        p.add_argument(flag, action="store_true", help="implied (accepted for kohya compatibility)")
    return p


def parse_size(text: str, flag: str) -> tuple[int, int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) <= 0:
        raise ValueError(f"{flag} {text!r}: expected 'width,height' (e.g. 512,512) or one size")
    return (values[0], values[-1])


def with_bucket_sizes(metadata: dict[str, dict], dataset: TrainingDataset, image_dir: Path,
                      metadata_dir: Path) -> dict[str, dict]:
    """A copy of the metadata with each entry's image_size and train_resolution (its bucket), both [w, h]."""
    by_path = {item.record.path: item for item in dataset.items}
    out = {}
    for key, entry in metadata.items():
        item = by_path[resolve_image(key, image_dir, metadata_dir)]  # the dataset was built from these keys
        out[key] = {**entry, "image_size": list(item.record.size), "train_resolution": list(item.bucket)}
    return out


def prepare(args: argparse.Namespace) -> None:
    train_dir, in_json, out_json = Path(args.train_data_dir), Path(args.in_json), Path(args.out_json)
    if not train_dir.is_dir():
        raise ValueError(f"train_data_dir {train_dir}: no such folder")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.max_data_loader_n_workers is not None and args.max_data_loader_n_workers < 0:
        raise ValueError(f"--max_data_loader_n_workers must be 0 or more, got {args.max_data_loader_n_workers}")
    buckets = BucketConfig(parse_size(args.max_resolution, "--max_resolution"), enable_bucket=True,
                           min_bucket_reso=args.min_bucket_reso, max_bucket_reso=args.max_bucket_reso,
                           bucket_reso_steps=args.bucket_reso_steps, bucket_no_upscale=args.bucket_no_upscale)
    buckets.validate(family_step=None)  # bad bucket flags fail now; the warnings come with the dataset
    check_writable_output(out_json)
    metadata = read_metadata(in_json)

    dtype = precision_policy(args.mixed_precision, no_half_vae=args.no_half_vae).vae_dtype
    with read_checkpoint(args.model_name_or_path, FamilyHints(v2=True if args.v2 else None)) as checkpoint:
        # The dataset exactly as the trainer builds it (a missing image fails here, before the VAE is loaded).
        dataset = build_metadata_dataset(train_dir, in_json, buckets, family_step=checkpoint.family.bucket_reso_step,
                                         flip_aug=args.flip_aug, alpha_mask=args.alpha_mask)
        vae = instantiate_component(checkpoint, "vae", dtype)
    vae.to("cuda" if torch.cuda.is_available() else "cpu")
    settings = CacheSettings(to_disk=True, batch_size=args.batch_size,
                             image_workers=args.max_data_loader_n_workers or 0)
    LatentCache(vae, settings, dtype=dtype).build(dataset)
    write_metadata(out_json, with_bucket_sizes(metadata, dataset, train_dir, in_json.parent))
    logger.info("wrote %s (%d entries); the latents are beside the images. Train with the same settings: %s",
                out_json, len(metadata), " ".join(training_flags(args, buckets)))


def training_flags(args: argparse.Namespace, buckets: BucketConfig) -> list[str]:
    """The trainer flags under which training finds these latents valid."""
    flags = ["--train_data_dir", args.train_data_dir, "--in_json", args.out_json, "--resolution",
             "{},{}".format(*buckets.resolution), "--enable_bucket", "--min_bucket_reso", str(args.min_bucket_reso),
             "--max_bucket_reso", str(args.max_bucket_reso), "--bucket_reso_steps", str(args.bucket_reso_steps)]
    for flag in ("bucket_no_upscale", "flip_aug", "alpha_mask", "no_half_vae"):
        if getattr(args, flag):
            flags.append("--" + flag)
    if args.mixed_precision != "no":
        flags += ["--mixed_precision", args.mixed_precision]
    return flags + ["--cache_latents_to_disk"]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        prepare(setup_parser().parse_args(argv))
    except (MetadataError, DatasetError, DatasetConfigError, CheckpointError, ImageError, OutputPathError,
            FloatingPointError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
