"""The finetune/ dataset-preparation tools: exact metadata files from small folders, kohya's clean-up rules case by
case, and prepare_buckets_latents writing latents that the trainer's latent cache loads bit for bit (and recomputes
once an image changes)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from finetune import (clean_captions_and_tags, merge_captions_to_metadata, merge_dd_tags_to_metadata,
                      prepare_buckets_latents)
from library.caption_cleanup import clean_caption, clean_tags
from library.latent_cache import LatentCache
from library.metadata_files import read_metadata

REPO = Path(__file__).resolve().parent.parent


def images(folder: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, size) in enumerate(sizes.items()):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (40 * i, 200 - 30 * i, 90)).save(folder / name)
    return folder


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def as_file(metadata: dict) -> str:
    """What the tools write: sorted keys, indent 2, UTF-8 characters, final newline."""
    return json.dumps(metadata, indent=2, ensure_ascii=False, sort_keys=True) + "\n"


# ----------------------------------------------------------------------------------------------------------
# merge_captions_to_metadata / merge_dd_tags_to_metadata


def test_merge_captions_then_tags(tmp_path, caplog):
    folder = images(tmp_path / "imgs", {"a.png": (8, 8), "b.jpg": (8, 8), "c.png": (8, 8)})
    write(folder / "a.caption", "a café\n")
    write(folder / "b.caption", "  a dog \nsecond line\n")
    write(folder / "a.txt", "x, y\n")
    write(folder / "c.txt", "z")
    out = tmp_path / "meta.json"
    with caplog.at_level(logging.WARNING):
        assert merge_captions_to_metadata.main([str(folder), str(out)]) == 0
    assert out.read_text(encoding="utf-8") == ('{\n  "a": {\n    "caption": "a café"\n  },\n'
                                               '  "b": {\n    "caption": "a dog \\nsecond line"\n  }\n}\n')
    assert "1 of 3 image(s) have no .caption file" in caplog.text and "c.png" in caplog.text

    # no --in_json: an existing out_json is merged into (kohya); captions stay, tags are added
    assert merge_dd_tags_to_metadata.main([str(folder), str(out)]) == 0
    assert read_metadata(out) == {"a": {"caption": "a café", "tags": "x, y"}, "b": {"caption": "a dog \nsecond line"},
                                  "c": {"tags": "z"}}


def test_merge_into_in_json_keeps_other_fields(tmp_path):
    folder = images(tmp_path / "imgs", {"a.png": (8, 8), "sub/d.webp": (8, 8)})
    write(folder / "a.cap", "new caption")
    write(folder / "sub" / "d.cap", "in a subfolder")
    existing = write(tmp_path / "old.json", json.dumps({"a": {"caption": "old", "image_size": [8, 8]},
                                                        "gone": {"tags": "kept as it was"}}))
    out = tmp_path / "new.json"
    # kohya's misspelt --caption_extention still works; a missing leading dot is added
    assert merge_captions_to_metadata.main([str(folder), str(out), "--in_json", str(existing),
                                            "--caption_extention", "cap"]) == 0
    assert out.read_text(encoding="utf-8") == as_file({"a": {"caption": "new caption", "image_size": [8, 8]},
                                                       "gone": {"tags": "kept as it was"}})
    assert json.loads(existing.read_text())["a"]["caption"] == "old"  # the input is not touched

    full = tmp_path / "full.json"
    assert merge_captions_to_metadata.main([str(folder), str(full), "--caption_extension", ".cap", "--full_path",
                                            "--recursive"]) == 0
    assert read_metadata(full) == {str(folder / "a.png"): {"caption": "new caption"},
                                   str(folder / "sub" / "d.webp"): {"caption": "in a subfolder"}}

    lines = tmp_path / "new.jsonl"  # JSON Lines when the name says so, read back by the trainer's reader
    assert merge_captions_to_metadata.main([str(folder), str(lines), "--in_json", str(out)]) == 0
    assert lines.read_text(encoding="utf-8") == ('{"image_path": "a", "caption": "new caption", "image_size": [8, 8]}\n'
                                                 '{"image_path": "gone", "tags": "kept as it was"}\n')


def test_merge_errors_name_the_problem(tmp_path, capsys):
    folder = images(tmp_path / "imgs", {"a.png": (8, 8), "a.jpg": (8, 8)})
    out = tmp_path / "out.json"

    def error(argv, tool=merge_captions_to_metadata):
        assert tool.main([str(a) for a in argv]) == 1
        assert not out.exists()
        return capsys.readouterr().err

    assert "no such folder" in error([tmp_path / "nope", out])
    assert "--recursive needs --full_path" in error([folder, out, "--recursive"])
    assert "same metadata key 'a'" in error([folder, out]) and "--full_path" in error([folder, out])
    assert "--in_json" in error([folder, out, "--in_json", tmp_path / "missing.json"])
    bad = write(tmp_path / "bad.json", '{"a": {"caption": "x"},\n "b": }')
    assert f"{bad}: invalid JSON at line 2 column" in error([folder, out, "--in_json", bad])
    (folder / "a.jpg").unlink()
    (folder / "a.txt").write_bytes(b"caf\xe9")  # Latin-1, not UTF-8
    message = error([folder, out], merge_dd_tags_to_metadata)
    assert "a.txt is not UTF-8" in message
    assert "no images" in error([images(tmp_path / "empty", {}), out])


def test_merge_that_finds_no_text_file_is_an_error(tmp_path, capsys, caplog):
    """Nothing to merge is an error (no output written), naming the caption files that do exist."""
    folder = images(tmp_path / "imgs", {"a.png": (8, 8), "b.png": (8, 8), "c.png": (8, 8)})
    write(folder / "a.caption", "a red shape")
    write(folder / "b.caption", "a blue shape")
    out = tmp_path / "meta.json"
    for tool, argv in ((merge_captions_to_metadata, ["--caption_extension", ".txt"]), (merge_dd_tags_to_metadata, [])):
        assert tool.main([str(folder), str(out)] + argv) == 1
        err = capsys.readouterr().err
        assert "none of the 3 image(s) has a .txt file" in err
        assert "found 2 .caption file(s): pass --caption_extension .caption" in err and not out.exists()
    bare = images(tmp_path / "bare", {"a.png": (8, 8)})  # no text file at all: say how they must be named
    assert merge_captions_to_metadata.main([str(bare), str(out), "--caption_extension", "tags"]) == 1
    assert "e.g. a.tags for a.png" in capsys.readouterr().err and not out.exists()
    assert merge_captions_to_metadata.main([str(folder), str(out)]) == 0  # the right extension: merged
    assert read_metadata(out) == {"a": {"caption": "a red shape"}, "b": {"caption": "a blue shape"}}
    # Into existing metadata the output is not empty: written unchanged, with the same hint as a warning.
    tagged = tmp_path / "tagged.jsonl"
    with caplog.at_level(logging.WARNING):
        assert merge_dd_tags_to_metadata.main([str(folder), str(tagged), "--in_json", str(out)]) == 0
    assert read_metadata(tagged) == read_metadata(out)
    assert "found 2 .caption file(s): pass --caption_extension .caption" in caplog.text


# ----------------------------------------------------------------------------------------------------------
# clean_captions_and_tags


@pytest.mark.parametrize("tags, cleaned", [
    ("long_hair, ^_^, >_<", "long hair, ^_^, >_<"),  # "_" -> " ", but kaomoji keep theirs
    ("1girl, smile, rating:explicit", "1girl, smile"),  # DeepDanbooru's rating (last, as it writes it)
    ("rating:safe, 1girl, smile", "1girl, smile"),  # a rating anywhere goes; the tags after it stay
    ("2girls, blue eyes, red eyes, smile", "2girls, smile"),  # two eye colours, two people: whose is whose?
    ("1girl, blue eyes, red eyes", "1girl, blue eyes, red eyes"),  # one person (heterochromia): kept
    ("2girls, blue eyes, smile", "2girls, blue eyes, smile"),  # one value in its group: kept
    ("multiple girls, long hair, blonde hair, brown hair", "multiple girls, long hair"),  # colours go, length stays
    ("2boys, long hair, short hair, black hair", "2boys, black hair"),  # two lengths go, one colour stays
    ("3girls, long sleeves, sleeveless", "3girls"),
    ("2girls, bob cut, hime cut", "2girls"),
    ("2girls, ponytail, twintails, side braid", "2girls"),  # hairstyles
    ("shirt, white shirt, skirt", "white shirt, skirt"),  # the bare tag a specific one repeats
    ("hair ornament, star hair ornament", "star hair ornament"),
    ("shirt, off-shoulder shirt", "shirt, off-shoulder shirt"),  # a hyphenated word is no specific form (kohya)
    ("a,b ,, c", "a, b, c"),  # separators normalised, empty tags dropped
])
def test_clean_tags(tags, cleaned):
    assert clean_tags(tags) == cleaned


@pytest.mark.parametrize("caption, cleaned", [
    ("a young anime woman standing", "a girl standing"),
    ("two cartoon characters and females", "two girls and girls"),  # a plural "s" follows its word
    ("a cartoon drawing of people", "a drawing of girls"),
    ("anime girl girl", "girl"),  # each rule runs until nothing changes
    ("a ladybug on a personal computer", "a ladybug on a personal computer"),  # whole words only (kohya: "girlbug")
    ("A Woman", "A Woman"),  # case-sensitive, as kohya
])
def test_clean_caption(caption, cleaned):
    assert clean_caption(caption) == cleaned


def test_clean_script(tmp_path, capsys):
    source = {"a": {"caption": "a cartoon woman", "tags": "1girl, long_hair", "image_size": [8, 8]},
              "b": {"tags": "rating:safe, solo"}, "c": {"caption": "a cat"}}
    meta = write(tmp_path / "meta.json", json.dumps(source))
    expected = as_file({"a": {"caption": "a girl", "tags": "1girl, long hair", "image_size": [8, 8]},
                        "b": {"tags": "solo"}, "c": {"caption": "a cat"}})
    assert clean_captions_and_tags.main([str(meta), str(tmp_path / "two.json")]) == 0
    assert (tmp_path / "two.json").read_text(encoding="utf-8") == expected
    assert clean_captions_and_tags.main([str(tmp_path), str(meta), str(meta)]) == 0  # kohya's 3-argument form,
    assert meta.read_text(encoding="utf-8") == expected  # in place
    assert clean_captions_and_tags.main([str(tmp_path / "missing.json"), str(tmp_path / "x.json")]) == 1
    assert "missing.json: no such metadata file" in capsys.readouterr().err
    write(meta, '{"a": "a caption, not an entry"}')
    assert clean_captions_and_tags.main([str(meta), str(tmp_path / "x.json")]) == 1
    assert "needs an object" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


# ----------------------------------------------------------------------------------------------------------
# prepare_buckets_latents + the trainer's latent cache


BUCKET_FLAGS = ["--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "16"]


@pytest.fixture(scope="module")
def sd1_file(tiny_checkpoints, tmp_path_factory):
    from library.checkpoint_writer import SaveFormat, save_checkpoint

    return save_checkpoint(tiny_checkpoints["sd1"], tmp_path_factory.mktemp("model") / "sd1.safetensors",
                           SaveFormat.SAFETENSORS)


@pytest.fixture
def count_encodes(monkeypatch):
    """How many images the VAE encodes (plain and flipped count separately)."""
    calls = []
    original = LatentCache._encode

    def counting(self, pixels, variant):
        calls.append(len(pixels))
        return original(self, pixels, variant)

    monkeypatch.setattr(LatentCache, "_encode", counting)
    return lambda: sum(calls)


def trainer_cache(model: Path, folder: Path, in_json: Path):
    """The trainer's dataset and latent cache for `--in_json ... --cache_latents_to_disk`, built by the trainer's
    own code path (flag parsing, dataset building, VAE loading, precision policy)."""
    from library import train_args
    from library.dataset_config import build_training_dataset
    from library.latent_cache import CacheSettings
    from library.model_loading import instantiate_models
    from library.precision import precision_policy
    from library.sd_checkpoint import read_checkpoint

    parser = argparse.ArgumentParser()
    train_args.add_common_training_arguments(parser)
    args = parser.parse_args(["--pretrained_model_name_or_path", str(model), "--output_dir", str(folder / "out"),
                              "--train_data_dir", str(folder), "--in_json", str(in_json), "--resolution", "64,64",
                              "--enable_bucket", *BUCKET_FLAGS, "--flip_aug", "--cache_latents_to_disk"])
    dataset, _ = build_training_dataset(train_args.dataset_cli_values(args, 512), None, family_step=64, seed=0,
                                        prior_loss_weight=1.0, max_train_steps=1)
    vae_dtype = precision_policy(args.mixed_precision, no_half_vae=args.no_half_vae).vae_dtype
    with read_checkpoint(model) as checkpoint:
        vae = instantiate_models(checkpoint, component_dtypes={"vae": vae_dtype}).vae
    cache = LatentCache(vae, CacheSettings(to_disk=args.cache_latents_to_disk, batch_size=args.vae_batch_size,
                                           skip_cache_check=args.skip_cache_check), dtype=vae_dtype)
    cache.build(dataset)
    return dataset, cache


def file_tensors(path: Path) -> dict[str, torch.Tensor]:
    from library.safetensors_io import SafetensorsReader

    with SafetensorsReader(path) as reader:
        return {name: reader.read(name) for name in reader.keys()}


def test_prepare_buckets_latents_feeds_the_trainer_cache(tmp_path, sd1_file, count_encodes):
    folder = images(tmp_path / "imgs", {"square.png": (64, 64), "wide.png": (96, 64), "tall.jpg": (64, 96)})
    in_json = write(tmp_path / "meta.json", json.dumps({"square": {"caption": "a square", "tags": "t"},
                                                        "wide": {"caption": "a wide one"},
                                                        str(folder / "tall.jpg"): {"caption": "a tall one"}}))
    out_json = tmp_path / "meta_lat.json"
    argv = [str(folder), str(in_json), str(out_json), str(sd1_file), "--max_resolution", "64,64", *BUCKET_FLAGS,
            "--batch_size", "2", "--flip_aug"]
    assert prepare_buckets_latents.main(argv) == 0
    assert count_encodes() == 6  # 3 images, plain + flipped
    assert out_json.read_text(encoding="utf-8") == as_file({
        "square": {"caption": "a square", "tags": "t", "image_size": [64, 64], "train_resolution": [64, 64]},
        "wide": {"caption": "a wide one", "image_size": [96, 64], "train_resolution": [80, 48]},
        str(folder / "tall.jpg"): {"caption": "a tall one", "image_size": [64, 96], "train_resolution": [48, 80]},
    })
    files = {name: folder / f"{name}_sd_latents.safetensors" for name in ("square_64x64", "wide_80x48", "tall_48x80")}
    prepared = {name: file_tensors(path) for name, path in files.items()}
    assert prepared["wide_80x48"]["latents"].shape == (4, 6, 10)  # [C, H/8, W/8]

    assert prepare_buckets_latents.main(argv) == 0  # a rerun reuses every entry
    assert count_encodes() == 6

    # The trainer, given the prepared metadata and the same bucket flags, loads exactly those latents.
    dataset, cache = trainer_cache(sd1_file, folder, out_json)
    assert count_encodes() == 6
    items = {cache.disk_path(item).name.removesuffix("_sd_latents.safetensors"): item for item in dataset.items}
    assert sorted(items) == sorted(files)
    for name, item in items.items():
        assert torch.equal(cache.get(item, False), prepared[name]["latents"])
        assert torch.equal(cache.get(item, True), prepared[name]["latents_flipped"])

    # An edited image is never served from the stale entry: it is re-encoded (and only it).
    Image.new("RGB", (96, 64), (0, 0, 0)).save(folder / "wide.png")
    os.utime(folder / "wide.png", ns=(1, 1))
    dataset, cache = trainer_cache(sd1_file, folder, out_json)
    assert count_encodes() == 6 + 2
    wide = next(item for item in dataset.items if item.record.path.name == "wide.png")
    assert not torch.equal(cache.get(wide, False), prepared["wide_80x48"]["latents"])
    assert torch.equal(cache.get(wide, False), file_tensors(files["wide_80x48"])["latents"])  # rewritten


def test_image_workers_read_the_images_and_change_no_latent(tmp_path, sd1_file, monkeypatch):
    """kohya's --max_data_loader_n_workers: the images are read in worker processes (their process ids are
    recorded), and every latent equals the one read in this process."""
    import shutil

    from library import latent_cache

    folder = images(tmp_path / "imgs", {"a.png": (64, 64), "b.png": (96, 64), "c.jpg": (64, 96), "d.png": (64, 64)})
    in_json = write(tmp_path / "meta.json", json.dumps({name: {"caption": name} for name in "abcd"}))
    readers = tmp_path / "readers.txt"
    original = latent_cache._PixelsOf.__getitem__

    def recording(self, index):  # runs in the worker process (forked with this patch)
        with open(readers, "a") as out:
            out.write(f"{os.getpid()}\n")
        return original(self, index)

    monkeypatch.setattr(latent_cache._PixelsOf, "__getitem__", recording)
    latents = {}
    for workers in ("0", "2"):
        copy = tmp_path / f"imgs_{workers}"
        shutil.copytree(folder, copy)
        readers.unlink(missing_ok=True)
        assert prepare_buckets_latents.main([str(copy), str(in_json), str(tmp_path / f"out_{workers}.json"),
                                             str(sd1_file), "--max_resolution", "64,64", *BUCKET_FLAGS,
                                             "--batch_size", "2", "--max_data_loader_n_workers", workers]) == 0
        pids = set(readers.read_text().split())
        assert (pids == {str(os.getpid())}) if workers == "0" else (len(pids) == 2 and str(os.getpid()) not in pids)
        latents[workers] = {p.name: file_tensors(p)["latents"] for p in sorted(copy.glob("*_sd_latents.safetensors"))}
    assert len(latents["0"]) == 4 and latents["0"].keys() == latents["2"].keys()
    assert all(torch.equal(latents["0"][name], latents["2"][name]) for name in latents["0"])


def test_prepare_errors_name_the_problem(tmp_path, sd1_file, capsys):
    folder = images(tmp_path / "imgs", {"a.png": (64, 64)})
    in_json = write(tmp_path / "meta.json", json.dumps({"a": {"caption": "x"}, "ghost": {"caption": "y"}}))
    out_json = tmp_path / "out.json"

    def error(*extra, metadata=in_json):
        assert prepare_buckets_latents.main([str(folder), str(metadata), str(out_json), str(sd1_file),
                                             "--max_resolution", "64,64", *BUCKET_FLAGS, *extra]) == 1
        assert not out_json.exists()
        return capsys.readouterr().err

    assert "1 of 2 entries match no image" in error() and "ghost" in error()
    write(in_json, json.dumps({"a": {"caption": "x"}}))
    assert "--max_resolution 'big'" in error("--max_resolution", "big")
    assert "--min_bucket_reso 96 is larger" in error("--min_bucket_reso", "96")
    assert "--v2" in error("--v2")  # checked against the weights, which are SD 1.x
    assert "--batch_size" in error("--batch_size", "0")
    assert "--max_data_loader_n_workers must be 0 or more" in error("--max_data_loader_n_workers", "-1")
    assert "no such metadata file" in error(metadata=tmp_path / "missing.json")


def test_scripts_run_from_the_command_line(tmp_path):
    folder = images(tmp_path / "imgs", {"a.png": (8, 8)})
    write(folder / "a.caption", "hello")
    env = dict(os.environ, PYTHONPATH="")
    run = subprocess.run([sys.executable, "finetune/merge_captions_to_metadata.py", str(folder),
                          str(tmp_path / "m.json")], cwd=REPO, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert read_metadata(tmp_path / "m.json") == {"a": {"caption": "hello"}}
    run = subprocess.run([sys.executable, str(REPO / "finetune" / "prepare_buckets_latents.py"), "--help"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0 and "--bucket_no_upscale" in run.stdout, run.stderr
