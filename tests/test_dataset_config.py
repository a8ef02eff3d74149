"""Dataset sources beyond DreamBooth folders: the kohya dataset TOML, fine-tune metadata JSON/JSONL, and
diffusers imagefolder metadata; and batching over several datasets."""

from __future__ import annotations

import json
import logging

import pytest
from PIL import Image

from library.dataset_config import (DatasetConfigError, build_groups, load_dataset_config, specs_from_config,
                                    specs_from_flags)
from library.dataset_sources import DatasetError
from library.train_dataset import EpochBatches, TrainingDataset

CLI = {"batch_size": 1, "resolution": (64, 64), "enable_bucket": False, "min_bucket_reso": 256,
       "max_bucket_reso": 1024, "bucket_reso_steps": 64, "bucket_no_upscale": False, "caption_extension": ".caption",
       "train_data_dir": None, "reg_data_dir": None, "in_json": None, "dataset_repeats": 1}


def images(folder, names, size=(64, 64)):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", size, (100, 50, 20)).save(folder / name)
    return folder


def write_toml(tmp_path, text):
    path = tmp_path / "dataset.toml"
    path.write_text(text)
    return path


def test_toml_levels_and_precedence(tmp_path):
    images(tmp_path / "a", ["1.png", "2.png"])
    images(tmp_path / "b", ["3.png"], size=(96, 64))
    (tmp_path / "a" / "1.caption").write_text("one")
    path = write_toml(tmp_path, """
[general]
shuffle_caption = true
keep_tokens = 1
caption_extension = ".caption"

[[datasets]]
resolution = 64
batch_size = 2

  [[datasets.subsets]]
  image_dir = "a"
  num_repeats = 3
  class_tokens = "sks thing"
  keep_tokens = 2

[[datasets]]
resolution = [96, 64]
batch_size = 1
enable_bucket = true
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 32

  [[datasets.subsets]]
  image_dir = "b"
  flip_aug = true
""")
    specs = specs_from_config(load_dataset_config(path), CLI, tmp_path)
    assert [s.batch_size for s in specs] == [2, 1]
    a, b = specs[0].subsets[0], specs[1].subsets[0]
    assert (a.num_repeats, a.class_tokens, a.caption.keep_tokens, a.caption.shuffle_caption) == (3, "sks thing", 2, True)
    assert (b.caption.keep_tokens, b.flip_aug, b.image_dir) == (1, True, tmp_path / "b")
    assert specs[1].buckets.resolution == (96, 64) and specs[1].buckets.enable_bucket
    groups, summary = build_groups(specs, family_step=64)
    records = {r.path.name: r for g in groups for r, _ in g.records_with_repeats}
    assert records["1.png"].caption == "one" and records["2.png"].caption == "sks thing"
    assert summary["num_train_images"] == 3 and len(summary["datasets"]) == 2

    dataset = TrainingDataset(groups, seed=0)
    batches = EpochBatches(dataset, 0)
    epoch = batches.batches(1)
    seen = sorted(i for batch in epoch for i, _ in batch)
    assert seen == list(range(len(dataset)))  # 6 items of dataset 0 (2 images x 3) + 1 of dataset 1
    for batch in epoch:
        groups_in_batch = {dataset.items[i].group for i, _ in batch}
        assert len(groups_in_batch) == 1
        assert len(batch) <= (2 if groups_in_batch == {0} else 1)


