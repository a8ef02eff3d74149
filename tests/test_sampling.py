"""Sample-image generation: prompt files, sampler names, and parity with diffusers' own pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from library.families import SD1, SD2_768_V
from library.prompt_files import PromptFileError, SamplePrompt, load_prompts
from library.samplers import SAMPLER_ALIASES, SAMPLERS, make_scheduler
from library.sampling import generate, save_png, webui_parameters
from library.tiny_models import build_tiny_models
from library.text_conditioning import CaptionEncoding
from tests.numerics import assert_images_close


def test_txt_prompt_file_with_kohya_options(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# comment\n\na red circle --n blurry, ugly --w 100 --h 72 --d 5 --l 4.5 --s 12 --ss euler_a\n"
                    "plain prompt\n")
    first, second = load_prompts(path, SamplePrompt("", width=64, height=64))
    assert first == SamplePrompt("a red circle", "blurry, ugly", 96, 72, 5, 4.5, 12, "euler_a")
    assert second == SamplePrompt("plain prompt", width=64, height=64)


def test_malformed_option_names_the_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("ok prompt\nbad prompt --w wide\n")
    with pytest.raises(PromptFileError, match="line 2.*--w"):
        load_prompts(path)
    path.write_text("x --zz 3\n")
    with pytest.raises(PromptFileError, match="line 1.*--zz"):
        load_prompts(path)


def test_toml_and_json_prompt_files(tmp_path):
    toml_file = tmp_path / "p.toml"
    toml_file.write_text('[prompt]\nwidth = 64\nheight = 64\nsample_steps = 5\n\n[[prompt.subset]]\n'
                         'prompt = "a cat"\nseed = 3\n\n[[prompt.subset]]\nprompt = "a dog"\nscale = 2.0\n')
    prompts = load_prompts(toml_file)
    assert [p.prompt for p in prompts] == ["a cat", "a dog"]
    assert prompts[0].steps == 5 and prompts[0].width == 64 and prompts[0].seed == 3 and prompts[1].scale == 2.0
    json_file = tmp_path / "p.json"
    json_file.write_text(json.dumps(["just text", {"prompt": "x", "negative_prompt": "y", "width": 130}]))
    a, b = load_prompts(json_file)
    assert a.prompt == "just text" and (b.negative_prompt, b.width) == ("y", 128)
    json_file.write_text(json.dumps([{"prompt": "x", "widht": 3}]))
    with pytest.raises(PromptFileError, match="widht"):
        load_prompts(json_file)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_models(SD1, seed=4)


@pytest.mark.numbers
def test_generate_matches_diffusers_pipeline(tiny):
    from diffusers import StableDiffusionPipeline

    prompt = SamplePrompt("a red circle", "blurry", width=64, height=64, steps=4, scale=5.0)
    ours = generate(prompt, models=tiny, scheduler=make_scheduler("ddim", "epsilon"), seed=11)
    pipe = StableDiffusionPipeline(vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer,
                                   unet=tiny.unet, scheduler=make_scheduler("ddim", "epsilon"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    theirs = pipe("a red circle", negative_prompt="blurry", width=64, height=64, num_inference_steps=4,
                  guidance_scale=5.0, generator=torch.Generator().manual_seed(11)).images[0]
    assert ours.size == (64, 64)
    assert_images_close(ours, theirs, what="sample vs diffusers' pipeline")  # same models, other text encoding code
    again = generate(prompt, models=tiny, scheduler=make_scheduler("ddim", "epsilon"), seed=11)
    assert np.array_equal(np.asarray(ours), np.asarray(again))


@pytest.mark.parametrize("name", list(SAMPLERS) + list(SAMPLER_ALIASES))
def test_every_sampler_name_runs(tiny, name):
    image = generate(SamplePrompt("a cat", width=64, height=64, steps=3), models=tiny,
                     scheduler=make_scheduler(name, "epsilon"), seed=1)
    assert image.size == (64, 64)


def test_v_prediction_scheduler_and_long_prompt():
    models = build_tiny_models(SD2_768_V, seed=2)
    scheduler = make_scheduler("euler", "v_prediction")
    assert scheduler.config.prediction_type == "v_prediction"
    image = generate(SamplePrompt(" ".join(["word"] * 100), width=64, height=64, steps=2), models=models,
                     scheduler=scheduler, seed=0, encoding=CaptionEncoding(max_token_length=150, clip_skip=2))
    assert image.size == (64, 64)


def test_png_carries_webui_parameters(tmp_path):
    prompt = SamplePrompt("a cat", "dog", width=64, height=64, steps=7, scale=6.0)
    text = webui_parameters(prompt, sampler="euler_a", seed=42, model_name="tiny")
    path = save_png(Image.new("RGB", (64, 64)), tmp_path / "sample" / "x.png", text)
    assert Image.open(path).text["parameters"] == ("a cat\nNegative prompt: dog\nSteps: 7, Sampler: euler_a, "
                                                   "CFG scale: 6.0, Seed: 42, Size: 64x64, Model: tiny")


@pytest.fixture(scope="module")
def tiny_sdxl():
    from library.families import SDXL, SDXL_REFINER

    return {"sdxl": build_tiny_models(SDXL, seed=4), "sdxl-refiner": build_tiny_models(SDXL_REFINER, seed=4)}


@pytest.mark.numbers
@pytest.mark.parametrize("negative", ["blurry", ""])
def test_sdxl_samples_match_diffusers_sdxl_pipeline(tiny_sdxl, negative):
    """The shared sampler on SDXL (our conditioning: both encoders, pooled, size ids) against diffusers'
    StableDiffusionXLPipeline encoding the prompt itself; an empty negative prompt is all zeros in both."""
    from library.sampling import family_pipeline, generate_images

    models = tiny_sdxl["sdxl"]
    prompt = SamplePrompt("a red circle", negative, width=64, height=64, steps=3, scale=5.0)
    ours = generate_images([prompt], [11], models=models, scheduler=make_scheduler("euler", "epsilon"))[0]
    pipe = family_pipeline(models, make_scheduler("euler", "epsilon"))
    theirs = pipe("a red circle", negative_prompt=negative or None, width=64, height=64, num_inference_steps=3,
                  guidance_scale=5.0, generator=torch.Generator().manual_seed(11)).images[0]
    assert_images_close(ours, theirs, what="SDXL sample vs diffusers' SDXL pipeline")
    other = generate_images([replace_prompt(prompt, "a blue square")], [11], models=models,
                            scheduler=make_scheduler("euler", "epsilon"))[0]
    assert np.abs(np.asarray(other, np.int16) - np.asarray(ours, np.int16)).mean() > 1  # the prompt matters


def replace_prompt(prompt, text):
    from dataclasses import replace

    return replace(prompt, prompt=text)


@pytest.mark.numbers
@pytest.mark.parametrize("family", ["sdxl", "sdxl-refiner"])
def test_sdxl_img2img_matches_diffusers(tiny_sdxl, family):
    """img2img (the refiner's only mode): our conditioning (refiner: aesthetic-score time ids) vs diffusers'."""
    from library.sampling import family_pipeline, generate_images

    models = tiny_sdxl[family]
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    prompt = SamplePrompt("a red circle", "blurry", width=64, height=64, steps=4, scale=5.0, strength=0.6)
    ours = generate_images([prompt], [3], models=models, scheduler=make_scheduler("euler", "epsilon"),
                           init_images=[init])[0]
    pipe = family_pipeline(models, make_scheduler("euler", "epsilon"), img2img=True)
    theirs = pipe("a red circle", negative_prompt="blurry", image=init, strength=0.6, num_inference_steps=4,
                  guidance_scale=5.0, generator=torch.Generator().manual_seed(3)).images[0]
    assert_images_close(ours, theirs, what=f"{family} img2img vs diffusers")
