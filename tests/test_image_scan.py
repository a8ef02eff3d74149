"""Scanning image folders (library/image_scan.py): kohya's --cache_info file, never used stale; the parallel first
scan equal to the sequential one; PNG sizes read without decoding the pixels."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from library import image_scan
from library.captions import CaptionFileError
from library.image_scan import CACHE_FILE, read_many, scan_folder
from library.images import image_size


def write_images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        size = [(64, 48), (48, 64), (40, 40)][i % 3]
        Image.new("RGB", size, (i * 7 % 256, 20, 90)).save(folder / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
        if i % 4:  # every fourth image has no caption file
            (folder / f"{i:03d}.txt").write_text(f"image {i}\n", encoding="utf-8")


def counting_reads(monkeypatch) -> list[Path]:
    read = []
    original = image_scan.read_one

    def counted(path, caption_extension):
        read.append(path)
        return original(path, caption_extension)
    monkeypatch.setattr(image_scan, "read_one", counted)
    return read


def test_cache_info_reads_a_folder_once_and_keeps_kohyas_fields(tmp_path, monkeypatch):
    write_images(tmp_path / "d", 8)
    first = scan_folder(tmp_path / "d", ".txt", cache_info=True)
    cache = json.loads((tmp_path / "d" / CACHE_FILE).read_text())
    key = os.path.realpath(tmp_path / "d" / "001.png")
    assert cache[key]["resolution"] == [48, 64] and cache[key]["caption"].strip() == "image 1"  # what kohya reads
    read = counting_reads(monkeypatch)
    again = scan_folder(tmp_path / "d", ".txt", cache_info=True)
    assert read == [] and again == first
    assert [info.caption for info in first][:2] == [None, "image 1\n"]  # no caption file: None, as without the cache


def test_a_changed_new_or_removed_file_is_never_answered_from_the_cache(tmp_path, monkeypatch):
    folder = tmp_path / "d"
    write_images(folder, 8)
    scan_folder(folder, ".txt", cache_info=True)
    (folder / "001.txt").write_text("a new caption\n", encoding="utf-8")
    os.utime(folder / "001.txt", ns=(1, 1))  # another time as well as another size
    Image.new("RGB", (32, 96)).save(folder / "002.jpg")  # same name, other size
    (folder / "003.txt").unlink()  # the caption file is gone: class tokens again
    Image.new("RGB", (50, 50)).save(folder / "100.png")  # new image
    (folder / "004.jpg").unlink()
    read = counting_reads(monkeypatch)
    infos = {info.path.name: info for info in scan_folder(folder, ".txt", cache_info=True)}
    assert sorted(p.name for p in read) == ["001.png", "002.jpg", "003.png", "100.png"]
    assert infos["001.png"].caption.strip() == "a new caption" and infos["002.jpg"].size == (32, 96)
    assert infos["003.png"].caption is None and "004.jpg" not in infos and infos["100.png"].size == (50, 50)
    # A caption extension changed between runs reads the other caption files.
    (folder / "005.caption").write_text("from .caption", encoding="utf-8")
    assert {i.path.name: i.caption for i in scan_folder(folder, ".caption", cache_info=True)}["005.png"] == \
        "from .caption"


def test_kohyas_own_cache_file_and_a_damaged_one_are_read_afresh(tmp_path, monkeypatch, caplog):
    folder = tmp_path / "d"
    write_images(folder, 4)
    kohya = {os.path.realpath(folder / "000.jpg"): {"caption": "stale caption", "resolution": [999, 999]}}
    (folder / CACHE_FILE).write_text(json.dumps(kohya))
    infos = scan_folder(folder, ".txt", cache_info=True)
    assert infos[0].size == (64, 48) and infos[0].caption is None  # no fingerprints: not trusted
    assert "image" in json.loads((folder / CACHE_FILE).read_text())[os.path.realpath(folder / "000.jpg")]
    (folder / CACHE_FILE).write_text("{not json")
    read = counting_reads(monkeypatch)
    assert scan_folder(folder, ".txt", cache_info=True) == infos and len(read) == 4
    assert "unreadable" in caplog.text


def test_without_cache_info_nothing_is_written(tmp_path):
    write_images(tmp_path / "d", 3)
    scan_folder(tmp_path / "d", ".txt")
    assert not (tmp_path / "d" / CACHE_FILE).exists()


def test_the_parallel_scan_equals_the_sequential_one(tmp_path, monkeypatch):
    folder = tmp_path / "d"
    write_images(folder, 12)
    (folder / "005.png").write_bytes(b"not an image")
    paths = image_scan.list_image_files(folder)
    monkeypatch.setattr(image_scan, "PARALLEL_FROM", 1)
    sequential, parallel = read_many(paths, ".txt", workers=1), read_many(paths, ".txt", workers=2)
    assert parallel == sequential
    assert [i.problem is not None for i in parallel].count(True) == 1 and "005.png" in parallel[5].problem
    (folder / "007.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(CaptionFileError, match="007.txt"):
        read_many(paths, ".txt", workers=2)


def test_png_sizes_are_read_without_decoding_the_pixels(tmp_path, monkeypatch):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the sides swap
    Image.new("RGB", (40, 20)).save(tmp_path / "plain.png")
    Image.new("RGB", (40, 20)).save(tmp_path / "early.png", exif=exif.tobytes())
    # An eXIf chunk after the pixel data (allowed by the PNG spec): only found by walking the chunks.
    data = (tmp_path / "early.png").read_bytes()
    chunks, pos = [], 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunks.append((kind, data[pos:pos + 12 + length]))
        pos += 12 + length
    order = [b"IHDR", b"IDAT", b"eXIf", b"IEND"]
    (tmp_path / "late.png").write_bytes(data[:8] + b"".join(c for k in order for kind, c in chunks if kind == k))
    assert image_size(tmp_path / "early.png") == image_size(tmp_path / "late.png") == (20, 40)

    def no_decoding(self):
        raise AssertionError("decoded")
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert image_size(tmp_path / "plain.png") == (40, 20)
    with pytest.raises(AssertionError, match="decoded"):  # the late eXIf needs PIL's full read, as before
        image_size(tmp_path / "late.png")


def test_cache_info_is_a_flag_and_a_dataset_config_key(tmp_path):
    from library.dataset_config import build_training_dataset

    write_images(tmp_path / "data" / "1_sks", 3)
    (tmp_path / "data.toml").write_text(
        f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{tmp_path / 'data' / '1_sks'}'\n"
        "cache_info = true\ncaption_extension = '.txt'\n")
    cli = {"batch_size": 1, "resolution": (64, 64)}
    build_training_dataset(cli, tmp_path / "data.toml", family_step=8, seed=0, prior_loss_weight=1.0,
                           max_train_steps=0)
    assert (tmp_path / "data" / "1_sks" / CACHE_FILE).is_file()