@pytest.mark.parametrize("text,message", [
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\nkeep_tokenz = 1\n", r"datasets\[0\].subsets\[0\].keep_tokenz: unknown"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\nbatch_size = 2\n", r"belongs in \[\[datasets\]\]"),
    ("[[datasets]]\nimage_dir = 'a'\n[[datasets.subsets]]\nimage_dir = 'a'\n", r"belongs in \[\[datasets.subsets\]\]"),
    ("[[datasets]]\nbatch_size = 'two'\n[[datasets.subsets]]\nimage_dir = 'a'\n", r"batch_size = 'two': expected int"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\nflip_aug = 'yes'\n", "flip_aug = 'yes': expected bool"),
    ("[[datasets]]\nnetwork_multiplier = 0.5\n[[datasets.subsets]]\nimage_dir = 'a'\n", "network_multiplier: not implemented"),
    ("[general]\nresize_interpolation = 'cubicle'\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\n",
     "subsets.0.\\.resize_interpolation 'cubicle': use one of lanczos, nearest"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\n[[datasets.subsets]]\nmetadata_file = 'm.json'\n", "mixes fine-tune"),
    ("[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 2\n", "needs image_dir"),
    ("[[datasets]]\n", r"no \[\[datasets.subsets\]\]"),
    ("[general]\n", r"no \[\[datasets\]\]"),
    ("[datasets.sample]\nx = 1\n", "expected a table"),
    ("datasets = [\n", "invalid TOML"),
])
def test_toml_errors_name_the_key(tmp_path, text, message):
    path = write_toml(tmp_path, text)
    with pytest.raises(DatasetConfigError, match=message):
        specs_from_config(load_dataset_config(path), CLI, tmp_path)


def test_finetune_metadata_json_and_jsonl(tmp_path, caplog):
    folder = images(tmp_path / "imgs", ["cat.png", "dog.jpg", "extra.png"])
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"cat": {"caption": "a cat", "tags": "animal, cute"},
                                str(folder / "dog.jpg"): {"tags": "dog"}}))
    cli = dict(CLI, train_data_dir=str(folder), in_json=str(meta), dataset_repeats=2)
    with caplog.at_level(logging.WARNING):
        groups, _ = build_groups(specs_from_flags(cli), family_step=64)
    captions = {r.path.name: (r.caption, n) for r, n in groups[0].records_with_repeats}
    assert captions == {"cat.png": ("a cat, animal, cute", 2), "dog.jpg": ("dog", 2)}
    assert "extra.png" in caplog.text and "no metadata entry" in caplog.text

    lines = tmp_path / "meta.jsonl"
    lines.write_text('{"image_path": "cat.png", "caption": "a cat"}\n\n{"image_path": "dog", "caption": "a dog"}\n')
    groups, _ = build_groups(specs_from_flags(dict(cli, in_json=str(lines))), family_step=64)
    assert sorted(r.caption for r, _ in groups[0].records_with_repeats) == ["a cat", "a dog"]


def test_metadata_problems_are_reported(tmp_path):
    folder = images(tmp_path / "imgs", ["cat.png"])
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"cat": {"caption": "a"}, "ghost1": {"caption": "b"}, "ghost2": {"caption": "c"}}))
    cli = dict(CLI, train_data_dir=str(folder), in_json=str(meta))
    with pytest.raises(DatasetError, match="2 of 3 entries match no image.*ghost1, ghost2"):
        build_groups(specs_from_flags(cli), family_step=64)
    meta.write_text('{"cat": {"caption": "a"},\n "dog": }')
    with pytest.raises(DatasetError, match="invalid JSON at line 2 column"):
        build_groups(specs_from_flags(cli), family_step=64)
    lines = tmp_path / "m.jsonl"
    lines.write_text('{"image_path": "cat.png", "caption": "a"}\n{"image_path": oops}\n')
    with pytest.raises(DatasetError, match="line 2"):
        build_groups(specs_from_flags(dict(cli, in_json=str(lines))), family_step=64)


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_diffusers_imagefolder(tmp_path, kind):
    folder = images(tmp_path / "data", ["0001.png", "0002.png"])
    if kind == "jsonl":
        (folder / "metadata.jsonl").write_text('{"file_name": "0001.png", "text": "first"}\n'
                                               '{"file_name": "0002.png", "text": "second"}\n')
    else:
        (folder / "metadata.csv").write_text("file_name,text\n0001.png,first\n0002.png,second\n")
    groups, _ = build_groups(specs_from_flags(dict(CLI, train_data_dir=str(folder))), family_step=64)
    assert sorted(r.caption for r, _ in groups[0].records_with_repeats) == ["first", "second"]
    with pytest.raises(DatasetError, match="no caption column.*'prompt'.*file_name"):
        build_groups(specs_from_flags(dict(CLI, train_data_dir=str(folder), caption_column="prompt")),
                     family_step=64)


def test_caption_files_with_another_extension_are_named(tmp_path, caplog):
    """Images without a --caption_extension file train on the class tokens (kohya), but .txt captions beside them
    are almost always a wrong --caption_extension: one warning names both extensions and the fix."""
    from library.dataset_sources import Subset, scan_subset

    folder = images(tmp_path / "2_sks dog", ["a.png", "b.png", "c.png"])
    (folder / "a.txt").write_text("a dog on grass")
    (folder / "b.txt").write_text("a dog in snow")
    with caplog.at_level(logging.WARNING):
        records, _ = scan_subset(Subset(image_dir=folder, class_tokens="sks dog", caption_extension=".caption"))
    assert [r.caption for r in records] == ["sks dog"] * 3  # kohya's fallback, kept
    mismatch = [r.getMessage() for r in caplog.records if "NOT read" in r.getMessage()]
    assert len(mismatch) == 1
    assert "2 of these image(s) have a .txt file" in mismatch[0] and "from .caption files only" in mismatch[0]
    assert "--caption_extension .txt" in mismatch[0]

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        records, _ = scan_subset(Subset(image_dir=folder, class_tokens="sks dog", caption_extension=".txt"))
    assert [r.caption for r in records] == ["a dog on grass", "a dog in snow", "sks dog"]
    assert "NOT read" not in caplog.text  # c.png simply has no caption: the usual warning only
