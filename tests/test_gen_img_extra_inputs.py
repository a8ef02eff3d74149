"""gen_img.py with inpainting, depth and extra-channel models, and masked img2img with text-to-image models (tiny
models, CPU): the images equal diffusers' own StableDiffusionInpaintPipeline / StableDiffusionXLInpaintPipeline /
StableDiffusionDepth2ImgPipeline, loaded independently from our diffusers folders, for the same seeds and scheduler;
the condition channels of an extra-channel model reach its U-Net exactly as the training step feeds them; images,
masks and maps pair up as kohya pairs --image_path with --mask_path; an SD 1.x LoRA applies to SD 1.x inpainting
(gen_img and merge_lora.py say so); and bad input is refused by flag and file with nothing written.

Training: train_db saves tiny inpainting / depth models that diffusers' inpainting pipeline reads and runs as
gen_img does, and their training samples (an inpainting model from the prompt alone, a depth model with its prompt's
--cn map) are gen_img's images of the saved models.

Tolerance: images from diffusers are compared with tests/numerics.py's image tolerance (4 levels per channel, 0.5
on average): ours are made from our own text conditioning (library/text_conditioning.py) and diffusers' from its
own encode_prompt, two implementations of the same math whose rounding differs, as in tests/test_gen_img.py.
Measured on an AMD EPYC, natively and under ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=AVX2: 1 level at most,
4.9e-4 on average (depth2img: 0). Where the same ops run on the same inputs (the condition channels against the
training feeder's, training samples against gen_img, images of one run against another's), equality is exact.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

import gen_img
from library.checkpoint_writer import SaveFormat, save_checkpoint
from library.families import FAMILIES
from library.model_loading import checkpoint_from_models
from library.tiny_models import build_tiny_models
from tests.numerics import IMAGE_MAX_LEVELS, IMAGE_MEAN_LEVELS, assert_images_close, assert_images_differ

NEGATIVE = "blurry"
KOHYA_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
MODELS = ("sd1-inpainting", "sdxl-inpainting", "sd2-512-depth", "sd1-extra", "sdxl-extra", "sd1", "sdxl")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny models of each family as original .safetensors (what gen_img reads) and diffusers folders (what
    diffusers' pipelines read), and the images, masks, depth maps and condition images the tests give them."""
    root = tmp_path_factory.mktemp("gen_img_extra_inputs")
    out = {}
    for name in MODELS:
        checkpoint = checkpoint_from_models(build_tiny_models(FAMILIES[name], seed=5))
        out[name] = save_checkpoint(checkpoint, root / f"{name}.safetensors", SaveFormat.SAFETENSORS)
        out[f"{name}_diffusers"] = save_checkpoint(checkpoint, root / f"{name}_diffusers",
                                                   SaveFormat.DIFFUSERS_SAFETENSORS)
    rng = np.random.default_rng(0)

    def save(name: str, array: np.ndarray, mode: str | None = None):
        out[name] = root / f"{name}.png"
        Image.fromarray(array, mode).save(out[name])

    save("init", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    save("init2", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 8:40] = 255  # white: repaint
    save("mask", mask)
    save("mask_half", mask[::2, ::2].copy())  # the same mask at half resolution
    save("mask_wide", np.zeros((32, 64), np.uint8))  # another aspect ratio
    other = np.zeros((64, 64), np.uint8)
    other[40:64, 24:64] = 255
    save("mask2", other)
    ramp = np.linspace(0, 255, 64)
    save("depth", (np.add.outer(ramp, ramp) / 2 + rng.normal(0, 20, (64, 64))).clip(0, 255).astype(np.uint8))
    save("depth2", (255 - np.add.outer(ramp, ramp) / 2).astype(np.uint8))
    save("cond", rng.integers(0, 256, (64, 64, 2), dtype=np.uint8), "LA")  # the extra models' 2 channels
    save("cond2", rng.integers(0, 256, (64, 64, 2), dtype=np.uint8), "LA")
    save("cond_rgb", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    return out


def run(files, tmp_path, model, *args, outdir="out"):
    """gen_img in-process (its `run`, as `main` does); returns the written paths."""
    argv = ["--ckpt", str(files[model]), "--outdir", str(tmp_path / outdir), "--W", "64", "--H", "64",
            "--steps", "3", "--scale", "5", "--sampler", "euler_a"]
    return gen_img.run(gen_img.setup_parser().parse_args(argv + [str(a) for a in args]))


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def diffusers_pipe(files, model, cls_name=None):
    """The diffusers pipeline of `model`'s folder (or `cls_name` around the same components), with the scheduler
    kohya's gen_img builds for euler_a, constructed here on its own."""
    import diffusers
    from diffusers import EulerAncestralDiscreteScheduler

    family = FAMILIES[model]
    cls = getattr(diffusers, cls_name or family.pipeline_class)
    pipe = cls.from_pretrained(str(files[f"{model}_diffusers"]), local_files_only=True,
                               **{absent: None for absent in family.pipeline_absent})
    pipe.scheduler = EulerAncestralDiscreteScheduler(prediction_type="epsilon", steps_offset=1, **KOHYA_SCHEDULE)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generators(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def rgb(path) -> Image.Image:
    return Image.open(path).convert("RGB")


def nothing_written(tmp_path, outdir="out") -> bool:
    return not (tmp_path / outdir).exists() or not any((tmp_path / outdir).iterdir())


# ------------------------------------------------------------------ inpainting models


@pytest.mark.numbers
@pytest.mark.parametrize("model, strength", [("sd1-inpainting", None), ("sd1-inpainting", 0.6),
                                             ("sdxl-inpainting", 0.75)])
def test_inpainting_model_equals_diffusers_inpaint_pipeline(files, tmp_path, model, strength):
    """Two seeds in one batch; each image equals diffusers' image of its seed alone (each image's noise and
    masked-image latents come from its own generator, so it does not depend on its batch). Without --strength an
    inpainting model repaints from pure noise (1.0, diffusers' default)."""
    flags = ["--strength", strength] if strength else []
    paths = run(files, tmp_path, model, "--prompt", f"a red circle --n {NEGATIVE} --d 11,12", "--images_per_prompt",
                2, "--batch_size", 2, "--image_path", files["init"], "--mask_path", files["mask"], *flags)
    pipe = diffusers_pipe(files, model)
    for path, seed in zip(paths, (11, 12)):
        theirs = pipe("a red circle", negative_prompt=NEGATIVE, image=rgb(files["init"]),
                      mask_image=Image.open(files["mask"]), strength=strength or 1.0, width=64, height=64,
                      num_inference_steps=3, guidance_scale=5.0, generator=generators(seed)[0]).images[0]
        assert_images_close(pixels(path), theirs, what=f"{model} inpainting {path.name}")
    if strength:  # a part of the steps, in the masked area: the seeds move the image less than a whole generation
        assert f"Denoising strength: {strength}" in Image.open(paths[0]).text["parameters"]
    else:
        assert_images_differ(pixels(paths[0]), pixels(paths[1]), what="the batch's two seeds")


@pytest.mark.numbers
def test_inpainting_model_without_image_generates_from_the_prompt(files, tmp_path, caplog):
    """No --image_path: the whole image masked at strength 1 (the start is pure noise and the masked image blank),
    which is what diffusers gives for any image under an all-white mask."""
    with caplog.at_level(logging.INFO, logger="gen_img"):
        (path,) = run(files, tmp_path, "sd1-inpainting", "--prompt", f"a red circle --n {NEGATIVE} --d 4")
    assert "generating from the prompt alone" in caplog.text
    theirs = diffusers_pipe(files, "sd1-inpainting")(
        "a red circle", negative_prompt=NEGATIVE, image=rgb(files["init"]), mask_image=Image.new("L", (64, 64), 255),
        strength=1.0, width=64, height=64, num_inference_steps=3, guidance_scale=5.0,
        generator=generators(4)[0]).images[0]
    assert_images_close(pixels(path), theirs, what="inpainting model from text alone")


@pytest.mark.numbers
@pytest.mark.parametrize("model", ["sd1", "sdxl"])
def test_text_to_image_model_with_a_mask_does_masked_img2img(files, tmp_path, model, caplog):
    """A plain model with --mask_path: diffusers' inpainting pipeline with its 4-channel U-Net (masked img2img),
    said in the log; the mask matters (plain img2img of the same seed differs)."""
    common = ["--prompt", f"a red circle --n {NEGATIVE} --d 7", "--image_path", files["init"], "--strength", 0.7]
    with caplog.at_level(logging.INFO, logger="gen_img"):
        (path,) = run(files, tmp_path, model, *common, "--mask_path", files["mask"])
    assert "not an inpainting one: --mask_path repaints the white area by masked img2img" in caplog.text
    inpaint_class = FAMILIES[f"{model}-inpainting"].pipeline_class
    theirs = diffusers_pipe(files, model, inpaint_class)(
        "a red circle", negative_prompt=NEGATIVE, image=rgb(files["init"]), mask_image=Image.open(files["mask"]),
        strength=0.7, width=64, height=64, num_inference_steps=3, guidance_scale=5.0,
        generator=generators(7)[0]).images[0]
    assert_images_close(pixels(path), theirs, what=f"{model} masked img2img")
    (unmasked,) = run(files, tmp_path, model, *common, outdir="img2img")
    assert_images_differ(pixels(path), pixels(unmasked), what="masked vs plain img2img")


# ------------------------------------------------------------------ depth


@pytest.mark.numbers
@pytest.mark.parametrize("with_image", [True, False], ids=["image", "no_image"])
def test_depth_model_equals_diffusers_depth2img(files, tmp_path, with_image, caplog):
    """The depth map (L, 0..1, white: near) as `depth_map`; without --image_path depth2img starts from a mid-gray
    image at strength 1."""
    flags = ["--image_path", files["init"], "--strength", 0.7] if with_image else []
    with caplog.at_level(logging.INFO, logger="gen_img"):
        (path,) = run(files, tmp_path, "sd2-512-depth", "--prompt", f"a red circle --n {NEGATIVE} --d 3",
                      "--depth_path", files["depth"], *flags)
    assert ("mid-gray" in caplog.text) is not with_image
    depth = torch.from_numpy(np.asarray(Image.open(files["depth"]), dtype=np.float32) / 255.0)[None]
    image = rgb(files["init"]) if with_image else Image.new("RGB", (64, 64), (128, 128, 128))
    theirs = diffusers_pipe(files, "sd2-512-depth")(
        "a red circle", negative_prompt=NEGATIVE, image=image, depth_map=depth, strength=0.7 if with_image else 1.0,
        num_inference_steps=3, guidance_scale=5.0, generator=generators(3)[0]).images[0]
    assert_images_close(pixels(path), theirs, what=f"depth2img ({'with' if with_image else 'without'} image)")
    (other,) = run(files, tmp_path, "sd2-512-depth", "--prompt", f"a red circle --n {NEGATIVE} --d 3",
                   "--depth_path", files["depth2"], *flags, outdir="other")
    assert_images_differ(pixels(path), pixels(other), what="another depth map")


def test_prompt_cn_gives_each_prompt_its_own_map(files, tmp_path):
    """kohya's prompt option --cn (its ControlNet image) names a depth model's map per prompt line: each image
    equals the one --depth_path gives with that map."""
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text(f"a red circle --d 3 --cn {files['depth']}\na red circle --d 3 --cn {files['depth2']}\n")
    by_line = run(files, tmp_path, "sd2-512-depth", "--from_file", prompt_file)
    for i, depth in enumerate(("depth", "depth2")):
        (by_flag,) = run(files, tmp_path, "sd2-512-depth", "--prompt", "a red circle --d 3", "--depth_path",
                         files[depth], outdir=f"flag{i}")
        assert np.array_equal(pixels(by_line[i]), pixels(by_flag))
    assert_images_differ(pixels(by_line[0]), pixels(by_line[1]), what="the two lines' maps")


# ------------------------------------------------------------------ extra channels


@pytest.mark.parametrize("model", ["sd1-extra", "sdxl-extra"])
def test_condition_channels_reach_the_unet_as_training_feeds_them(files, tmp_path, model, monkeypatch):
    """Every U-Net call gets the pipeline's 4 latent channels followed by the condition channels that the training
    side makes of the same file (ConditionImages.load, then ChannelsFeeder), for both halves of the CFG batch:
    the same ops on the same values, so exactly equal."""
    from diffusers import UNet2DConditionModel

    from library.buckets import CropPlan
    from library.extra_inputs import ChannelsFeeder, ConditionImages, ConditionKind

    seen = []
    forward = UNet2DConditionModel.forward

    def spy(self, sample, *args, **kwargs):
        seen.append(sample.detach().clone())
        return forward(self, sample, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    (path,) = run(files, tmp_path, model, "--prompt", f"a red circle --n {NEGATIVE} --d 2", "--condition_path",
                  files["cond"])
    plan = CropPlan((64, 64), 0, 0, (64, 64), (64, 64))
    condition = ConditionImages(ConditionKind.CHANNELS, 2).load(files["cond"], plan, flip=False, rng=None)
    expected = ChannelsFeeder()({"condition": condition[None]}, [], (8, 8))
    assert len(seen) == 3  # one call per step, the CFG batch (negative, positive) in one
    for sample in seen:
        assert sample.shape == (2, 6, 8, 8)
        assert torch.equal(sample[:, 4:], expected.expand(2, -1, -1, -1))
    (other,) = run(files, tmp_path, model, "--prompt", f"a red circle --n {NEGATIVE} --d 2", "--condition_path",
                   files["cond2"], outdir="other")
    # The tiny models' random extra-channel weights move the image less than a seed does (measured: 2.7 levels on
    # average for SDXL), but beyond rounding: another condition image gives another picture.
    difference = np.abs(pixels(path) - pixels(other))
    assert difference.max() > IMAGE_MAX_LEVELS and difference.mean() > IMAGE_MEAN_LEVELS


@pytest.mark.numbers
def test_widened_model_gives_the_text_to_image_models_image(files, tmp_path):
    """tools/add_input_channels.py --extra_channels 2 adds zero weights: through gen_img's U-Net wrapper the widened
    model draws what diffusers' StableDiffusionPipeline draws with the model it was made from, for any condition."""
    from tools.add_input_channels import main as widen

    widened = tmp_path / "widened.safetensors"
    assert widen(["--extra_channels", "2", str(files["sd1"]), str(widened)]) == 0
    (path,) = gen_img.run(gen_img.setup_parser().parse_args(
        ["--ckpt", str(widened), "--outdir", str(tmp_path / "out"), "--W", "64", "--H", "64", "--steps", "3",
         "--scale", "5", "--sampler", "euler_a", "--prompt", f"a red circle --n {NEGATIVE} --d 9",
         "--condition_path", str(files["cond"])]))
    theirs = diffusers_pipe(files, "sd1")("a red circle", negative_prompt=NEGATIVE, width=64, height=64,
                                          num_inference_steps=3, guidance_scale=5.0,
                                          generator=generators(9)[0]).images[0]
    assert_images_close(pixels(path), theirs, what="widened model vs its text-to-image model")


# ------------------------------------------------------------------ pairing, sizes


def test_images_and_masks_pair_up_in_turn_like_kohya(files, tmp_path):
    """Folders: the n-th image takes image n and mask n, each modulo its folder's count (kohya's global_step
    rule). Three images of one seed from two image/mask pairs: the first and third are the same picture."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for i, (image, mask) in enumerate((("init", "mask"), ("init2", "mask2"))):
        Image.open(files[image]).save(images / f"{i}.png")
        Image.open(files[mask]).save(masks / f"{i}.png")
    paths = run(files, tmp_path, "sd1-inpainting", "--prompt", "a red circle --d 5,5,5", "--images_per_prompt", 3,
                "--image_path", images, "--mask_path", masks)
    assert np.array_equal(pixels(paths[0]), pixels(paths[2]))
    assert_images_differ(pixels(paths[0]), pixels(paths[1]), what="the second image/mask pair")
    (single,) = run(files, tmp_path, "sd1-inpainting", "--prompt", "a red circle --d 5", "--image_path",
                    files["init2"], "--mask_path", files["mask2"], outdir="single")
    assert np.array_equal(pixels(paths[1]), pixels(single))


def test_mask_of_another_resolution_is_resized_like_in_training(files, tmp_path):
    """A half-resolution mask of the image's aspect ratio is resized to the image (as the training loader resizes
    one); this blocky mask comes back as the full-size one, so the image is the same."""
    common = ["--prompt", "a red circle --d 6", "--image_path", files["init"]]
    (full,) = run(files, tmp_path, "sd1-inpainting", *common, "--mask_path", files["mask"], outdir="full")
    (half,) = run(files, tmp_path, "sd1-inpainting", *common, "--mask_path", files["mask_half"], outdir="half")
    assert np.array_equal(pixels(full), pixels(half))


# ------------------------------------------------------------------ precision


def test_inpainting_under_mixed_precision_runs_the_vae_in_the_pipeline():
    """During training the U-Net is fp32 beside a bf16 VAE: the inpainting pipeline encodes the (blank) masked
    image itself, so its VAE runs inside, under autocast (running it apart is refused)."""
    from library.prompt_files import SamplePrompt
    from library.samplers import make_scheduler
    from library.sampling import generate_images

    models = build_tiny_models(FAMILIES["sd1-inpainting"], seed=5)
    models.vae.to(torch.bfloat16)
    for encoder in models.text_encoders:
        encoder.to(torch.bfloat16)
    prompt = SamplePrompt("a red circle", width=64, height=64, steps=2, scale=5.0)
    (image,) = generate_images([prompt], [1], models=models, scheduler=make_scheduler("euler_a", "epsilon"),
                               output_type="np")
    assert np.isfinite(image).all() and image.std() > 0.01
    with pytest.raises(ValueError, match="encodes its images itself"):
        generate_images([prompt], [1], models=models, scheduler=make_scheduler("euler_a", "epsilon"), vae_apart=True)


# ------------------------------------------------------------------ LoRA of the text-to-image model


@pytest.fixture(scope="module")
def sd1_lora(files, tmp_path_factory):
    """A LoCon file trained (here: random up weights) on the tiny SD 1.x model, with the metadata our trainers
    write (modelspec.architecture stable-diffusion-v1/lora)."""
    from networks.lora import create_network

    models = build_tiny_models(FAMILIES["sd1"], seed=5)
    torch.manual_seed(0)
    network = create_network(1.0, 4, 2.0, None, models.text_encoder, models.unet, conv_dim="4", conv_alpha="1")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in network.loras:
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=generator) * 0.1)
    path = tmp_path_factory.mktemp("lora") / "sd15_lora.safetensors"
    network.save_weights(path, None, {"ss_base_model_version": "sd_v1",
                                      "modelspec.architecture": "stable-diffusion-v1/lora"})
    return path


def test_sd1_lora_applies_to_sd1_inpainting_in_gen_img_and_merge_lora(files, sd1_lora, tmp_path, caplog):
    """Same module names and shapes (conv_in, the only wider layer, is no LoRA target): gen_img applies it and
    says so; merge_lora.py merges it into the inpainting model, and the merged model draws what gen_img draws
    with the LoRA applied."""
    from networks.merge_lora import main as merge_lora

    common = ["--prompt", "a red circle --d 8", "--image_path", files["init"], "--mask_path", files["mask"]]
    with caplog.at_level(logging.INFO):
        (applied,) = run(files, tmp_path, "sd1-inpainting", *common, "--network_weights", sd1_lora, outdir="applied")
    note = "a LoRA trained on Stable Diffusion 1.x, applied to Stable Diffusion 1.x inpainting: it fits"
    assert note in caplog.text
    (plain,) = run(files, tmp_path, "sd1-inpainting", *common, outdir="plain")
    assert_images_differ(pixels(applied), pixels(plain), what="the LoRA")
    caplog.clear()
    merged = tmp_path / "merged.safetensors"
    with caplog.at_level(logging.INFO):
        assert merge_lora(["--sd_model", str(files["sd1-inpainting"]), "--models", str(sd1_lora), "--save_to",
                           str(merged)]) == 0
    assert note in caplog.text
    (from_merged,) = gen_img.run(gen_img.setup_parser().parse_args(
        ["--ckpt", str(merged), "--outdir", str(tmp_path / "merged"), "--W", "64", "--H", "64", "--steps", "3",
         "--scale", "5", "--sampler", "euler_a", *[str(a) for a in common]]))
    assert np.abs(pixels(from_merged) - pixels(applied)).max() <= 1  # W + dW rounded once more (fp32)


def test_lora_of_the_difference_between_a_model_and_its_inpainting_variant(files, tmp_path, caplog):
    """extract_lora_from_models.py takes a text-to-image model and an inpainting model of the same architecture
    (their U-Nets differ in conv_in only, no LoRA layer), says so, and extracts every LoRA layer's difference."""
    from networks.extract_lora_from_models import main as extract
    from networks.lora_files import read_lora_file

    out = tmp_path / "difference.safetensors"
    with caplog.at_level(logging.INFO):
        assert extract(["--model_org", str(files["sd1"]), "--model_tuned", str(files["sd1-inpainting"]),
                        "--save_to", str(out), "--dim", "4", "--min_diff", "0"]) == 0
    assert "their U-Nets differ only in the first convolution (conv_in)" in caplog.text
    lora = read_lora_file(out)
    assert any(name.startswith("lora_unet_") for name in lora.modules)
    assert lora.metadata["modelspec.architecture"] == "stable-diffusion-v1/inpaint/lora"


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("model, args, message", [
    ("sd1-inpainting", ["--image_path", "{init}"], r"--image_path without --mask_path: Stable Diffusion 1.x "
                                                   r"inpainting repaints the white area of a mask"),
    ("sd1", ["--mask_path", "{mask}"], r"--mask_path needs --image_path"),
    ("sd1-inpainting", ["--image_path", "{init}", "--mask_path", "{root}/missing.png"],
     r"--mask_path .*missing.png: no image file found"),
    ("sd1-inpainting", ["--image_path", "{init}", "--mask_path", "{mask_wide}"],
     r"--mask_path .*mask_wide.png: 64x32, but the image it goes with \(.*init.png\) is 64x64; inpainting masks "
     r"must have their image's aspect ratio"),
    ("sd2-512-depth", [], r"sd2-512-depth.safetensors is Stable Diffusion 2.x depth: every image needs its depth "
                          r"map; give --depth_path"),
    ("sd2-512-depth", ["--prompt", "a cat --cn {root}/gone.png"], r"--prompt: --cn .*gone.png: no such file"),
    ("sd1-extra", ["--condition_path", "{cond_rgb}"],
     r"--condition_path .*cond_rgb.png: a condition image with 3 channel\(s\).*the model takes 2 extra channel"),
    ("sd1", ["--depth_path", "{depth}"], r"--depth_path: .*sd1.safetensors is Stable Diffusion 1.x, which takes no "
                                         r"depth map; the flag is for an SD 2.x depth model"),
    ("sd2-512-depth", ["--depth_path", "{depth}", "--image_path", "{init}", "--mask_path", "{mask}"],
     r"--mask_path: .* is Stable Diffusion 2.x depth, which does not inpaint"),
    ("sd1-inpainting", ["--bf16", "--no_half_vae"], r"--no_half_vae: the inpainting and depth2img pipelines"),
    ("sd1", ["--strength", "0.5"], r"--strength needs --image_path"),
])
def test_bad_input_is_refused_by_flag_and_file_with_nothing_written(files, tmp_path, model, args, message):
    names = {key: str(value) for key, value in files.items()}
    names["root"] = str(tmp_path)
    argv = [a.format(**names) for a in args]
    if "--prompt" not in argv:
        argv += ["--prompt", "a cat --d 1"]
    with pytest.raises(SystemExit) as exited:
        run(files, tmp_path, model, *argv)
    assert str(exited.value.code).startswith("error:")
    assert __import__("re").search(message, str(exited.value.code)), exited.value.code
    assert nothing_written(tmp_path)


# ------------------------------------------------------------------ trained models, and their training samples


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """train_db, 2 steps, on a tiny inpainting and a tiny depth model, with a sample image after the last step:
    the saved models and their samples (prompt files with kohya's --cn naming the depth model's map)."""
    from tests.recipe_helpers import run_script, tiny_workspace

    models = {"sd1-inpainting": "inpaint.safetensors", "sd2-512-depth": "depth.safetensors"}
    root = tiny_workspace(tmp_path_factory.mktemp("trained"), images=2, folder="1_sks shape", models=models)
    (root / "depth").mkdir()
    for path in (root / "data" / "1_sks shape").glob("*.png"):
        Image.open(path).convert("L").save(root / "depth" / path.name)  # any map: the photo's luminance
    Image.open(next((root / "depth").glob("*.png"))).resize((64, 64)).save(root / "sample_depth.png")
    line = f"a red circle --n {NEGATIVE} --w 64 --h 64 --s 3 --l 5 --d 4 --ss euler_a"
    (root / "inpaint_prompts.txt").write_text(line + "\n")
    (root / "depth_prompts.txt").write_text(f"{line} --cn {root / 'sample_depth.png'}\n")
    out = {}
    for model, prompts, extra in (("sd1-inpainting", "inpaint_prompts.txt", []),
                                  ("sd2-512-depth", "depth_prompts.txt", ["--conditioning_data_dir", root / "depth"])):
        run_script("train_db", train_db_args(root, model, models[model], prompts) + [str(a) for a in extra])
        out[model] = root / model / "model.safetensors"
        (out[f"{model}_sample"],) = (root / model / "sample").glob("*.png")
    out["root"] = root
    return out


def train_db_args(root, model: str, file: str, prompts: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(root / file), "--train_data_dir", str(root / "data"),
            "--output_dir", str(root / model), "--output_name", "model", "--resolution", "64", "--seed", "5",
            "--train_batch_size", "2", "--max_train_steps", "2", "--learning_rate", "1e-4",
            "--max_data_loader_n_workers", "0", "--sample_prompts", str(root / prompts), "--sample_every_n_steps",
            "2"]


def gen_trained(trained, tmp_path, model: str, *args, outdir: str):
    argv = ["--ckpt", str(trained[model]), "--outdir", str(tmp_path / outdir), "--W", "64", "--H", "64",
            "--steps", "3", "--scale", "5", "--sampler", "euler_a", "--prompt", f"a red circle --n {NEGATIVE} --d 4"]
    return gen_img.run(gen_img.setup_parser().parse_args(argv + [str(a) for a in args]))


@pytest.mark.numbers
def test_trained_inpainting_model_inpaints_in_diffusers_as_in_gen_img(trained, files, tmp_path):
    """The model train_db saved, read by diffusers' StableDiffusionInpaintPipeline.from_single_file (with the config
    folder of the file), inpaints as gen_img does; and the training sample (made from the prompt alone, the whole
    image masked) is what gen_img makes of the saved model without --image_path."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInpaintPipeline

    from library.checkpoint_writer import write_config_folder
    from library.sd_checkpoint import read_checkpoint

    (path,) = gen_trained(trained, tmp_path, "sd1-inpainting", "--image_path", files["init"], "--mask_path",
                          files["mask"], outdir="inpaint")
    with read_checkpoint(trained["sd1-inpainting"]) as checkpoint:
        assert checkpoint.family.name == "sd1-inpainting"
        write_config_folder(checkpoint, tmp_path / "config")
    pipe = StableDiffusionInpaintPipeline.from_single_file(str(trained["sd1-inpainting"]),
                                                           config=str(tmp_path / "config"), local_files_only=True)
    pipe.scheduler = EulerAncestralDiscreteScheduler(prediction_type="epsilon", steps_offset=1, **KOHYA_SCHEDULE)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("a red circle", negative_prompt=NEGATIVE, image=rgb(files["init"]),
                  mask_image=Image.open(files["mask"]), strength=1.0, width=64, height=64, num_inference_steps=3,
                  guidance_scale=5.0, generator=generators(4)[0]).images[0]
    assert_images_close(pixels(path), theirs, what="trained inpainting model: gen_img vs diffusers")
    (from_text,) = gen_trained(trained, tmp_path, "sd1-inpainting", outdir="text")
    # The same generation code, weights and seed (the sampler's in-memory fp32 U-Net is what was saved): equal.
    assert np.array_equal(pixels(trained["sd1-inpainting_sample"]), pixels(from_text))


@pytest.mark.numbers
def test_depth_model_samples_with_the_map_its_prompt_names(trained, tmp_path):
    """A depth model's training sample uses the map of its prompt's --cn: the image gen_img makes of the saved model
    with that map as --depth_path (no --image_path: mid-gray start at strength 1)."""
    (path,) = gen_trained(trained, tmp_path, "sd2-512-depth", "--depth_path", trained["root"] / "sample_depth.png",
                          outdir="depth")
    assert np.array_equal(pixels(trained["sd2-512-depth_sample"]), pixels(path))  # the same code and weights


@pytest.mark.parametrize("model, file, line, message", [
    ("sd2-512-depth", "depth.safetensors", "a cat --d 1",
     r"prompts.txt line 1: a sample of Stable Diffusion 2.x depth needs its depth map: add --cn <image file>"),
    ("sd1-extra", "extra.safetensors", "a cat --d 1 --cn {root}/rgb.png",
     r"prompts.txt line 1: --cn .*rgb.png: a condition image with 3 channel\(s\).*2 extra channel"),
], ids=["depth without --cn", "condition with 3 bands"])
def test_sample_prompts_without_their_condition_image_are_refused(trained, model, file, line, message):
    from tests.recipe_helpers import run_script
    from tools.make_tiny_model import main as make_model

    root = trained["root"]
    if not (root / file).exists():
        assert make_model(["--family", model, str(root / file)]) == 0
    Image.new("RGB", (64, 64), (10, 200, 30)).save(root / "rgb.png")
    (root / "prompts.txt").write_text(line.format(root=root) + "\n")
    extra = ["--conditioning_data_dir", str(root / ("depth" if model == "sd2-512-depth" else "cond"))]
    if model == "sd1-extra" and not (root / "cond").exists():
        (root / "cond").mkdir()
        for path in (root / "data" / "1_sks shape").glob("*.png"):
            rgb_image = Image.open(path).convert("RGB")
            Image.merge("LA", (rgb_image.convert("L"), rgb_image.getchannel("B"))).save(root / "cond" / path.name)
    args = train_db_args(root, f"bad_{model}", file, "prompts.txt") + extra
    with pytest.raises(SystemExit) as exited:
        run_script("train_db", args)
    assert __import__("re").search(message, str(exited.value.code)), exited.value.code
    assert not (root / f"bad_{model}" / "model.safetensors").exists()
    assert not list((root / f"bad_{model}").glob("sample/*.png"))
