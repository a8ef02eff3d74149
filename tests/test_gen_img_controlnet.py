"""gen_img.py's ControlNet guidance (kohya's --control_net_models, --control_net_preps, --control_net_multipliers,
--control_net_ratios, --guide_image_path; library/guidance.py) on tiny models: images equal diffusers' own
StableDiffusionControlNetPipeline / ...Img2ImgPipeline / StableDiffusionXLControlNetPipeline (several ControlNets:
MultiControlNetModel) loaded independently from diffusers folders, for ControlNet files in the layouts this suite
writes (the original single file train_controlnet.py saves for SD 1.x, diffusers names for SDXL); a ratio guides
exactly the steps kohya's rule guides; with the highres fix ControlNet guides both stages or the first only; and bad
input is refused by flag.

Tolerance: diffusers' pipelines encode the prompts themselves, we with library/text_conditioning.py, two
implementations of the same math: tests/numerics.py's image tolerance (4 levels per channel, 0.5 on average), as in
tests/test_gen_img.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import gen_img
from library.checkpoint_writer import SaveFormat, save_checkpoint
from library.controlnet_checkpoint import controlnet_checkpoint, save_controlnet_diffusers, save_controlnet_file
from library.families import SD1, SDXL
from library.guidance import guidance_end, preprocessor, steps_run
from library.model_loading import checkpoint_from_models
from library.samplers import make_scheduler
from library.tiny_models import build_tiny_models
from tests.numerics import assert_images_close, assert_images_differ

NEGATIVE = "blurry"
# A ControlNet made by ControlNetModel.from_unet starts with zero convolutions that add nothing (its residual
# outputs, and the last layer of the guide-image encoder): their weights are perturbed so much that the ControlNet
# visibly moves the image (a trained ControlNet's are not zero either). The guide-image encoder's default
# initialisation shrinks a [0, 1] image to almost nothing over its 7 convolutions (measured: two unrelated guide
# images 2 % apart in its output); with its weights doubled they are 94 % apart, so the guide image matters.
ZERO_CONV_NOISE = 0.3
ZERO_CONVS = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
HINT_ENCODER_GAIN = 2.0


def tiny_controlnet(family, seed: int):
    from diffusers import ControlNetModel

    model = ControlNetModel.from_unet(build_tiny_models(family, seed=5).unet)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            zero = any(part in name for part in ZERO_CONVS) and name.endswith("weight")
            param.add_(torch.randn(param.shape, generator=generator) * (ZERO_CONV_NOISE if zero else 0.02))
            if name.startswith("controlnet_cond_embedding.") and "conv_out" not in name and name.endswith("weight"):
                param.mul_(HINT_ENCODER_GAIN)
    return model.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny SD 1.x and SDXL models (single file for gen_img, diffusers folder for diffusers), two SD 1.x ControlNets
    and one SDXL ControlNet (the family's single file for gen_img, a diffusers folder for diffusers), guide images."""
    root = tmp_path_factory.mktemp("gen_img_controlnet")
    out = {}
    for name, family in (("sd1", SD1), ("sdxl", SDXL)):
        checkpoint = checkpoint_from_models(build_tiny_models(family, seed=5))
        out[name] = save_checkpoint(checkpoint, root / f"{name}.safetensors", SaveFormat.SAFETENSORS)
        out[f"{name}_diffusers"] = save_checkpoint(checkpoint, root / f"{name}_diffusers",
                                                   SaveFormat.DIFFUSERS_SAFETENSORS)
    for name, family, seed in (("cn_a", SD1, 1), ("cn_b", SD1, 2), ("cn_xl", SDXL, 3)):
        checkpoint = controlnet_checkpoint(tiny_controlnet(family, seed), family=family)
        out[name] = save_controlnet_file(checkpoint, root / f"{name}.safetensors")
        out[f"{name}_diffusers"] = save_controlnet_diffusers(checkpoint, root / f"{name}_diffusers")
    rng = np.random.default_rng(0)
    shapes = np.zeros((96, 96, 3), np.uint8)  # something with edges for canny
    shapes[20:70, 30:80] = (255, 200, 40)
    shapes[50:90, 10:40] = (30, 90, 250)
    for name, array in (("guide", rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)), ("shapes", shapes),
                        ("init", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))):
        out[name] = root / f"{name}.png"
        Image.fromarray(array).save(out[name])
    return out


