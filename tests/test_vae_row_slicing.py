"""kohya's --vae_slices (library/vae_row_slicing.py): the VAE computed in bands of rows gives diffusers' plain
encode and decode to float rounding, on the tiny SD 1.x and SDXL VAEs; a wrong cut (GroupNorm statistics per band,
or convolutions without their halo rows) is far outside that; gen_img --vae_slices makes the same image; bad counts
are refused by name."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from library import vae_row_slicing
from library.tiny_models import fresh_tiny_models
from tests.numerics import assert_images_close, relative_deviation

# Sliced vs plain (diffusers' own forward), relative to the output's largest magnitude, tiny SD 1.x / SDXL VAEs,
# 1 .. 12 bands, decode and encode. Measured on an AMD EPYC natively, under ATEN_CPU_CAPABILITY=avx2, and under
# ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=AVX2:
# - fp64: 1.8e-14 at most (the algorithm is exact; what is left is fp64 rounding). Bound 1e-12, 50x.
# - fp32: 1.0e-5 at most (decode; encode 2.7e-6), with 1 band as with 12: the GroupNorm statistics are summed in
#   another order than torch's kernel, and the tiny random VAE amplifies that. Bound 5e-5, 5x.
# What a wrong cut does (test_planted_defects_exceed_the_bound, decode, 3 bands): GroupNorm statistics per band
# 0.87 (SD 1.x) / 0.97 (SDXL), convolutions without halo rows 1.2 / 1.3: more than PLANTED_FACTOR x the fp32 bound.
SLICED_REL_FP64 = 1e-12
SLICED_REL_FP32 = 5e-5
PLANTED_FACTOR = 1000

LATENT_ROWS, LATENT_COLS = 12, 10  # not a multiple of the band counts below: uneven bands


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def vae_case(request):
    """The family's tiny VAE in fp32 and fp64, latents and pixels, and the plain decode and encode of each."""
    vae = fresh_tiny_models(request.param, seed=3).vae
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, vae.config.latent_channels, LATENT_ROWS, LATENT_COLS, generator=generator)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    pixels = torch.rand(2, 3, LATENT_ROWS * factor, LATENT_COLS * factor, generator=generator) * 2 - 1
    cases = {}
    for dtype in (torch.float32, torch.float64):
        model = copy.deepcopy(vae).to(dtype)
        z, x = latents.to(dtype), pixels.to(dtype)
        with torch.no_grad():
            cases[dtype] = (model, z, x, model.decode(z).sample, model.encode(x).latent_dist.parameters)
    return request.param, cases


def sliced_outputs(vae, latents, pixels, num_slices):
    """Decode and encode (mean and log-variance) with the VAE in bands."""
    with vae_row_slicing.row_sliced(vae, num_slices), torch.no_grad():
        return vae.decode(latents).sample, vae.encode(pixels).latent_dist.parameters


@pytest.mark.numbers
@pytest.mark.parametrize("dtype, num_slices, bound", [
    (torch.float64, 1, SLICED_REL_FP64), (torch.float64, 3, SLICED_REL_FP64), (torch.float64, 5, SLICED_REL_FP64),
    (torch.float64, LATENT_ROWS, SLICED_REL_FP64), (torch.float32, 3, SLICED_REL_FP32),
    (torch.float32, LATENT_ROWS, SLICED_REL_FP32)])
def test_sliced_equals_plain(vae_case, dtype, num_slices, bound):
    family, cases = vae_case
    vae, latents, pixels, decoded, encoded = cases[dtype]
    got_decoded, got_encoded = sliced_outputs(vae, latents, pixels, num_slices)
    assert relative_deviation(got_decoded, decoded) <= bound, f"{family} decode, {num_slices} bands"
    assert relative_deviation(got_encoded, encoded) <= bound, f"{family} encode, {num_slices} bands"
    # and the VAE is diffusers' own again afterwards
    assert "forward" not in vae.decoder.__dict__ and "forward" not in vae.encoder.__dict__


@pytest.mark.numbers
def test_planted_defects_exceed_the_bound(vae_case, monkeypatch):
    """What the bounds catch: each band normalised with its own GroupNorm statistics (a naive split), and each
    band convolved without its neighbours' halo rows (zero padding at every cut)."""
    family, cases = vae_case
    vae, latents, pixels, decoded, _ = cases[torch.float32]

    def own_statistics(self, x, norm):
        return lambda t: torch.nn.functional.group_norm(t, norm.num_groups, norm.weight, norm.bias, norm.eps)

    def no_halo(self, x, conv, before=None, residual=None, into=None):
        fn = (lambda t: conv(before(t))) if before is not None else conv
        return self.map(x, x.shape[2], lambda a, b: (a, b), lambda lo: lo, fn, residual, into)

    for name, replacement in (("normalise", own_statistics), ("conv", no_halo)):
        with monkeypatch.context() as m:
            m.setattr(vae_row_slicing._Bands, name, replacement)
            wrong, _ = sliced_outputs(vae, latents, pixels, 3)
        deviation = relative_deviation(wrong, decoded)
        assert deviation >= PLANTED_FACTOR * SLICED_REL_FP32, \
            f"{family}: the planted {name} defect moved the decode by only {deviation:.3g}"


