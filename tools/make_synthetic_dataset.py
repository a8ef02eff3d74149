"""Write a small synthetic DreamBooth-style dataset (coloured shapes with captions) for trying the trainers
without any download.

    python tools/make_synthetic_dataset.py out/data --images 8 --size 64

Creates `out/data/<repeats>_<class tokens>/NNN.png` + `NNN.caption` (and, with --reg, `out/data_reg/1_shape/`).
Images are deterministic for a given --seed; sizes vary a little so that bucketing has work to do.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")


def draw(rng: random.Random, width: int, height: int) -> tuple[Image.Image, str]:
    colour = rng.choice(list(COLOURS))
    shape = rng.choice(SHAPES)
    background = tuple(rng.randint(200, 255) for _ in range(3))
    image = Image.new("RGB", (width, height), background)
    d = ImageDraw.Draw(image)
    s = min(width, height)
    x0, y0 = rng.randint(0, width - s // 2), rng.randint(0, height - s // 2)
    box = (x0, y0, x0 + s // 2, y0 + s // 2)
    if shape == "circle":
        d.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        d.rectangle(box, fill=COLOURS[colour])
    else:
        d.polygon([(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=COLOURS[colour])
    return image, f"{colour} {shape}, simple background"


def write_dataset(root: Path, *, images: int, size: int, seed: int, folder: str = "10_sks shape",
                  prefix: str = "sks shape, ", imagefolder: bool = False) -> Path:
    """`imagefolder`: captions in a `metadata.jsonl` (file_name, text), the layout of a local Hugging Face
    imagefolder dataset, instead of one `.caption` file per image."""
    rng = random.Random(seed)
    target = root / folder
    target.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(images):
        # Mostly square, some landscape / portrait, so aspect-ratio bucketing has something to do.
        w, h = rng.choice([(size, size), (size, size), (size * 3 // 2, size), (size, size * 3 // 2)])
        image, caption = draw(rng, w, h)
        image.save(target / f"{i:03d}.png")
        if imagefolder:
            rows.append(json.dumps({"file_name": f"{i:03d}.png", "text": prefix + caption}))
        else:
            (target / f"{i:03d}.caption").write_text(prefix + caption + "\n", encoding="utf-8")
    if imagefolder:
        (target / "metadata.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", help="dataset parent folder (becomes --train_data_dir)")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reg", action="store_true",
                   help="also write regularisation images to <output>_reg/1_shape (captioned 'shape, <colour> "
                        "<shape>, ...' like the training images; use it as --reg_data_dir)")
    p.add_argument("--folder", default="10_sks shape",
                   help="the image folder inside OUTPUT (default: kohya's '<repeats>_<class>' name '10_sks shape')")
    p.add_argument("--caption_prefix", default="sks shape, ", help="the start of every caption")
    p.add_argument("--imagefolder", action="store_true",
                   help="captions in OUTPUT/FOLDER/metadata.jsonl (a local Hugging Face imagefolder dataset) instead "
                        "of .caption files")
    args = p.parse_args(argv)
    folder = write_dataset(Path(args.output), images=args.images, size=args.size, seed=args.seed,
                           folder=args.folder, prefix=args.caption_prefix, imagefolder=args.imagefolder)
    print(f"wrote {args.images} images to {folder}")
    if args.reg:
        reg = write_dataset(Path(str(args.output) + "_reg"), images=args.images, size=args.size, seed=args.seed + 1,
                            folder="1_shape", prefix="shape, ")
        print(f"wrote {args.images} regularisation images to {reg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
