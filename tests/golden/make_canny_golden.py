"""Make the OpenCV reference edge maps that tests/test_canny.py compares library/canny.py with.

Run once, by hand, with OpenCV importable (it is *not* a dependency of the project; install it out of the way):

    pip install --target /tmp/cv2lib opencv-python-headless      # pulls only numpy
    PYTHONPATH=/tmp/cv2lib python tests/golden/make_canny_golden.py

What it writes under tests/golden/canny/:
- inputs/<name>.png: small synthetic images (shapes, colour gradients with a hard step, noise, blurred noise,
  one-pixel lines and a checkerboard, concentric rings, a palette image, a grayscale image, degenerate 1-row /
  2x2 images), made here with numpy + PIL and stored, so the test does not depend on a random generator's stream;
- <name>_<thres1>_<thres2>[_l2].png: the edge map kohya's tools/canny.py computes for that input, i.e.
  `cv2.Canny(cv2.cvtColor(cv2.imread(input), cv2.COLOR_BGR2GRAY), thres1, thres2, L2gradient=...)`, stored as
  an 8-bit grayscale PNG (0 / 255), exactly what cv2.Canny returned;
- manifest.json: the cases, and the OpenCV version that produced them.

This script must stay independent of library/canny.py: it is the other side of the comparison.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

ROOT = Path(__file__).resolve().parent / "canny"
THRESHOLDS = [(32, 224, False),  # kohya's defaults
              (100, 200, False),  # the ControlNet annotator's defaults
              (10, 50, False),  # low: many weak edges, long hysteresis chains
              (200, 50, False),  # swapped: cv2 takes the smaller as the low threshold
              (32, 224, True),
              (100, 200, True)]


def shapes() -> Image.Image:
    image = Image.new("RGB", (96, 72), (230, 225, 210))
    d = ImageDraw.Draw(image)
    d.ellipse((8, 6, 44, 42), fill=(200, 40, 40))
    d.rectangle((50, 10, 88, 34), fill=(40, 80, 220), outline=(0, 0, 0))
    d.polygon([(20, 66), (48, 40), (76, 66)], fill=(40, 180, 60))
    d.line((0, 70, 95, 44), fill=(120, 120, 0), width=1)
    return image


def gradients() -> Image.Image:
    y, x = np.mgrid[:64, :80].astype(np.float64)
    rgb = np.stack([x * 3.2, y * 4.0, 255 - (x + y) * 1.7], axis=-1)
    rgb[:, 40:] = 255 - rgb[:, 40:] * 0.9  # a vertical step whose height varies along it, across smooth ramps
    return Image.fromarray(np.clip(np.round(rgb), 0, 255).astype(np.uint8), "RGB")


def noise(rng: np.random.Generator) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), "RGB")


def blurred_noise(rng: np.random.Generator) -> Image.Image:
    a = ndimage.gaussian_filter(rng.integers(0, 256, (56, 72, 3)).astype(np.float64), (1.5, 1.5, 0))
    a = (a - a.min()) / (a.max() - a.min()) * 255
    return Image.fromarray(np.round(a).astype(np.uint8), "RGB")


def lines_and_checkers() -> Image.Image:
    a = np.full((60, 60, 3), 250, np.uint8)
    a[5, 2:58] = 0  # one-pixel lines: two equal gradient peaks either side, the tie-breaking rules decide
    a[10:50, 8] = 30
    for i in range(40):
        a[12 + i, 14 + i] = 60  # diagonal line
        a[12 + i, 56 - i] = 90  # anti-diagonal line
    yy, xx = np.mgrid[:20, :20]
    a[38:58, 38:58] = np.where(((yy // 4) + (xx // 4)) % 2 == 0, 20, 235)[..., None]
    return Image.fromarray(a, "RGB")


def rings() -> Image.Image:
    y, x = np.mgrid[:64, :64].astype(np.float64)
    r = np.hypot(x - 30.5, y - 33.2)
    return Image.fromarray(np.round(127.5 + 127.5 * np.sin(r / 2.3)).astype(np.uint8), "L")


def photo_like(rng: np.random.Generator) -> Image.Image:
    # Big enough that OpenCV splits the work into parallel stripes; texture plus shapes, like a real photo.
    a = ndimage.gaussian_filter(rng.normal(128, 40, (160, 192, 3)), (2, 2, 0))
    image = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(image)
    d.ellipse((30, 20, 110, 100), fill=(220, 200, 60))
    d.rectangle((120, 60, 180, 150), fill=(30, 30, 90))
    return image


def inputs() -> dict[str, Image.Image]:
    rng = np.random.default_rng(20240601)
    return {
        "shapes": shapes(),
        "gradients": gradients(),
        "noise": noise(rng),
        "blurred_noise": blurred_noise(rng),
        "lines": lines_and_checkers(),
        "rings_gray": rings(),  # an 8-bit grayscale PNG: cv2.imread makes it BGR, gray comes back unchanged
        "shapes_palette": shapes().quantize(colors=16),  # a palette PNG
        "photo_like": photo_like(rng),
        "one_row": Image.fromarray(rng.integers(0, 256, (1, 17, 3), dtype=np.uint8), "RGB"),
        "two_by_two": Image.fromarray(np.array([[[0, 0, 0], [255, 255, 255]],
                                                [[255, 0, 0], [0, 0, 255]]], np.uint8), "RGB"),
    }


def main() -> None:
    if ROOT.exists():
        shutil.rmtree(ROOT)
    (ROOT / "inputs").mkdir(parents=True)
    cases = []
    for name, image in inputs().items():
        source = ROOT / "inputs" / f"{name}.png"
        image.save(source, optimize=True)
        gray = cv2.cvtColor(cv2.imread(str(source)), cv2.COLOR_BGR2GRAY)  # kohya's tools/canny.py, verbatim
        for thres1, thres2, l2 in THRESHOLDS:
            edges = cv2.Canny(gray, thres1, thres2, L2gradient=l2)
            out = f"{name}_{thres1}_{thres2}{'_l2' if l2 else ''}.png"
            Image.fromarray(edges, "L").save(ROOT / out, optimize=True)
            cases.append({"input": f"inputs/{name}.png", "thres1": thres1, "thres2": thres2, "l2gradient": l2,
                          "expected": out, "edge_pixels": int((edges > 0).sum())})
    manifest = {"made_by": "tests/golden/make_canny_golden.py", "opencv": cv2.__version__, "cases": cases}
    (ROOT / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    size = sum(p.stat().st_size for p in ROOT.rglob("*") if p.is_file())
    print(f"wrote {len(cases)} cases ({size / 1024:.0f} KiB) to {ROOT} with OpenCV {cv2.__version__}")


if __name__ == "__main__":
    main()