def run(files, tmp_path, *args, model="sd1", outdir="out", size=64):
    argv = ["--ckpt", str(files[model]), "--outdir", str(tmp_path / outdir), "--W", size, "--H", size,
            "--steps", 4, "--scale", 5, "--sampler", "euler_a"]
    return gen_img.run(gen_img.setup_parser().parse_args([str(a) for a in argv + list(args)]))


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def controlnet_pipe(files, names, *, model="sd1", img2img=False):
    """diffusers' ControlNet pipeline of the model's diffusers folder with the ControlNets' diffusers folders."""
    import diffusers
    from diffusers import ControlNetModel

    family = SD1 if model == "sd1" else SDXL
    cls = getattr(diffusers, family.controlnet_img2img_pipeline_class if img2img else family.controlnet_pipeline_class)
    controlnets = [ControlNetModel.from_pretrained(str(files[f"{name}_diffusers"])) for name in names]
    extra = {"safety_checker": None, "requires_safety_checker": False} if model == "sd1" else {}
    pipe = cls.from_pretrained(str(files[f"{model}_diffusers"]), local_files_only=True,
                               controlnet=controlnets[0] if len(controlnets) == 1 else controlnets, **extra)
    pipe.scheduler = make_scheduler("euler_a", "epsilon")  # what gen_img builds for --sampler euler_a
    pipe.set_progress_bar_config(disable=True)
    return pipe


def guide(files, name="guide", size=64) -> Image.Image:
    return Image.open(files[name]).convert("RGB").resize((size, size), Image.LANCZOS)


@pytest.mark.numbers
def test_controlnet_equals_diffusers_pipeline(files, tmp_path):
    """The original-layout single file (what train_controlnet.py saves), two seeds in a batch, a multiplier; the
    96 px guide image is resized to the image's 64 px (kohya: LANCZOS; diffusers' control-image processor too)."""
    paths = run(files, tmp_path, "--prompt", f"a red circle --n {NEGATIVE} --d 11,12", "--images_per_prompt", 2,
                "--batch_size", 2, "--control_net_models", files["cn_a"], "--guide_image_path", files["guide"],
                "--control_net_multipliers", 0.8)
    pipe = controlnet_pipe(files, ["cn_a"])
    theirs = pipe("a red circle", negative_prompt=NEGATIVE, image=Image.open(files["guide"]).convert("RGB"),
                  width=64, height=64, num_inference_steps=4, guidance_scale=5.0, num_images_per_prompt=2,
                  controlnet_conditioning_scale=0.8, generator=[generator(11), generator(12)]).images
    for path, image in zip(paths, theirs):
        assert_images_close(pixels(path), image, what=f"ControlNet {path.name}")
    (plain,) = run(files, tmp_path, "--prompt", f"a red circle --n {NEGATIVE} --d 11", outdir="plain")
    assert_images_differ(pixels(plain), pixels(paths[0]), what="the ControlNet's guidance")
    (other,) = run(files, tmp_path, "--prompt", f"a red circle --n {NEGATIVE} --d 11", "--control_net_models",
                   files["cn_a"], "--guide_image_path", files["shapes"], "--control_net_multipliers", 0.8,
                   outdir="other")
    assert_images_differ(pixels(other), pixels(paths[0]), what="another guide image")
    # A prompt's --cn is its guide image (one ControlNet): the image --guide_image_path gave (made alone here, in a
    # batch of 2 there: equal up to rounding).
    (own,) = run(files, tmp_path, "--prompt", f"a red circle --n {NEGATIVE} --d 11 --cn {files['guide']}",
                 "--control_net_models", files["cn_a"], "--control_net_multipliers", 0.8, outdir="own")
    assert_images_close(pixels(own), pixels(paths[0]), what="--cn vs --guide_image_path")


