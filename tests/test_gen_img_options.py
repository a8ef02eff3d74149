"""gen_img.py's smaller kohya options on tiny models: what each changes is checked against what it must equal (the
same generation without it, or a case where the formula collapses to a known one), and what cannot work here is
refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import gen_img
from library.checkpoint_writer import SaveFormat, save_checkpoint
from library.families import FAMILIES
from library.model_loading import checkpoint_from_models
from library.tiny_models import build_tiny_models
from tests.numerics import assert_images_close

NEGATIVE = "blurry"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen_img_options")
    out = {}
    for name in ("sd1", "sd1-inpainting"):
        checkpoint = checkpoint_from_models(build_tiny_models(FAMILIES[name], seed=8))
        out[name] = save_checkpoint(checkpoint, root / f"{name}.safetensors", SaveFormat.SAFETENSORS)
    rng = np.random.default_rng(0)
    out["init"] = root / "init.png"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(out["init"])
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    out["mask"] = root / "mask.png"
    Image.fromarray(mask).save(out["mask"])
    return out


def run(files, tmp_path, *args, model="sd1", outdir="out"):
    argv = ["--ckpt", str(files[model]), "--outdir", str(tmp_path / outdir), "--W", "64", "--H", "64",
            "--steps", "3", "--scale", "5", "--sampler", "euler_a"]
    return gen_img.run(gen_img.setup_parser().parse_args(argv + [str(a) for a in args]))


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


@pytest.fixture
def vae_batches(monkeypatch):
    """The batch size of every VAE decode (AutoencoderKL._decode: what runs per slice when diffusers slices)."""
    from diffusers import AutoencoderKL

    seen = []
    decode = AutoencoderKL._decode

    def spy(self, z, *args, **kwargs):
        seen.append(z.shape[0])
        return decode(self, z, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "_decode", spy)
    return seen


@pytest.mark.numbers
def test_vae_batch_size(files, tmp_path, vae_batches):
    """kohya's --vae_batch_size: at most that many images through the VAE at a time (a count, or a fraction of the
    batch below 1), the images unchanged (same decoder on the same latents, in other batches)."""
    common = ["--prompt", f"a red circle --n {NEGATIVE}", "--seed", 4, "--images_per_prompt", 3, "--batch_size", 3]
    whole = run(files, tmp_path, *common, outdir="whole")
    assert vae_batches == [3]
    vae_batches.clear()
    two = run(files, tmp_path, *common, "--vae_batch_size", 2, outdir="two")
    assert vae_batches == [2, 1]
    vae_batches.clear()
    run(files, tmp_path, *common, "--vae_batch_size", 0.5, outdir="half")  # kohya: max(1, int(3 * 0.5)) = 1
    assert vae_batches == [1, 1, 1]
    for a, b in zip(whole, two):
        assert_images_close(pixels(b), pixels(a), what=f"{a.name} decoded 2 at a time vs all 3")
    # The inpainting pipelines encode inside: one image at a time there (diffusers' VAE slicing), then as it was.
    vae_batches.clear()
    run(files, tmp_path, "--prompt", "a red circle", "--seed", 4, "--images_per_prompt", 2, "--batch_size", 2,
        "--image_path", files["init"], "--mask_path", files["mask"], "--vae_batch_size", 1, model="sd1-inpainting",
        outdir="inpaint")
    assert vae_batches == [1, 1]
    vae_batches.clear()
    run(files, tmp_path, *common, outdir="again")
    assert vae_batches == [3]


def test_bad_vae_batch_size(files, tmp_path):
    with pytest.raises(SystemExit, match="--vae_batch_size 0.0: give a count"):
        run(files, tmp_path, "--prompt", "x", "--vae_batch_size", 0)
