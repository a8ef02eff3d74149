"""Downscale a folder of images to one or more maximum areas (kohya's tools/resize_images_to_resolution.py).

    python tools/resize_images_to_resolution.py src dst --max_resolution 512x512,384x384 --divisible_by 8 \\
        [--interpolation area|cubic|lanczos4|nearest|linear|box] [--save_as_png] [--copy_associated_files]

For every image `src/<name>.<ext>` and every `WxH` of --max_resolution, `dst/<name>+WxH.jpg` (`.png` with
--save_as_png; JPEG quality 100, as kohya): an image with more than W*H pixels is scaled, aspect ratio kept, to
`int(side * sqrt(W*H / pixels))` on each side; then each side is cut down to a multiple of --divisible_by by a
centre crop (smaller images are only cropped, never enlarged). Files that are not images (captions, tags) are
copied to dst unchanged; with --copy_associated_files, `<name>.*` beside an image is also copied as
`<name>+WxH.*` for each size, so each resized image keeps its caption.

Differs from kohya, on purpose:
- each size is computed from the original image (kohya resizes each size from the previous size's result, and
  since it switched to its shared resize helper it swaps width and height when resizing, so non-square images come
  out with the wrong aspect ratio);
- images are read as the trainers read them (EXIF rotation applied, transparency composited onto white; kohya
  drops both, so phone photos come out sideways); image suffixes match in any case (kohya copies `x.PNG` as a
  non-image);
- resampling is PIL's (area = box averaging, as the trainers' --resize_interpolation), so pixels may differ from
  kohya's OpenCV by rounding; sizes and names are kohya's;
- every file is written atomically, subfolders are skipped (kohya stops at the first one), and dst may not be src
  (the copied captions would overwrite themselves).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.atomic_files import OutputPathError, atomic_file  # noqa: E402
from library.buckets import resample_filter  # noqa: E402
from library.images import ImageError, is_image_file, load_image  # noqa: E402

logger = logging.getLogger("resize_images")

# kohya's --interpolation names (OpenCV's) -> the trainers' --resize_interpolation names (PIL filters).
INTERPOLATIONS = {"area": "area", "cubic": "cubic", "lanczos4": "lanczos", "nearest": "nearest", "linear": "linear",
                  "box": "box"}


@dataclass(frozen=True)
class MaxResolution:
    text: str  # as given (stripped), e.g. "512x512": part of the output names
    pixels: int


def parse_max_resolutions(text: str) -> list[MaxResolution]:
    sizes = []
    for part in (p.strip() for p in text.split(",")):
        w, sep, h = part.partition("x")
        if not sep or not w.strip().isdigit() or not h.strip().isdigit() or int(w) < 1 or int(h) < 1:
            raise ValueError(f"--max_resolution {text!r}: {part!r} is not WIDTHxHEIGHT (e.g. 512x512,384x384)")
        sizes.append(MaxResolution(part, int(w) * int(h)))
    return sizes


def target_size(size: tuple[int, int], max_pixels: int, divisible_by: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((scaled width, height), (final width, height)): kohya's arithmetic (int() of the scaled sides, then each
    side rounded down to a multiple of `divisible_by`)."""
    width, height = size
    if width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
        width, height = int(width * scale), int(height * scale)
    final = (width - width % divisible_by, height - height % divisible_by)
    if min(final) < 1:
        raise ValueError(f"{size[0]}x{size[1]} becomes {final[0]}x{final[1]} (scaled {width}x{height}, "
                         f"--divisible_by {divisible_by}): too small; use a larger --max_resolution or a smaller "
                         "--divisible_by")
    return (width, height), final


def resized(image: Image.Image, max_pixels: int, divisible_by: int, resample: int) -> Image.Image:
    scaled, (final_w, final_h) = target_size(image.size, max_pixels, divisible_by)
    if scaled != image.size:
        image = image.resize(scaled, resample=resample)
    # Centre crop to the multiple, offsets rounded down (kohya's int((old - new) / 2)).
    left, top = (scaled[0] - final_w) // 2, (scaled[1] - final_h) // 2
    return image.crop((left, top, left + final_w, top + final_h))


