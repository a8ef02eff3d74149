"""The latent cache is keyed by everything that determines a latent: a change recomputes, never reuses."""

from __future__ import annotations

import copy
import logging
import os

import pytest
import torch
from PIL import Image

from library.buckets import BucketAssigner, BucketConfig
from library.dataset_sources import Subset, scan_subset
from library.families import SD1
from library.latent_cache import CacheSettings, LatentCache
from library.tiny_models import build_tiny_models
from library.train_dataset import DatasetGroup, TrainingDataset


@pytest.fixture(scope="module")
def vae():
    return build_tiny_models(SD1, seed=5).vae


def make_dataset(folder, resolution=64, flip=False, resize=None):
    subset = Subset(image_dir=folder, flip_aug=flip, resize_interpolation=resize)
    records, _ = scan_subset(subset)
    assigner = BucketAssigner(BucketConfig(resolution=(resolution, resolution)))
    return TrainingDataset([DatasetGroup([(r, 1) for r in records], assigner, 1)], seed=0)


def build(vae, folder, **kw):
    dataset = make_dataset(folder, **{k: v for k, v in kw.items() if k in ("resolution", "flip", "resize")})
    cache = LatentCache(vae, CacheSettings(to_disk=True, skip_cache_check=kw.get("skip", False)),
                        dtype=kw.get("dtype", torch.float32))
    calls = []
    original = cache._encode
    cache._encode = lambda pixels, variant: calls.append(len(pixels)) or original(pixels, variant)
    cache.build(dataset)
    return dataset, cache, sum(calls)


def test_disk_cache_reuse_and_invalidation(vae, tmp_path, caplog):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, colour in enumerate([(200, 10, 10), (10, 200, 10)]):
        Image.new("RGB", (64, 64), colour).save(folder / f"{i}.png")
    dataset, cache, encoded = build(vae, folder)
    assert encoded == 2 and len(list(folder.glob("*_64x64_sd_latents.safetensors"))) == 2
    first = cache.get(dataset.items[0], False).clone()

    _, again, encoded = build(vae, folder)
    assert encoded == 0 and torch.equal(again.get(dataset.items[0], False), first)  # reused, identical

    Image.new("RGB", (64, 64), (0, 0, 255)).save(folder / "0.png")  # an edited image
    os.utime(folder / "0.png", ns=(1, 1))
    with caplog.at_level(logging.INFO):
        _, edited, encoded = build(vae, folder)
    assert encoded == 1 and "stale" in caplog.text
    assert not torch.equal(edited.get(dataset.items[0], False), first)

    bf16_vae = copy.deepcopy(vae).to(torch.bfloat16)
    assert build(bf16_vae, folder, dtype=torch.bfloat16)[2] == 2  # other dtype (and the VAE it needs)
    assert build(vae, folder, resolution=32)[2] == 2  # other resolution: other bucket, other files
    assert len(list(folder.glob("*_32x32_sd_latents.safetensors"))) == 2
    assert build(vae, folder, flip=True)[2] == 4  # flipped latents were not cached before (plain + flipped)
    other_vae = build_tiny_models(SD1, seed=6).vae
    assert build(other_vae, folder)[2] == 2  # other VAE weights

    Image.new("RGB", (64, 64), (9, 9, 9)).save(folder / "1.png")
    with caplog.at_level(logging.WARNING):
        assert build(vae, folder, skip=True)[2] == 2  # first run with skip: its key has no file part yet
        caplog.clear()
        assert build(vae, folder, skip=True)[2] == 0
    assert "--skip_cache_check" in caplog.text


def test_cached_and_uncached_pixels_agree(vae, tmp_path):
    """The cache encodes exactly the pixels the uncached path would train on (same crop plan)."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (96, 64), (30, 60, 90)).save(folder / "wide.png")
    dataset = make_dataset(folder)
    pixels, _ = dataset.load_pixels(dataset.items[0], None, flip=False)
    assert pixels.shape == (3, 64, 64)
    cache = LatentCache(vae, CacheSettings())
    cache.build(dataset)
    with torch.no_grad():
        dist = vae.encode(pixels[None]).latent_dist
    z = (cache.get(dataset.items[0], False) - dist.mean[0]) / dist.std[0]
    assert z.abs().max() < 6 and 0.5 < z.std() < 1.5  # a sample of exactly that distribution


def test_resize_interpolation_gives_its_filters_pixels_and_its_own_cache_entries(vae, tmp_path):
    """kohya's resize_interpolation: the photo is resized with that PIL filter (here checked against PIL itself),
    and a cached latent made with another filter is recomputed, not reused; no filter named keeps the old keys."""
    import numpy as np

    from library.train_dataset import pixels_to_tensor

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    source = Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))
    source.save(folder / "noise.png")
    for name, pil in (("nearest", Image.Resampling.NEAREST), ("bicubic", Image.Resampling.BICUBIC),
                      (None, Image.Resampling.BOX)):  # the default when shrinking: area (BOX)
        dataset = make_dataset(folder, resize=name)
        pixels, _ = dataset.load_pixels(dataset.items[0], None, flip=False)
        assert torch.equal(pixels, pixels_to_tensor(source.resize((64, 64), resample=pil))), name
    assert build(vae, folder)[2] == 1
    assert build(vae, folder, resize="nearest")[2] == 1  # other pixels: recomputed
    assert build(vae, folder, resize="nearest")[2] == 0 and build(vae, folder)[2] == 1
