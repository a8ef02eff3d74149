"""Canny edge maps for ControlNet conditioning images (kohya's tools/canny.py, plus a folder mode).

    python tools/canny.py --input photo.jpg --output photo_canny.png --thres1 32 --thres2 224
    python tools/canny.py --input train/10_sks --output cond/10_sks              # every image of a folder
    python tools/canny.py --input train --output cond --recursive                # subfolders mirrored

The edge map is `cv2.Canny(gray, thres1, thres2)` bit for bit (no blur, 3x3 Sobel, L1 gradient unless
--l2gradient; see library/canny.py), computed with numpy/scipy: OpenCV is not needed.

Folder mode writes `<output>/<stem>.png` for every image in --input (with --recursive, `<output>/<subfolder>/
<stem>.png`), so --output is directly a `--conditioning_data_dir` whose images pair with the training images by
stem. Edge maps that already exist are skipped (an interrupted run resumes; --overwrite recomputes them, e.g.
after changing thresholds); an image that cannot be read is reported by name and the others are still done.
A single --input file is always written to --output (a file name, or an existing folder for `<stem>.png`).

Edge maps are saved as 3-channel (RGB) 0/255 images, what diffusers' and kohya's ControlNet trainers load
(they convert conditioning images to RGB anyway). Images are read as the trainer reads them: EXIF rotation
applied and transparency composited onto white, so the edges line up with the training image.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.atomic_files import OutputPathError, atomic_file, check_writable_output  # noqa: E402
from library.canny import canny, rgb_to_gray  # noqa: E402
from library.images import IMAGE_EXTENSIONS, ImageError, list_images, load_image  # noqa: E402

logger = logging.getLogger("canny")

# PIL format per output extension; WebP is written lossless, since lossy compression smears one-pixel edges.
_SAVE_FORMATS = {".png": ("PNG", {}), ".bmp": ("BMP", {}), ".webp": ("WEBP", {"lossless": True}),
                 ".jpg": ("JPEG", {"quality": 95}), ".jpeg": ("JPEG", {"quality": 95})}


def edge_map(path: Path, thres1: float, thres2: float, *, l2_gradient: bool = False) -> Image.Image:
    """The RGB edge map of the image at `path` (ImageError, naming it, if it cannot be read)."""
    rgb = np.asarray(load_image(path).rgb)
    edges = canny(rgb_to_gray(rgb), thres1, thres2, l2_gradient=l2_gradient)
    return Image.fromarray(edges, "L").convert("RGB")


def save_image(image: Image.Image, dest: Path) -> None:
    fmt, options = _SAVE_FORMATS[dest.suffix.lower()]
    with atomic_file(dest) as tmp:  # the temp name has no image suffix: the format is given explicitly
        image.save(tmp, format=fmt, **options)


def _inside(inner: Path, outer: Path) -> bool:
    inner, outer = Path(os.path.realpath(inner)), Path(os.path.realpath(outer))
    return outer in inner.parents


def plan_folder(input_dir: Path, output_dir: Path, *, recursive: bool) -> list[tuple[Path, Path]]:
    """(source image, edge map path) for every image in `input_dir`; raises ValueError naming the problem."""
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputPathError(f"--output {output_dir} is a file, but --input {input_dir} is a folder; give a "
                              "folder for the edge maps")
    if os.path.realpath(output_dir) == os.path.realpath(input_dir):
        raise OutputPathError(f"--output {output_dir} is the same folder as --input {input_dir}; the edge maps "
                              "would overwrite the images - choose another folder")
    if recursive and _inside(output_dir, input_dir):
        raise OutputPathError(f"--output {output_dir} is inside --input {input_dir} with --recursive; the edge "
                              "maps would be read as images on the next run - choose a folder outside the input")
    sources = list_images(input_dir, recursive=recursive)
    if not sources:
        raise ValueError(f"--input {input_dir}: no images (looked for {', '.join(IMAGE_EXTENSIONS)}"
                         + ("" if recursive else "; add --recursive to include subfolders") + ")")
    plan: dict[Path, Path] = {}
    for source in sources:
        dest = output_dir / source.parent.relative_to(input_dir) / f"{source.stem}.png"
        if dest in plan:  # a.png and a.jpg in one folder would both become a.png
            raise ValueError(f"{plan[dest]} and {source} have the same stem, so both edge maps would be {dest}; "
                             "rename one of them (the trainer pairs conditioning images by stem)")
        plan[dest] = source
    return [(source, dest) for dest, source in plan.items()]


def single_output(input_file: Path, output: Path) -> Path:
    if output.is_dir():
        return output / f"{input_file.stem}.png"
    if output.suffix.lower() not in _SAVE_FORMATS:
        raise OutputPathError(f"--output {output}: give an image file name ending in .png (or "
                              f"{', '.join(sorted(set(_SAVE_FORMATS) - {'.png'}))}), or an existing folder")
    if output.suffix.lower() in (".jpg", ".jpeg"):
        logger.warning("%s: JPEG compression blurs one-pixel edges; .png keeps the edge map exact", output)
    return output


def run_folder(args: argparse.Namespace, input_dir: Path, output_dir: Path) -> int:
    from tqdm import tqdm

    plan = plan_folder(input_dir, output_dir, recursive=args.recursive)
    first_in_folder = {}
    for _, dest in plan:
        first_in_folder.setdefault(dest.parent, dest)
    for dest in first_in_folder.values():  # fail before any work, naming the folder
        check_writable_output(dest)
    todo = [(s, d) for s, d in plan if args.overwrite or not d.exists()]
    skipped = len(plan) - len(todo)
    failed: list[str] = []
    for source, dest in tqdm(todo, desc="canny", unit="image"):
        try:
            image = edge_map(source, args.thres1, args.thres2, l2_gradient=args.l2gradient)
        except ImageError as e:
            failed.append(str(e))
            continue
        try:
            save_image(image, dest)
        except OSError as e:
            raise OutputPathError(f"cannot write {dest} ({e.strerror or e})") from e
    logger.info("wrote %d edge map(s) to %s", len(todo) - len(failed), output_dir)
    if skipped:
        logger.info("skipped %d existing edge map(s); --overwrite recomputes them (e.g. after changing the "
                    "thresholds)", skipped)
    if failed:
        for message in failed:
            print(f"error: {message}", file=sys.stderr)
        print(f"error: {len(failed)} image(s) could not be read; they have no edge map", file=sys.stderr)
        return 1
    return 0


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="an image, or a folder of images")
    p.add_argument("--output", required=True,
                   help="the edge map file (for an image), or the folder for `<stem>.png` edge maps (for a folder)")
    p.add_argument("--thres1", type=int, default=32, help="low hysteresis threshold (cv2.Canny threshold1)")
    p.add_argument("--thres2", type=int, default=224, help="high hysteresis threshold (cv2.Canny threshold2)")
    p.add_argument("--l2gradient", action="store_true",
                   help="gradient magnitude sqrt(dx^2 + dy^2) instead of |dx| + |dy| (cv2.Canny L2gradient)")
    p.add_argument("--recursive", action="store_true", help="folder mode: include subfolders (mirrored in --output)")
    p.add_argument("--overwrite", action="store_true", help="folder mode: recompute edge maps that already exist")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    parser = setup_parser()
    args = parser.parse_args(argv)
    for flag in ("thres1", "thres2"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag} must be >= 0 (got {getattr(args, flag)})")
    input_path, output = Path(args.input), Path(args.output)
    try:
        if input_path.is_dir():
            return run_folder(args, input_path, output)
        if not input_path.is_file():
            raise ValueError(f"--input {input_path}: no such image file or folder")
        dest = check_writable_output(single_output(input_path, output), sources=[input_path])
        save_image(edge_map(input_path, args.thres1, args.thres2, l2_gradient=args.l2gradient), dest)
    except (ImageError, OutputPathError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: cannot write {args.output} ({e.strerror or e})", file=sys.stderr)
        return 1
    logger.info("wrote %s", dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