def test_bad_counts_are_refused(vae_case):
    _, cases = vae_case
    vae, latents, _, _, _ = cases[torch.float32]
    for bad in (0, -2):
        with pytest.raises(ValueError, match=f"--vae_slices {bad}: give the number of horizontal bands"):
            vae_row_slicing.enable(vae, bad)
    with vae_row_slicing.row_sliced(vae, LATENT_ROWS + 1), torch.no_grad():
        with pytest.raises(ValueError, match=f"--vae_slices {LATENT_ROWS + 1}: a layer of the VAE has only "
                                             f"{LATENT_ROWS} rows"):
            vae.decode(latents)


def test_unsupported_vae_is_refused():
    """A VAE with a layer the bands cannot follow (here a strided conv_in) is refused before any image, by name."""
    vae = fresh_tiny_models("sd1", seed=3).vae
    vae.decoder.conv_in.stride = (2, 2)
    with pytest.raises(ValueError, match=r"--vae_slices: this VAE's decoder.conv_in \(Conv2d\) cannot be computed"):
        vae_row_slicing.enable(vae, 2)
    assert "forward" not in vae.decoder.__dict__


# ---------------------------------------------------------------------------------------------------------------
# gen_img.py --vae_slices

@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    from library.checkpoint_writer import SaveFormat, save_checkpoint
    from library.families import FAMILIES
    from library.model_loading import checkpoint_from_models
    from library.tiny_models import build_tiny_models

    root = tmp_path_factory.mktemp("vae_slices")
    path = save_checkpoint(checkpoint_from_models(build_tiny_models(FAMILIES["sd1"], seed=8)),
                           root / "sd1.safetensors", SaveFormat.SAFETENSORS)
    init = root / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(init)
    return path, init


def run(model_file, tmp_path, *args, outdir):
    import gen_img

    argv = ["--ckpt", str(model_file[0]), "--outdir", str(tmp_path / outdir), "--W", "64", "--H", "64", "--steps",
            "3", "--scale", "5", "--sampler", "euler_a", "--seed", "4", "--prompt", "a red circle"]
    return gen_img.run(gen_img.setup_parser().parse_args(argv + [str(a) for a in args]))


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


@pytest.mark.numbers
def test_gen_img_vae_slices(model_file, tmp_path, monkeypatch):
    """The same images with --vae_slices as without (txt2img: decode; img2img: encode too), within the suite's
    image tolerance (tests/numerics.py). Measured natively and under ATEN_CPU_CAPABILITY=default
    ONEDNN_MAX_CPU_ISA=AVX2: txt2img 0 levels (pixel-equal), img2img 1 level at most, mean 3e-4 (the encode's fp32
    rounding carried through the denoising). The banded code did run: its passes are counted."""
    calls = []
    for name in ("_decode", "_encode"):
        original = getattr(vae_row_slicing, name)
        monkeypatch.setattr(vae_row_slicing, name,
                            lambda *a, _original=original, _name=name: calls.append(_name) or _original(*a))
    img2img = ["--image_path", model_file[1], "--strength", "0.6"]
    (plain,) = run(model_file, tmp_path, outdir="plain")
    (plain_i2i,) = run(model_file, tmp_path, *img2img, outdir="plain_i2i")
    assert calls == []
    (sliced,) = run(model_file, tmp_path, "--vae_slices", 4, outdir="sliced")
    assert calls == ["_decode"]
    (sliced_i2i,) = run(model_file, tmp_path, "--vae_slices", 8, *img2img, outdir="sliced_i2i")
    assert calls == ["_decode", "_encode", "_decode"]
    assert_images_close(pixels(sliced), pixels(plain), what="txt2img, --vae_slices 4 vs none")
    assert_images_close(pixels(sliced_i2i), pixels(plain_i2i), what="img2img, --vae_slices 8 vs none")


@pytest.mark.parametrize("args, message", [
    (["--vae_slices", "0"], "--vae_slices 0: give the number of horizontal bands"),
    (["--vae_slices", "-3"], "--vae_slices -3: give the number of horizontal bands"),
    (["--vae_slices", "9"], "--vae_slices 9: more bands than the image's 8 latent rows"),
    (["--vae_slices", "9", "--H", "128", "--highres_fix_scale", "0.5"],
     r"--vae_slices 9: more bands than the image's 8 latent rows .* \(the highres fix's first stage is 64 px high\)"),
])
def test_gen_img_bad_vae_slices(model_file, tmp_path, args, message):
    with pytest.raises(SystemExit, match=message):
        run(model_file, tmp_path, *args, outdir="bad")
