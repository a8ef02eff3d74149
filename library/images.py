"""Reading training images: every format and pixel mode users have, into RGB (+ optional alpha mask).

- EXIF orientation is applied (phone photos are stored sideways with a rotation tag);
- palette, grayscale, CMYK, 16-bit and alpha images become 8-bit RGB; transparency is composited onto white
  (what a viewer shows), and the alpha channel is returned separately when `--alpha_mask` wants it;
- zero-byte, truncated, corrupt, non-image and absurdly large files raise `ImageError` naming the file, instead of
  a crash deep inside PIL or, worse, a silently half-grey training image.
"""

from __future__ import annotations

import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# PIL's decompression-bomb guard is 89 MP (warning) / 179 MP (error); 16k x 16k is a generous ceiling for photos.
MAX_PIXELS = 16384 * 16384


class ImageError(ValueError):
    """An image file that cannot be used for training; the message names the file and the problem."""


@dataclass(frozen=True)
class LoadedImage:
    rgb: Image.Image  # mode "RGB", orientation applied
    alpha: np.ndarray | None  # float32 [H, W] in 0..1 when requested and present


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: Path, *, recursive: bool = False) -> list[Path]:
    """The image files in `folder` (and its subfolders with `recursive`), sorted by path."""
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in candidates if p.is_file() and is_image_file(p))


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) after EXIF orientation, reading only the header (PIL decodes a PNG to find its EXIF, so
    a corrupt or truncated PNG fails here, with its name)."""
    with _open(path) as image:
        width, height = image.size
        try:
            orientation = 1 if _png_without_exif(image) else image.getexif().get(0x0112, 1)
        except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
            raise ImageError(f"{path}: the image data is corrupt or truncated ({e}); remove it or copy it "
                             "again") from e
    # Orientations 5-8 rotate by 90 degrees and swap the sides.
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


# PNG chunks after the image data that can hold EXIF (eXIf, or ImageMagick's "Raw profile type exif" text).
_LATE_EXIF_CHUNKS = (b"eXIf", b"tEXt", b"zTXt", b"iTXt")


def _png_without_exif(image: Image.Image) -> bool:
    """A PNG that certainly has no EXIF (so no orientation), found by walking its chunks, each checked against its
    CRC. PIL's getexif() on a PNG decodes the whole image to look for EXIF after the pixel data: tens of ms for a
    large PNG, minutes over a big dataset's first scan; reading the bytes and their CRCs costs a fraction of that
    and still finds a corrupt or truncated file at scan time (OSError, reported with the file's name)."""
    if image.format != "PNG" or "exif" in image.info or "Raw profile type exif" in image.info:
        return False
    fp, start = image.fp, image.fp.tell()
    try:
        fp.seek(8)  # the signature
        while True:
            header = fp.read(8)
            if len(header) < 8:
                raise OSError("the file ends before its IEND chunk")
            length, kind = struct.unpack(">I4s", header)
            data, crc = fp.read(length), fp.read(4)
            if len(data) < length or len(crc) < 4:
                raise OSError(f"the file ends inside its {kind.decode('latin-1')} chunk")
            if zlib.crc32(kind + data) != struct.unpack(">I", crc)[0]:
                raise OSError(f"the {kind.decode('latin-1')} chunk fails its CRC check")
            if kind == b"IEND":
                return True
            if kind in _LATE_EXIF_CHUNKS:
                return False
    finally:
        fp.seek(start)


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise ImageError(f"{path}: no such image file")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: the file is empty (0 bytes); remove it or copy it again")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
    except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError, OSError) as e:
        raise ImageError(f"{path}: not a readable image ({e}); remove it from the dataset or re-save it as "
                         "PNG/JPEG") from e
    if image.size[0] * image.size[1] > MAX_PIXELS:
        raise ImageError(f"{path}: {image.size[0]}x{image.size[1]} is too large to train on; downscale it first "
                         f"to at most {MAX_PIXELS} pixels (width x height) with any image editor, or remove it")
    return image


def load_image(path: Path, *, want_alpha: bool = False) -> LoadedImage:
    with _open(path) as image:
        try:
            image.load()  # decode now, so a truncated file fails here with its name
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"{path}: the image data is corrupt or truncated ({e}); remove it or copy it "
                             "again") from e
        image = ImageOps.exif_transpose(image)
        rgb, alpha = _to_rgb(image)
    return LoadedImage(rgb, alpha if want_alpha else None)


def band_count(path: Path) -> int:
    """How many planes `load_bands` gives for the image, from its header."""
    with _open(path) as image:
        if image.mode in _WIDE_GRAY + ("F",) or image.mode in ("L", "LA", "RGB", "RGBA"):
            return 1 if image.mode in _WIDE_GRAY + ("F",) else len(image.mode)
        return 4 if "A" in image.getbands() or "transparency" in image.info else 3


def load_bands(path: Path) -> list[Image.Image]:
    """The image's channels as separate 8-bit "L" planes (1 to 4), orientation applied; 16-bit grayscale (depth
    maps) scaled to 8 bits. Each plane is resized on its own later: PIL resizes RGBA / LA with premultiplied alpha,
    which would mix an alpha band into the others."""
    with _open(path) as image:
        try:
            image.load()
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"{path}: the image data is corrupt or truncated ({e}); remove it or copy it "
                             "again") from e
        image = ImageOps.exif_transpose(image)
        if image.mode in _WIDE_GRAY + ("F",):
            return [_wide_gray_to_l(image)]
        if image.mode not in ("L", "LA", "RGB", "RGBA"):
            image = image.convert("RGBA" if "A" in image.getbands() or "transparency" in image.info else "RGB")
        return list(image.split())


_WIDE_GRAY = ("I;16", "I;16B", "I;16L", "I")


def _wide_gray_to_l(image: Image.Image) -> Image.Image:
    """16/32-bit grayscale (e.g. depth maps) as 8-bit "L": PIL's convert would clip at 255; scale the real range
    down instead."""
    values = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0  # F: 0..255 or 0..65535
    return Image.fromarray(np.clip(np.round(values / top * 255.0), 0, 255).astype(np.uint8), "L")


def _to_rgb(image: Image.Image) -> tuple[Image.Image, np.ndarray | None]:
    mode = image.mode
    if mode in _WIDE_GRAY:
        return _wide_gray_to_l(image).convert("RGB"), None
    if mode == "P":
        # Palette images may carry transparency in their info; going through RGBA keeps it.
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB"), alpha
    if mode == "CMYK":
        return image.convert("RGB"), None
    return image.convert("RGB"), None