@pytest.mark.numbers
def test_two_controlnets_preprocessor_ratio(files, tmp_path):
    """Two ControlNets (MultiControlNetModel: residuals added), each with its own guide image (given in order), the
    first through kohya's canny preprocessor and guiding the first half of the steps, the second at 0.6."""
    (path,) = run(files, tmp_path, "--prompt", f"a red circle --n {NEGATIVE} --d 5", "--control_net_models",
                  files["cn_a"], files["cn_b"], "--control_net_preps", "canny_50_150", "--control_net_ratios", 0.5,
                  "--control_net_multipliers", 1.0, 0.6, "--guide_image_path", files["shapes"], files["guide"])
    edges = preprocessor("canny_50_150")(guide(files, "shapes"))
    assert 0 < (np.asarray(edges) > 0).mean() < 0.5  # an edge map, not a blank or full image
    pipe = controlnet_pipe(files, ["cn_a", "cn_b"])
    theirs = pipe("a red circle", negative_prompt=NEGATIVE, image=[edges, guide(files)], width=64, height=64,
                  num_inference_steps=4, guidance_scale=5.0, controlnet_conditioning_scale=[1.0, 0.6],
                  control_guidance_end=[guidance_end(0.5, 4), 1.0], generator=generator(5)).images[0]
    assert_images_close(pixels(path), theirs, what="two ControlNets")


@pytest.mark.numbers
def test_controlnet_img2img_and_sdxl_equal_diffusers(files, tmp_path):
    (path,) = run(files, tmp_path, "--prompt", "a red circle --d 3", "--image_path", files["init"], "--strength", 0.75,
                  "--control_net_models", files["cn_a"], "--guide_image_path", files["guide"])
    pipe = controlnet_pipe(files, ["cn_a"], img2img=True)
    theirs = pipe("a red circle", image=Image.open(files["init"]).convert("RGB"), control_image=guide(files),
                  strength=0.75, num_inference_steps=4, guidance_scale=5.0, controlnet_conditioning_scale=1.0,
                  generator=generator(3)).images[0]
    assert_images_close(pixels(path), theirs, what="ControlNet img2img")
    # SDXL: the diffusers-named single file SDXL ControlNets ship as
    (path,) = run(files, tmp_path, "--prompt", f"a red circle --n {NEGATIVE} --d 3", "--control_net_models",
                  files["cn_xl"], "--guide_image_path", files["guide"], model="sdxl", outdir="sdxl")
    pipe = controlnet_pipe(files, ["cn_xl"], model="sdxl")
    theirs = pipe("a red circle", negative_prompt=NEGATIVE, image=guide(files), width=64, height=64,
                  num_inference_steps=4, guidance_scale=5.0, controlnet_conditioning_scale=1.0,
                  generator=generator(3)).images[0]
    assert_images_close(pixels(path), theirs, what="SDXL ControlNet")


@pytest.mark.parametrize("strength", [None, 0.8])
def test_ratio_guides_the_steps_kohya_guides(files, tmp_path, monkeypatch, strength):
    """kohya's --control_net_ratios r guides step i of the n run while i / n <= r (diffusers' control_guidance_end
    r would guide one step fewer here): 5 steps at 0.5 guide 3; img2img at strength 0.8 runs 4, of which 3."""
    from diffusers import ControlNetModel

    scales = []
    forward = ControlNetModel.forward

    def spy(self, *args, conditioning_scale=1.0, **kwargs):
        scales.append(conditioning_scale)
        return forward(self, *args, conditioning_scale=conditioning_scale, **kwargs)

    monkeypatch.setattr(ControlNetModel, "forward", spy)
    img2img = ["--image_path", files["init"], "--strength", strength] if strength else []
    run(files, tmp_path, "--prompt", "x --d 1", "--steps", 5, "--sampler", "euler", "--control_net_models",
        files["cn_a"], "--guide_image_path", files["guide"], "--control_net_ratios", 0.5,
        "--control_net_multipliers", 0.7, *img2img)
    assert scales == ([0.7] * 3 + [0.0] * 2 if strength is None else [0.7] * 3 + [0.0])
    assert steps_run(make_scheduler("heun", "epsilon"), 5) == 9  # Heun's 2 evaluations per step: n counts both


def test_guidance_end_is_kohyas_rule():
    for n in (1, 3, 4, 7, 10, 30):
        for ratio in (0.0, 0.1, 0.25, 1 / 3, 0.5, 0.7, 0.99, 1.0, 2.0):
            end = guidance_end(ratio, n)
            kohya = [not ratio < i / n for i in range(n)]
            diffusers = [not (i + 1) / n > end for i in range(n)]  # diffusers' keep rule (start 0)
            assert kohya == diffusers, (n, ratio)
    with pytest.raises(ValueError, match="at least 0"):
        guidance_end(-0.1, 4)


