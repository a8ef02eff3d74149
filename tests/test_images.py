"""Image reading: pixel modes, EXIF orientation, alpha masks, and clear errors for bad files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from library import images
from library.images import ImageError, image_size, load_image


def save(tmp_path, name, image, **kw):
    path = tmp_path / name
    image.save(path, **kw)
    return path


def test_rgba_is_composited_on_white_and_alpha_returned(tmp_path):
    rgba = Image.new("RGBA", (4, 2), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    loaded = load_image(save(tmp_path, "a.png", rgba), want_alpha=True)
    pixels = np.asarray(loaded.rgb)
    assert tuple(pixels[0, 0]) == (255, 0, 0) and tuple(pixels[0, 1]) == (255, 255, 255)
    assert loaded.alpha.shape == (2, 4) and loaded.alpha[0, 0] == 1.0 and loaded.alpha[0, 1] == 0.0
    assert load_image(save(tmp_path, "a2.png", rgba)).alpha is None


def test_palette_with_transparency_keeps_it(tmp_path):
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    p.putpixel((1, 0), 1)
    path = save(tmp_path, "p.png", p, transparency=0)
    loaded = load_image(path, want_alpha=True)
    assert tuple(np.asarray(loaded.rgb)[0, 1]) == (0, 255, 0)
    assert loaded.alpha.tolist() == [[0.0, 1.0]]


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    data = np.array([[0, 32768, 65535]], dtype=np.uint16)
    path = save(tmp_path, "g16.png", Image.fromarray(data))
    rgb = np.asarray(load_image(path).rgb)
    assert rgb[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize("mode,fmt,name", [("L", "PNG", "l.png"), ("CMYK", "JPEG", "c.jpg"), ("RGB", "WEBP", "w.webp"),
                                           ("RGB", "BMP", "b.bmp")])
def test_other_modes_and_formats_become_rgb(tmp_path, mode, fmt, name):
    path = save(tmp_path, name, Image.new(mode, (5, 3)), format=fmt)
    assert load_image(path).rgb.mode == "RGB" and load_image(path).rgb.size == (5, 3)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (6, 2), (0, 0, 0))
    image.putpixel((0, 0), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    path = save(tmp_path, "r.jpg", image, exif=exif, quality=100)
    loaded = load_image(path).rgb
    assert loaded.size == (2, 6) and image_size(path) == (2, 6)
    assert np.asarray(loaded)[0, 1].mean() > 200  # the white corner moved to the top right


def test_bad_files_raise_with_the_file_name(tmp_path, monkeypatch):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(buffer, "PNG")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    for path, words in [(empty, "empty"), (text, "not a readable image"), (truncated, "truncated"),
                        (tmp_path / "missing.png", "no such")]:
        with pytest.raises(ImageError, match=words) as info:
            load_image(path)
        assert path.name in str(info.value)
    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    big = save(tmp_path, "big.png", Image.new("RGB", (20, 20)))
    with pytest.raises(ImageError, match="too large"):
        load_image(big)


def test_color_augmentation_is_small_seeded_and_sometimes_identity():
    import random

    from library.train_dataset import color_augment

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8), "RGB")
    outcomes = [color_augment(image, random.Random(seed)) for seed in range(300)]
    unchanged = sum(np.array_equal(np.asarray(o), np.asarray(image)) for o in outcomes)
    assert 150 < unchanged < 250  # about 2/3 of the time nothing happens
    changed = [np.asarray(o, dtype=np.int16) - np.asarray(image, dtype=np.int16) for o in outcomes
               if not np.array_equal(np.asarray(o), np.asarray(image))]
    assert changed and all(np.abs(d).mean() < 40 for d in changed)  # a mild change, never a wreck
    assert np.array_equal(np.asarray(color_augment(image, random.Random(7))),
                          np.asarray(color_augment(image, random.Random(7))))
    white = Image.new("RGB", (4, 4), (255, 255, 255))
    assert all(np.asarray(color_augment(white, random.Random(s))).min() >= 250 for s in range(50))  # no clipping
