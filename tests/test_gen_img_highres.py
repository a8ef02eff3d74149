"""gen_img.py's highres fix (kohya's --highres_fix_* flags, library/highres_fix.py) on tiny models: each image is
diffusers' txt2img pipeline at the reduced size followed by its img2img pipeline at full size (seed + 1), from the
LANCZOS-enlarged image or the bicubic-enlarged latents; the first stage of an --image_path run is img2img of the
reduced image; an upscaler module with kohya's interface is used; the PNG text reads as WebUI's hires fix; and the
flags that cannot do anything are refused by name.

Tolerance: diffusers' pipelines encode the prompts themselves, we with library/text_conditioning.py (two
implementations of the same math, rounding differently): tests/numerics.py's image tolerance (4 levels per channel,
0.5 on average), as in tests/test_gen_img.py. The second stage starts from the first stage's 8-bit image in both, so
a rounding difference in the first stage reaches the second only where it flips a level."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

import gen_img
from library.checkpoint_writer import SaveFormat, save_checkpoint
from library.families import SD1, SDXL
from library.model_loading import checkpoint_from_models
from library.samplers import make_scheduler
from library.tiny_models import build_tiny_models
from tests.numerics import assert_images_close, assert_images_differ

NEGATIVE = "blurry"
SIZE, STEPS, FIRST_STEPS, STRENGTH = 128, 4, 3, 0.75  # the first stage: 64x64 at --highres_fix_scale 0.5


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen_img_highres")
    out = {}
    for name, family in (("sd1", SD1), ("sdxl", SDXL)):
        checkpoint = checkpoint_from_models(build_tiny_models(family, seed=4))
        out[name] = save_checkpoint(checkpoint, root / f"{name}.safetensors", SaveFormat.SAFETENSORS)
        out[f"{name}_diffusers"] = save_checkpoint(checkpoint, root / f"{name}_diffusers",
                                                   SaveFormat.DIFFUSERS_SAFETENSORS)
    out["init"] = root / "init.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(out["init"])
    return out


def run(files, tmp_path, *args, model="sd1", outdir="out"):
    argv = ["--ckpt", str(files[model]), "--outdir", str(tmp_path / outdir), "--W", SIZE, "--H", SIZE,
            "--steps", STEPS, "--scale", 5, "--sampler", "euler_a", "--highres_fix_scale", 0.5,
            "--highres_fix_steps", FIRST_STEPS]
    return gen_img.run(gen_img.setup_parser().parse_args([str(a) for a in argv + list(args)]))


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def pipelines(files, model="sd1"):
    """diffusers' own txt2img and img2img pipelines of the model's diffusers folder, with the scheduler gen_img
    builds for --sampler euler_a."""
    import diffusers

    family = SD1 if model == "sd1" else SDXL
    extra = {"safety_checker": None, "requires_safety_checker": False} if model == "sd1" else {}
    txt2img = getattr(diffusers, family.pipeline_class).from_pretrained(str(files[f"{model}_diffusers"]),
                                                                         local_files_only=True, **extra)
    img2img = getattr(diffusers, family.img2img_pipeline_class)(**txt2img.components)
    for pipe in (txt2img, img2img):
        pipe.scheduler = make_scheduler("euler_a", "epsilon")
        pipe.set_progress_bar_config(disable=True)
    return txt2img, img2img


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.numbers
@pytest.mark.parametrize("model", ["sd1", "sdxl"])
def test_highres_fix_is_txt2img_then_img2img(files, tmp_path, model):
    """The default (LANCZOS on the image), two seeds in one batch, the first stage kept (--highres_fix_save_1st)."""
    paths = run(files, tmp_path, "--prompt", f"a red circle --n {NEGATIVE} --d 11,12", "--images_per_prompt", 2,
                "--batch_size", 2, "--highres_fix_save_1st", model=model)
    assert [p.name for p in paths] == ["im_000000_11_1st.png", "im_000000_11.png", "im_000001_12_1st.png",
                                       "im_000001_12.png"]
    txt2img, img2img = pipelines(files, model)
    for seed, first_path, final_path in ((11, paths[0], paths[1]), (12, paths[2], paths[3])):
        first = txt2img("a red circle", negative_prompt=NEGATIVE, width=64, height=64, num_inference_steps=FIRST_STEPS,
                        guidance_scale=5.0, generator=generator(seed)).images[0]
        assert_images_close(pixels(first_path), first, what=f"{model} first stage, seed {seed}")
        final = img2img("a red circle", negative_prompt=NEGATIVE, image=first.resize((SIZE, SIZE), Image.LANCZOS),
                        strength=0.8, num_inference_steps=STEPS, guidance_scale=5.0,
                        generator=generator(seed + 1)).images[0]  # kohya: the second stage's seed is the seed + 1
        assert_images_close(pixels(final_path), final, what=f"{model} second stage, seed {seed}")
    assert Image.open(paths[1]).size == (SIZE, SIZE) and Image.open(paths[0]).size == (64, 64)
    text = Image.open(paths[1]).text["parameters"]
    assert ("Steps: 3, Sampler: Euler a, CFG scale: 5.0, Seed: 11, Size: 64x64" in text
            and "Denoising strength: 0.8, Hires resize: 128x128, Hires steps: 4, Hires upscaler: Lanczos" in text), text


@pytest.mark.numbers
def test_latent_upscaling_and_strength(files, tmp_path):
    """--highres_fix_latents_upscaling: the first stage's latents, enlarged bicubically, are the second stage's
    start (never decoded), at the prompt's --t strength."""
    (path,) = run(files, tmp_path, "--prompt", f"a red circle --n {NEGATIVE} --d 7 --t {STRENGTH}",
                  "--highres_fix_latents_upscaling")
    txt2img, img2img = pipelines(files)
    latents = txt2img("a red circle", negative_prompt=NEGATIVE, width=64, height=64, num_inference_steps=FIRST_STEPS,
                      guidance_scale=5.0, generator=generator(7), output_type="latent").images
    enlarged = torch.nn.functional.interpolate(latents, (SIZE // 8, SIZE // 8), mode="bicubic")
    final = img2img("a red circle", negative_prompt=NEGATIVE, image=enlarged, strength=STRENGTH,
                    num_inference_steps=STEPS, guidance_scale=5.0, generator=generator(8)).images[0]
    assert_images_close(pixels(path), final, what="latent upscaling")
    assert "Hires upscaler: Latent (bicubic)" in Image.open(path).text["parameters"]
    (lanczos,) = run(files, tmp_path, "--prompt", f"a red circle --n {NEGATIVE} --d 7 --t {STRENGTH}",
                     outdir="lanczos")
    assert_images_differ(pixels(lanczos), pixels(path), what="latent vs image upscaling")


@pytest.mark.numbers
def test_image_path_first_stage_is_img2img_of_the_reduced_image(files, tmp_path):
    (path,) = run(files, tmp_path, "--prompt", "a red circle --d 3", "--image_path", files["init"], "--strength", 0.6,
                  "--highres_fix_strength", 0.9)
    _, img2img = pipelines(files)
    reduced = Image.open(files["init"]).convert("RGB").resize((64, 64), Image.LANCZOS)
    first = img2img("a red circle", image=reduced, strength=0.9, num_inference_steps=FIRST_STEPS, guidance_scale=5.0,
                    generator=generator(3)).images[0]
    final = img2img("a red circle", image=first.resize((SIZE, SIZE), Image.LANCZOS), strength=0.6,
                    num_inference_steps=STEPS, guidance_scale=5.0, generator=generator(4)).images[0]
    assert_images_close(pixels(path), final, what="highres fix from --image_path")
    assert "First pass denoising strength: 0.9, Denoising strength: 0.6" in Image.open(path).text["parameters"]


UPSCALER_MODULE = '''
import torch

calls = []


class BicubicLatents(torch.nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.mode = mode

    def support_latents(self):
        return True

    def upscale(self, vae, lowreso_images, lowreso_latents, dtype, width, height, batch_size, vae_batch_size):
        calls.append((lowreso_images, tuple(lowreso_latents.shape), dtype, width, height, batch_size))
        return torch.nn.functional.interpolate(lowreso_latents, (height // 8, width // 8), mode=self.mode)


def create_upscaler(**kwargs):
    return BicubicLatents(kwargs["mode"])
'''


def test_upscaler_module_with_kohyas_interface(files, tmp_path, monkeypatch):
    """A module with kohya's upscaler interface, enlarging latents bicubically: its output is the second stage's
    start (the image equals --highres_fix_latents_upscaling's exactly), and it got kohya's arguments."""
    (tmp_path / "my_upscaler.py").write_text(UPSCALER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_upscaler", raising=False)
    (path,) = run(files, tmp_path, "--prompt", "a red circle --d 7", "--highres_fix_upscaler", "my_upscaler",
                  "--highres_fix_upscaler_args", "mode=bicubic")
    import my_upscaler

    assert my_upscaler.calls == [(None, (1, 4, 8, 8), torch.float32, SIZE, SIZE, 1)]
    assert "Hires upscaler: my_upscaler" in Image.open(path).text["parameters"]
    (latent,) = run(files, tmp_path, "--prompt", "a red circle --d 7", "--highres_fix_latents_upscaling",
                    outdir="latent")
    assert np.array_equal(pixels(path), pixels(latent))


@pytest.mark.parametrize("args, message", [
    (["--highres_fix_upscaler", "tools.latent_upscaler"], "--highres_fix_upscaler tools.latent_upscaler: cannot "
                                                          "import it"),
    (["--highres_fix_upscaler", "json"], "no create_upscaler"),
    (["--highres_fix_upscaler", "json", "--highres_fix_latents_upscaling"], "give one"),
    (["--highres_fix_upscaler_args", "a=b"], "needs --highres_fix_upscaler"),
    (["--highres_fix_strength", "0.5"], "--highres_fix_strength is the first stage's img2img strength: it needs "
                                        "--image_path"),
    (["--highres_fix_scale", "1.5"], r"--highres_fix_scale 1.5: .* in \(0, 1\]"),
    (["--highres_fix_scale", "0.2"], "first stage of a 128x128 image at scale 0.2 is 0x0"),
    (["--highres_fix_steps", "1", "--strength", "0.1"], "second stage: img2img with strength 0.1 and 4 steps"),
])
def test_bad_highres_options(files, tmp_path, args, message):
    with pytest.raises(SystemExit, match=message):
        run(files, tmp_path, "--prompt", "x", *args)


@pytest.mark.parametrize("args, message", [
    (["--highres_fix_steps", "20"], "--highres_fix_steps: set the highres fix up, which --highres_fix_scale turns on"),
    (["--highres_fix_save_1st", "--highres_fix_latents_upscaling"], "--highres_fix_save_1st, "
                                                                    "--highres_fix_latents_upscaling: set"),
])
def test_highres_flags_without_the_scale_are_refused(files, tmp_path, args, message):
    argv = ["--ckpt", str(files["sd1"]), "--outdir", str(tmp_path), "--prompt", "x", *args]
    with pytest.raises(SystemExit, match=message):
        gen_img.run(gen_img.setup_parser().parse_args(argv))
