"""tools/resize_images_to_resolution.py: kohya's output names and sizes (worked out by hand from its arithmetic),
pixels checked against box averages computed independently, captions copied byte for byte, bad input named."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tools.resize_images_to_resolution import main, target_size


def blocks(width_blocks: int, height_blocks: int, block: int, seed: int) -> np.ndarray:
    """An RGB image made of block x block squares of one random colour each."""
    colours = np.random.default_rng(seed).integers(0, 256, (height_blocks, width_blocks, 3), dtype=np.uint8)
    return colours.repeat(block, axis=0).repeat(block, axis=1)


@pytest.mark.parametrize("size,max_pixels,divisible,scaled,final", [
    ((100, 60), 64 * 64, 4, (82, 49), (80, 48)),  # sqrt(4096 / 6000) = 0.8262: int(82.6), int(49.6)
    ((100, 60), 32 * 32, 4, (41, 24), (40, 24)),
    ((100, 60), 128 * 128, 8, (100, 60), (96, 56)),  # small enough: only cropped to multiples of 8
    ((60, 100), 64 * 64, 1, (49, 82), (49, 82)),  # portrait keeps its orientation (kohya swaps the sides)
])
def test_kohya_size_arithmetic(size, max_pixels, divisible, scaled, final):
    assert target_size(size, max_pixels, divisible) == (scaled, final)


def test_folder_outputs(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    # 16x8 blocks of 4 px: a 64x32 image; shrinking to 32x16 (area 512) averages exactly each block's 2x2 quarter.
    wide = blocks(16, 8, 4, seed=0)
    Image.fromarray(wide).save(src / "wide.png")
    Image.fromarray(blocks(5, 5, 2, seed=1)).save(src / "small.PNG")  # 10x10: under every limit
    (src / "wide.caption").write_bytes(b"a wide picture\n")
    (src / "wide.txt").write_bytes("tag_a, tag_b\n".encode())
    (src / "notes.md").write_bytes(b"# not an image\n")
    (src / "sub").mkdir()

    assert main([str(src), str(dst), "--max_resolution", "32x16, 16x8", "--divisible_by", "2", "--save_as_png",
                 "--copy_associated_files"]) == 0
    assert sorted(p.name for p in dst.iterdir()) == sorted([
        "notes.md", "small+16x8.png", "small+32x16.png", "wide+16x8.png", "wide+16x8.caption", "wide+16x8.txt",
        "wide+32x16.png", "wide+32x16.caption", "wide+32x16.txt", "wide.caption", "wide.txt"])
    for name in ("wide.caption", "wide+32x16.caption", "wide+16x8.caption"):
        assert (dst / name).read_bytes() == b"a wide picture\n"
    assert (dst / "wide+16x8.txt").read_bytes() == "tag_a, tag_b\n".encode()
    assert (dst / "notes.md").read_bytes() == b"# not an image\n"

    # 64x32 -> 32x16: each output pixel is the mean of a 2x2 area inside one block, i.e. the block's colour
    got = np.asarray(Image.open(dst / "wide+32x16.png"))
    assert got.shape == (16, 32, 3)
    assert np.array_equal(got, wide.reshape(16, 2, 32, 2, 3).mean(axis=(1, 3)).astype(np.uint8))
    # 64x32 -> 16x8: each output pixel is exactly one 4x4 block
    got = np.asarray(Image.open(dst / "wide+16x8.png"))
    assert np.array_equal(got, wide[::4, ::4])
    # 10x10 (100 px) under 32x16 = 512: not scaled; divisible by 2 already, so unchanged. 16x8 = 128: still 100 px.
    for name in ("small+32x16.png", "small+16x8.png"):
        assert np.array_equal(np.asarray(Image.open(dst / name)), blocks(5, 5, 2, seed=1))


def test_jpeg_default_and_divisible_crop(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    Image.new("RGB", (100, 60), (200, 40, 10)).save(src / "a.jpg", quality=100)
    assert main([str(src), str(dst), "--max_resolution", "64x64", "--divisible_by", "4"]) == 0
    out = Image.open(dst / "a+64x64.jpg")
    assert out.format == "JPEG" and out.size == (80, 48)
    assert np.abs(np.asarray(out, dtype=int) - [200, 40, 10]).max() <= 2  # JPEG rounding of one flat colour


def test_bad_input_is_named(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (8, 8)).save(src / "ok.png")
    (src / "broken.png").write_bytes(b"not a png")
    assert main([str(src), str(tmp_path / "o"), "--max_resolution", "512"]) == 1
    assert "--max_resolution '512'" in capsys.readouterr().err
    assert main([str(src), str(src), "--max_resolution", "4x4"]) == 1
    assert "is src_img_folder" in capsys.readouterr().err
    assert main([str(src), str(tmp_path / "o"), "--max_resolution", "4x4", "--divisible_by", "8"]) == 1
    assert "too small" in capsys.readouterr().err
    assert main([str(src), str(tmp_path / "o2"), "--max_resolution", "4x4"]) == 1
    err = capsys.readouterr().err
    assert "1 image(s) could not be read" in err and "broken.png" in err
    assert (tmp_path / "o2" / "ok+4x4.jpg").is_file()  # the others are still written