@pytest.mark.numbers
def test_highres_fix_with_controlnet(files, tmp_path):
    """ControlNet guides the first stage (guide image at 64 px) and, unless --highres_fix_disable_control_net, the
    second (at 128 px, the ControlNet img2img pipeline)."""
    common = ["--prompt", "a red circle --d 7", "--control_net_models", files["cn_a"], "--guide_image_path",
              files["guide"], "--highres_fix_scale", 0.5, "--highres_fix_steps", 3]
    (both,) = run(files, tmp_path, *common, size=128, outdir="both")
    (first_only,) = run(files, tmp_path, *common, "--highres_fix_disable_control_net", size=128, outdir="first")
    txt2img = controlnet_pipe(files, ["cn_a"])
    first = txt2img("a red circle", image=guide(files), width=64, height=64, num_inference_steps=3,
                    guidance_scale=5.0, controlnet_conditioning_scale=1.0, generator=generator(7)).images[0]
    enlarged = first.resize((128, 128), Image.LANCZOS)
    img2img = controlnet_pipe(files, ["cn_a"], img2img=True)
    theirs = img2img("a red circle", image=enlarged, control_image=guide(files, size=128), strength=0.8,
                     num_inference_steps=4, guidance_scale=5.0, controlnet_conditioning_scale=1.0,
                     generator=generator(8)).images[0]
    assert_images_close(pixels(both), theirs, what="highres fix, ControlNet in both stages")
    from diffusers import StableDiffusionImg2ImgPipeline

    plain = StableDiffusionImg2ImgPipeline(**{k: v for k, v in img2img.components.items() if k != "controlnet"})
    theirs = plain("a red circle", image=enlarged, strength=0.8, num_inference_steps=4, guidance_scale=5.0,
                   generator=generator(8)).images[0]
    assert_images_close(pixels(first_only), theirs, what="highres fix, ControlNet in the first stage only")


@pytest.mark.parametrize("args, message", [
    (["--guide_image_path", "G"], "--guide_image_path: for ControlNet guidance; give --control_net_models"),
    (["--control_net_models", "CN_A", "--control_net_multipliers", "1", "2"],
     "--control_net_multipliers: 2 values for 1 --control_net_models"),
    (["--control_net_models", "CN_A", "--control_net_preps", "sobel"], "--control_net_preps: unknown preprocessor "
                                                                        "'sobel'"),
    (["--control_net_models", "CN_A", "--control_net_ratios", "-1"], "--control_net_ratios: .* at least 0"),
    (["--control_net_models", "CN_A"], "every image needs a guide image: give --guide_image_path"),
    (["--control_net_models", "CN_A", "CN_B", "--guide_image_path", "G", "G", "G"],
     "3 images for 2 ControlNets: give a multiple of 2"),
    (["--control_net_models", "CN_XL", "--guide_image_path", "G"], "--control_net_models .*cn_xl.safetensors"),
    (["--control_net_models", "CN_A", "--guide_image_path", "G", "--highres_fix_disable_control_net"],
     "--highres_fix_disable_control_net is about the highres fix's second stage"),
    (["--highres_fix_disable_control_net"], "there is no ControlNet to disable"),
    (["--control_net_models", "CN_A", "--guide_image_path", "G", "--image_path", "G", "--mask_path", "G"],
     "not masked img2img"),
])
def test_bad_controlnet_options(files, tmp_path, args, message):
    names = {"G": files["guide"], "CN_A": files["cn_a"], "CN_B": files["cn_b"], "CN_XL": files["cn_xl"]}
    with pytest.raises(SystemExit, match=message):
        run(files, tmp_path, "--prompt", "x", *[names.get(a, a) for a in args])


def test_cn_prompt_option_needs_one_controlnet(files, tmp_path):
    with pytest.raises(SystemExit, match="--prompt: --cn names a ControlNet guide image"):
        run(files, tmp_path, "--prompt", f"x --cn {files['guide']}")
    with pytest.raises(SystemExit, match="--cn gives one guide image, for one ControlNet"):
        run(files, tmp_path, "--prompt", f"x --cn {files['guide']}", "--control_net_models", files["cn_a"],
            files["cn_b"], "--guide_image_path", files["guide"], files["guide"])