def save_image(image: Image.Image, dest: Path) -> None:
    with atomic_file(dest) as tmp:  # the temporary name has no suffix: the format is given
        if dest.suffix == ".png":
            image.save(tmp, format="PNG")
        else:
            image.save(tmp, format="JPEG", quality=100)


def copy_file(source: Path, dest: Path) -> None:
    with atomic_file(dest) as tmp:
        shutil.copyfile(source, tmp)


def resize_images(src: Path, dst: Path, *, max_resolution: str, divisible_by: int = 1,
                  interpolation: str | None = None, save_as_png: bool = False,
                  copy_associated_files: bool = False) -> list[str]:
    """Write dst's files; returns the images that could not be read (each named with its problem)."""
    from tqdm import tqdm

    sizes = parse_max_resolutions(max_resolution)
    if divisible_by < 1:
        raise ValueError(f"--divisible_by must be at least 1, got {divisible_by}")
    if not src.is_dir():
        raise ValueError(f"src_img_folder {src}: no such folder")
    if dst.exists() and not dst.is_dir():
        raise OutputPathError(f"dst_img_folder {dst} is a file; give a folder")
    if dst.exists() and os.path.realpath(dst) == os.path.realpath(src):
        raise OutputPathError(f"dst_img_folder {dst} is src_img_folder: the copied caption files would overwrite "
                              "themselves; give another folder")
    # None: area averaging (only ever shrinking here), kohya's default.
    resample = resample_filter(INTERPOLATIONS[interpolation or "area"])
    dst.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in src.iterdir() if p.is_file())
    images = [p for p in files if is_image_file(p)]
    skipped = sorted(p.name for p in src.iterdir() if p.is_dir())
    if skipped:
        logger.info("subfolders are not processed: %s", ", ".join(skipped))
    for other in (p for p in files if not is_image_file(p)):
        copy_file(other, dst / other.name)
    failed = []
    for path in tqdm(images, desc="resizing images", unit="image"):
        try:
            image = load_image(path).rgb
        except ImageError as e:
            failed.append(str(e))
            continue
        for size in sizes:
            out = resized(image, size.pixels, divisible_by, resample)
            name = f"{path.stem}+{size.text}{'.png' if save_as_png else '.jpg'}"
            save_image(out, dst / name)
            logger.debug("%s %dx%d -> %s %dx%d", path.name, *image.size, name, *out.size)
        if copy_associated_files:
            for associated in (p for p in files if p.stem == path.stem and not is_image_file(p)):
                for size in sizes:
                    copy_file(associated, dst / f"{path.stem}+{size.text}{associated.suffix}")
    logger.info("%d image(s) x %d size(s) written to %s", len(images) - len(failed), len(sizes), dst)
    return failed


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src_img_folder", help="folder of the source images")
    p.add_argument("dst_img_folder", help="folder for the resized images (created if needed)")
    p.add_argument("--max_resolution", default="512x512,384x384,256x256,128x128",
                   help="maximum areas 'WxH[,WxH...]'; one output per image and size (default: kohya's four)")
    p.add_argument("--divisible_by", type=int, default=1, help="crop each side down to a multiple of this")
    p.add_argument("--interpolation", choices=list(INTERPOLATIONS), default=None,
                   help="resampling filter (default area averaging)")
    p.add_argument("--save_as_png", action="store_true", help="write PNG (default JPEG, quality 100)")
    p.add_argument("--copy_associated_files", action="store_true",
                   help="copy <name>.* (captions, tags) beside each output as <name>+WxH.*")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    args = setup_parser().parse_args(argv)
    try:
        failed = resize_images(Path(args.src_img_folder), Path(args.dst_img_folder),
                               max_resolution=args.max_resolution, divisible_by=args.divisible_by,
                               interpolation=args.interpolation, save_as_png=args.save_as_png,
                               copy_associated_files=args.copy_associated_files)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if failed:
        print(f"error: {len(failed)} image(s) could not be read (the others were written):\n  " +
              "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
