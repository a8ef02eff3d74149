"""Write a small synthetic DreamBooth-style dataset (coloured shapes with captions) for trying the trainers
without any download.

    python tools/make_synthetic_dataset.py out/data --images 8 --size 64

Creates `out/data/<repeats>_<class tokens>/NNN.png` + `NNN.caption` (and, with --reg, `out/data_reg/1_shape/`;
with --masks / --depth_maps / --edge_maps DIR, same-stem companions for inpainting, depth and extra-channel models).
Images are deterministic for a given --seed; sizes vary a little so that bucketing has work to do.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")


def draw(rng: random.Random, width: int, height: int) -> tuple[Image.Image, str]:
    image, caption, _ = draw_with_silhouette(rng, width, height)
    return image, caption


def draw_with_silhouette(rng: random.Random, width: int, height: int) -> tuple[Image.Image, str, Image.Image]:
    """The image, its caption, and the shape's silhouette ("L", white on black) for same-stem companions."""
    colour = rng.choice(list(COLOURS))
    shape = rng.choice(SHAPES)
    background = tuple(rng.randint(200, 255) for _ in range(3))
    image = Image.new("RGB", (width, height), background)
    silhouette = Image.new("L", (width, height), 0)
    s = min(width, height)
    x0, y0 = rng.randint(0, width - s // 2), rng.randint(0, height - s // 2)
    box = (x0, y0, x0 + s // 2, y0 + s // 2)
    for d, fill in ((ImageDraw.Draw(image), COLOURS[colour]), (ImageDraw.Draw(silhouette), 255)):
        if shape == "circle":
            d.ellipse(box, fill=fill)
        elif shape == "square":
            d.rectangle(box, fill=fill)
        else:
            d.polygon([(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=fill)
    return image, f"{colour} {shape}, simple background", silhouette


def depth_map(silhouette: Image.Image) -> Image.Image:
    """A depth map as MiDaS draws them (brighter is nearer): the floor recedes towards the top, the shape stands in
    front of it."""
    width, height = silhouette.size
    ramp = Image.linear_gradient("L").resize((width, height)).point(lambda v: 40 + v * 100 // 255)
    return Image.composite(Image.new("L", (width, height), 230), ramp, silhouette)


def edge_map(silhouette: Image.Image) -> Image.Image:
    """The shape's outline, white on black (a one-channel condition like a Canny map)."""
    return silhouette.filter(ImageFilter.FIND_EDGES)


# --masks / --depth_maps / --edge_maps: same-stem companions for inpainting, depth and extra-channel models
COMPANIONS = {"masks": lambda silhouette: silhouette, "depth_maps": depth_map, "edge_maps": edge_map}


def write_dataset(root: Path, *, images: int, size: int, seed: int, folder: str = "10_sks shape",
                  prefix: str = "sks shape, ", imagefolder: bool = False,
                  companions: dict[str, Path] | None = None) -> Path:
    """`imagefolder`: captions in a `metadata.jsonl` (file_name, text), the layout of a local Hugging Face
    imagefolder dataset, instead of one `.caption` file per image. `companions`: kind ("masks", "depth_maps",
    "edge_maps") -> folder for same-stem companion images drawn from each image's shape."""
    rng = random.Random(seed)
    target = root / folder
    target.mkdir(parents=True, exist_ok=True)
    for kind, companion_dir in (companions or {}).items():
        companion_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(images):
        # Mostly square, some landscape / portrait, so aspect-ratio bucketing has something to do.
        w, h = rng.choice([(size, size), (size, size), (size * 3 // 2, size), (size, size * 3 // 2)])
        image, caption, silhouette = draw_with_silhouette(rng, w, h)
        image.save(target / f"{i:03d}.png")
        for kind, companion_dir in (companions or {}).items():
            COMPANIONS[kind](silhouette).save(companion_dir / f"{i:03d}.png")
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
    for kind, what in (("masks", "inpainting masks (white: the shape, to repaint)"),
                       ("depth_maps", "depth maps (brighter: nearer)"),
                       ("edge_maps", "one-channel edge maps (the shape's outline), a condition for an extra channel")):
        p.add_argument(f"--{kind}", type=Path, default=None, metavar="DIR",
                       help=f"also write same-stem {what} to DIR (use it as --conditioning_data_dir)")
    args = p.parse_args(argv)
    companions = {kind: getattr(args, kind) for kind in COMPANIONS if getattr(args, kind)}
    folder = write_dataset(Path(args.output), images=args.images, size=args.size, seed=args.seed,
                           folder=args.folder, prefix=args.caption_prefix, imagefolder=args.imagefolder,
                           companions=companions)
    print(f"wrote {args.images} images to {folder}"
          + "".join(f"; {kind.replace('_', ' ')} to {path}" for kind, path in companions.items()))
    if args.reg:
        reg = write_dataset(Path(str(args.output) + "_reg"), images=args.images, size=args.size, seed=args.seed + 1,
                            folder="1_shape", prefix="shape, ")
        print(f"wrote {args.images} regularisation images to {reg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
