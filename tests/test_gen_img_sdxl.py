"""gen_img.py on SDXL base and refiner (tiny models): the images equal diffusers' own SDXL pipelines for the same
seed and scheduler, kohya's size/crop options reach the model, and what cannot work is refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import gen_img
from library.checkpoint_writer import SaveFormat, save_checkpoint
from library.families import SD1, SDXL, SDXL_REFINER
from library.model_loading import checkpoint_from_models
from library.samplers import make_scheduler
from library.tiny_models import build_tiny_models
from tests.numerics import IMAGE_MAX_LEVELS, IMAGE_MEAN_LEVELS, assert_images_close


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen_img_sdxl")
    out = {}
    for name, family in (("sdxl", SDXL), ("refiner", SDXL_REFINER), ("sd1", SD1)):
        checkpoint = checkpoint_from_models(build_tiny_models(family, seed=6))
        out[name] = save_checkpoint(checkpoint, root / f"{name}.safetensors", SaveFormat.SAFETENSORS)
        out[f"{name}_diffusers"] = save_checkpoint(checkpoint, root / f"{name}_diffusers",
                                                   SaveFormat.DIFFUSERS_SAFETENSORS)
    out["init"] = root / "init.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(out["init"])
    return out


def run(files, tmp_path, *args, model="sdxl", outdir="out"):
    argv = ["--ckpt", str(files[model]), "--outdir", str(tmp_path / outdir), "--W", "64", "--H", "64",
            "--sampler", "euler", "--steps", "3", "--scale", "5"]
    return gen_img.run(gen_img.setup_parser().parse_args(argv + [str(a) for a in args]))


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def diffusers_pipe(files, model="sdxl"):
    import diffusers

    family = SDXL if model == "sdxl" else SDXL_REFINER
    pipe = getattr(diffusers, family.pipeline_class).from_pretrained(str(files[f"{model}_diffusers"]),
                                                                     local_files_only=True)
    pipe.scheduler = make_scheduler("euler", "epsilon")  # the scheduler gen_img builds for --sampler euler
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.numbers
def test_sdxl_image_equals_diffusers_pipeline(files, tmp_path):
    (path,) = run(files, tmp_path, "--prompt", "a red circle --n blurry --d 5")
    theirs = diffusers_pipe(files)("a red circle", negative_prompt="blurry", width=64, height=64,
                                   num_inference_steps=3, guidance_scale=5.0,
                                   generator=torch.Generator().manual_seed(5)).images[0]
    assert_images_close(pixels(path), theirs, what="gen_img SDXL vs StableDiffusionXLPipeline")
    (sdxl_flag,) = run(files, tmp_path, "--prompt", "a red circle --n blurry --d 5", "--sdxl", outdir="flag")
    assert np.array_equal(pixels(sdxl_flag), pixels(path))  # kohya's --sdxl only asserts the family


@pytest.mark.numbers
def test_size_and_crop_options_reach_the_model(files, tmp_path):
    """--ow/--oh/--ct/--cl and --nw/--nh (prompt options, or the --original_* / --crop_* flags) give what diffusers'
    pipeline gives for the same original_size / crops_coords_top_left / negative_original_size."""
    (plain,) = run(files, tmp_path, "--prompt", "a red circle --n blurry --d 5", outdir="plain")
    (sized,) = run(files, tmp_path, "--prompt", "a red circle --n blurry --d 5 --ow 2048 --oh 1536 --ct 32 --cl 16 "
                   "--nw 512 --nh 384", outdir="sized")
    (flags,) = run(files, tmp_path, "--prompt", "a red circle --n blurry --d 5", "--original_width", 2048,
                   "--original_height", 1536, "--crop_top", 32, "--crop_left", 16, "--original_width_negative", 512,
                   "--original_height_negative", 384, outdir="flags")
    assert np.array_equal(pixels(sized), pixels(flags))
    # A tiny random U-Net reacts weakly to its time ids (measured: 2 levels on average, 20+ at most), far less than
    # to a seed or prompt (assert_images_differ's bar), but beyond what assert_images_close tolerates: the
    # comparison below would notice ids that did not arrive or arrived wrong.
    difference = np.abs(pixels(sized) - pixels(plain))
    assert difference.max() > IMAGE_MAX_LEVELS and difference.mean() > IMAGE_MEAN_LEVELS
    theirs = diffusers_pipe(files)("a red circle", negative_prompt="blurry", width=64, height=64,
                                   num_inference_steps=3, guidance_scale=5.0, original_size=(1536, 2048),
                                   crops_coords_top_left=(32, 16), target_size=(64, 64),
                                   negative_original_size=(384, 512), negative_crops_coords_top_left=(32, 16),
                                   negative_target_size=(64, 64), generator=torch.Generator().manual_seed(5)).images[0]
    assert_images_close(pixels(sized), theirs, what="SDXL size conditioning vs diffusers")


@pytest.mark.numbers
def test_refiner_refines_an_image_like_diffusers_img2img(files, tmp_path):
    (path,) = run(files, tmp_path, "--prompt", "a red circle --n blurry --d 2", "--image_path", files["init"],
                  "--strength", 0.5, model="refiner")
    theirs = diffusers_pipe(files, "refiner")("a red circle", negative_prompt="blurry", image=Image.open(files["init"]),
                                              strength=0.5, num_inference_steps=3, guidance_scale=5.0,
                                              generator=torch.Generator().manual_seed(2)).images[0]
    assert_images_close(pixels(path), theirs, what="gen_img refiner vs StableDiffusionXLImg2ImgPipeline")


@pytest.fixture(scope="module")
def sdxl_lora(files, tmp_path_factory):
    """A LoCon file written by our network on the tiny SDXL model of `files` (random lora_up, so it does something)."""
    from networks.lora import create_network

    models = build_tiny_models(SDXL, seed=6)
    torch.manual_seed(0)
    network = create_network(1.0, 4, 2, None, models.text_encoders, models.unet, conv_dim="4", conv_alpha="1")
    with torch.no_grad():
        for name, param in network.named_parameters():
            if "lora_up" in name:
                param.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("sdxl_lora") / "style.safetensors"
    network.save_weights(path, None, {"ss_network_module": "networks.lora"})
    return path


@pytest.mark.numbers
def test_sdxl_lora_applied_or_merged_equals_diffusers_load_lora_weights(files, sdxl_lora, tmp_path):
    """A LoRA on both text encoders and the U-Net, applied and merged, gives what diffusers' pipeline gives after
    load_lora_weights (which reads kohya's SDXL names itself) at the same multiplier."""
    prompt = ["--prompt", "a red circle --n blurry --d 5"]
    lora = ["--network_module", "networks.lora", "--network_weights", sdxl_lora, "--network_mul", 0.8]
    (base,) = run(files, tmp_path, *prompt, outdir="base")
    (applied,) = run(files, tmp_path, *prompt, *lora, outdir="applied")
    (merged,) = run(files, tmp_path, *prompt, *lora, "--network_merge", outdir="merged")
    assert np.abs(pixels(applied) - pixels(base)).max() > 10  # the LoRA matters
    pipe = diffusers_pipe(files)
    pipe.load_lora_weights(str(sdxl_lora.parent), weight_name=sdxl_lora.name, adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[0.8])
    theirs = pipe("a red circle", negative_prompt="blurry", width=64, height=64, num_inference_steps=3,
                  guidance_scale=5.0, generator=torch.Generator().manual_seed(5)).images[0]
    assert_images_close(pixels(applied), theirs, what="gen_img SDXL + LoRA vs diffusers load_lora_weights")
    assert_images_close(pixels(merged), pixels(applied), what="SDXL LoRA merged vs applied")


@pytest.mark.numbers
def test_sdxl_embedding_equals_diffusers_load_textual_inversion(files, tmp_path):
    """An SDXL embedding file (clip_l and clip_g, two vectors each: WebUI's / ComfyUI's layout) gives the image
    diffusers gives after loading each tensor into its encoder, as diffusers documents for SDXL."""
    from library.safetensors_io import save_tensors

    models = build_tiny_models(SDXL, seed=6)
    widths = [encoder.get_input_embeddings().embedding_dim for encoder in models.text_encoders]
    generator = torch.Generator().manual_seed(3)
    vectors = {key: torch.randn(2, width, generator=generator) * 0.5 for key, width in zip(("clip_l", "clip_g"), widths)}
    path = tmp_path / "zwxq.safetensors"
    save_tensors(path, vectors, {})
    (with_word,) = run(files, tmp_path, "--prompt", "a zwxq circle --n blurry --d 5",
                       "--textual_inversion_embeddings", path, outdir="ti")
    (plain,) = run(files, tmp_path, "--prompt", "a circle --n blurry --d 5", outdir="plain")
    assert np.abs(pixels(with_word) - pixels(plain)).max() > 10  # the word matters
    pipe = diffusers_pipe(files)
    pipe.load_textual_inversion(vectors["clip_l"], token="zwxq", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(vectors["clip_g"], token="zwxq", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    theirs = pipe("a zwxq circle", negative_prompt="blurry", width=64, height=64, num_inference_steps=3,
                  guidance_scale=5.0, generator=torch.Generator().manual_seed(5)).images[0]
    assert_images_close(pixels(with_word), theirs, what="gen_img SDXL embedding vs diffusers load_textual_inversion")


@pytest.mark.parametrize("model, extra, needles", [
    ("refiner", [], ["refiner", "--image_path"]),
    ("sd1", ["--sdxl"], ["--sdxl was given", "Stable Diffusion 1.x"]),
    ("sd1", ["--original_width", 1024], ["SDXL size conditioning", "Stable Diffusion 1.x"]),
    ("sdxl", ["--clip_skip", 2], ["--clip_skip 2", "SDXL conditions on fixed layers"]),
    ("sdxl", ["--textual_inversion_embeddings", "sd1.pt"],
     ["--textual_inversion_embeddings", "sd1.pt", "one tensor per text encoder (clip_l, clip_g)", "string_to_param",
      "one-encoder model"]),
    ("sd1", ["--textual_inversion_embeddings", "sdxl.safetensors"],
     ["--textual_inversion_embeddings", "sdxl.safetensors", "several text encoders (clip_g, clip_l: SDXL)"]),
    ("sdxl", ["--textual_inversion_embeddings", "uneven.safetensors"],
     ["uneven.safetensors", "different numbers of vectors (clip_l: 2, clip_g: 1)"]),
])
def test_what_cannot_work_is_refused_by_name(files, tmp_path, model, extra, needles):
    if extra[:1] == ["--textual_inversion_embeddings"]:
        from library.safetensors_io import save_tensors

        extra = [extra[0], tmp_path / extra[1]]
        if extra[1].name == "sd1.pt":
            torch.save({"string_to_param": {"*": torch.zeros(1, 32)}}, extra[1])
        else:
            l_count = 2 if extra[1].name == "uneven.safetensors" else 1
            save_tensors(extra[1], {"clip_l": torch.zeros(l_count, 32), "clip_g": torch.zeros(1, 48)}, {})
    with pytest.raises(SystemExit) as info:
        run(files, tmp_path, "--prompt", "a cat", *extra, model=model)
    message = str(info.value.code)
    assert message.startswith("error:")
    for needle in needles:
        assert needle in message, message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_img2img_without_a_single_denoising_step_is_refused(files, tmp_path):
    """diffusers' img2img runs int(steps x strength) steps: 3 x 0.2 would be none (and fail deep inside the VAE)."""
    with pytest.raises(SystemExit, match="runs no denoising step"):
        run(files, tmp_path, "--prompt", "a cat", "--image_path", files["init"], "--strength", 0.2)
