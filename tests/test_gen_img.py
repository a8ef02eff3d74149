"""gen_img.py on tiny models: images equal diffusers' own pipelines (txt2img, img2img, LoRA loaded with
`load_lora_weights`), merged LoRA equals applied, every sampler name runs, kohya's prompt options and seed rules,
WebUI's PNG text, v-prediction SD 2.x, and the bad inputs a user can fix."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import gen_img
from library.checkpoint_writer import SaveFormat, save_checkpoint
from library.families import SD1, SD2_768_V, SDXL
from library.model_loading import checkpoint_from_models
from library.prompt_files import SamplePrompt
from library.samplers import SAMPLER_ALIASES, SAMPLERS, make_scheduler
from library.sampling import encode_prompts, generate_images, plan_images
from library.tiny_models import build_tiny_models
from library.text_conditioning import CaptionEncoding, conditioner_for
from networks.lora import create_network
from tests.numerics import assert_images_close, assert_images_differ, assert_outputs_close

NEGATIVE = "blurry"
KOHYA_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny SD 1.x and SD 2.x 768-v models as original .safetensors (what gen_img reads) and as diffusers folders
    (what diffusers' pipelines read), two LoRA files with random non-zero weights, and an img2img input."""
    root = tmp_path_factory.mktemp("gen_img")
    out = {}
    for name, family in (("sd1", SD1), ("sd2v", SD2_768_V)):
        models = build_tiny_models(family, seed=3)
        checkpoint = checkpoint_from_models(models)
        out[name] = save_checkpoint(checkpoint, root / f"{name}.safetensors", SaveFormat.SAFETENSORS)
        out[f"{name}_diffusers"] = save_checkpoint(checkpoint, root / f"{name}_diffusers",
                                                   SaveFormat.DIFFUSERS_SAFETENSORS)
    models = build_tiny_models(SD1, seed=3)
    for lora_name, dim, alpha, extra, seed in (("lora_a", 4, 2.0, {"conv_dim": "4", "conv_alpha": "1"}, 0),
                                               ("lora_b", 2, 1.0, {}, 1)):
        torch.manual_seed(seed)
        network = create_network(1.0, dim, alpha, None, models.text_encoder, models.unet, **extra)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in network.loras:
                module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=generator) * 0.1)
        out[lora_name] = root / f"{lora_name}.safetensors"
        network.save_weights(out[lora_name], None, {"ss_network_dim": str(dim)})
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    out["init"] = root / "init.png"
    Image.fromarray(pixels).save(out["init"])
    return out


def run(files, tmp_path, *args, model="sd1", outdir="out"):
    """gen_img in-process (its `run`, as `main` does); returns the written paths."""
    argv = ["--ckpt", str(files[model]), "--outdir", str(tmp_path / outdir), "--W", "64", "--H", "64"]
    return gen_img.run(gen_img.setup_parser().parse_args(argv + [str(a) for a in args]))


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def diffusers_pipe(files, scheduler, *, model="sd1", img2img=False):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
    pipe = cls.from_pretrained(str(files[f"{model}_diffusers"]), local_files_only=True, safety_checker=None,
                               requires_safety_checker=False)
    pipe.scheduler = scheduler(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd_ddim(config):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(config, clip_sample=False)  # SD's own DDIM settings


def kohya_euler_a(config):
    from diffusers import EulerAncestralDiscreteScheduler

    # kohya gen_img.py's construction (its scheduler ignores the model's scheduler config)
    return EulerAncestralDiscreteScheduler(prediction_type=config.prediction_type, steps_offset=1, **KOHYA_SCHEDULE)


def generators(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


# ------------------------------------------------------------------ equality with diffusers' pipelines


@pytest.mark.numbers
@pytest.mark.parametrize("sampler, reference", [("ddim", sd_ddim), ("k_euler_a", kohya_euler_a)])
def test_txt2img_equals_diffusers_pipeline(files, tmp_path, sampler, reference):
    """Two images in one batch, seeds from --d; ancestral sampling draws each image's step noise from its seed."""
    paths = run(files, tmp_path, "--prompt", f"a red circle --n {NEGATIVE} --d 11,12", "--images_per_prompt", 2,
                "--batch_size", 2, "--steps", 4, "--scale", 5, "--sampler", sampler)
    assert [p.name for p in paths] == ["im_000000_11.png", "im_000001_12.png"]
    pipe = diffusers_pipe(files, reference)
    theirs = pipe("a red circle", negative_prompt=NEGATIVE, width=64, height=64, num_inference_steps=4,
                  guidance_scale=5.0, num_images_per_prompt=2, generator=generators(11, 12)).images
    for path, image in zip(paths, theirs):
        assert_images_close(pixels(path), image, what=f"{sampler} {path.name}")
    assert_images_differ(pixels(paths[0]), pixels(paths[1]), what="the batch's two seeds")


@pytest.mark.numbers
def test_img2img_equals_diffusers_pipeline(files, tmp_path):
    (path,) = run(files, tmp_path, "--prompt", f"a red circle --n {NEGATIVE} --d 5", "--steps", 5, "--strength",
                  0.6, "--image_path", files["init"])
    pipe = diffusers_pipe(files, sd_ddim, img2img=True)
    theirs = pipe("a red circle", negative_prompt=NEGATIVE, image=Image.open(files["init"]).convert("RGB"),
                  strength=0.6, num_inference_steps=5, guidance_scale=7.5, generator=generators(5)[0]).images[0]
    assert_images_close(pixels(path), theirs, what="img2img")
    assert "Denoising strength: 0.6" in Image.open(path).text["parameters"]


@pytest.mark.numbers
@torch.no_grad()
def test_lora_equals_diffusers_load_lora_weights(files):
    """Two LoRAs (one LoCon) at 0.7 / -0.4 applied by us vs loaded by diffusers+PEFT: fp32 images agree to 1e-5."""
    from networks.lora import create_network_from_weights

    models = build_tiny_models(SD1, seed=3)
    for name, multiplier in (("lora_a", 0.7), ("lora_b", -0.4)):
        network, weights = create_network_from_weights(multiplier, files[name], None, models.text_encoder,
                                                       models.unet, for_inference=True)
        network.apply_to(models.text_encoder, models.unet)
        network.load_state_dict(weights)
    prompt = SamplePrompt("a red circle", NEGATIVE, width=64, height=64, steps=4, scale=5.0)
    ours = generate_images([prompt], [7], models=models, scheduler=make_scheduler("euler_a", "epsilon"),
                           encoding=CaptionEncoding(weighted=True), output_type="np")[0]
    pipe = diffusers_pipe(files, kohya_euler_a)
    base = pipe("a red circle", negative_prompt=NEGATIVE, width=64, height=64, num_inference_steps=4,
                guidance_scale=5.0, generator=generators(7)[0], output_type="np").images[0]
    for name in ("lora_a", "lora_b"):
        pipe.load_lora_weights(str(files[name].parent), weight_name=files[name].name, adapter_name=name)
    pipe.set_adapters(["lora_a", "lora_b"], adapter_weights=[0.7, -0.4])
    theirs = pipe("a red circle", negative_prompt=NEGATIVE, width=64, height=64, num_inference_steps=4,
                  guidance_scale=5.0, generator=generators(7)[0], output_type="np").images[0]
    assert np.abs(ours - base).max() > 0.05  # the LoRAs matter...
    assert_outputs_close(ours, theirs, what="image with two LoRAs")  # ...and diffusers applies them as we do


def test_lora_merged_equals_applied_and_am_overrides(files, tmp_path):
    lora = ["--network_weights", files["lora_a"], files["lora_b"], "--network_mul", 0.7, -0.4]
    common = ["--prompt", "a red circle --d 7", "--steps", 4, "--scale", 5, "--sampler", "euler_a"]
    (applied,) = run(files, tmp_path, *common, *lora, outdir="applied")
    (merged,) = run(files, tmp_path, *common, *lora, "--network_merge", outdir="merged")
    (half,) = run(files, tmp_path, *common, *lora, "--network_merge_n_models", 1, outdir="half")
    (base,) = run(files, tmp_path, *common, outdir="base")
    assert np.abs(pixels(applied) - pixels(base)).max() > 10
    for other in (merged, half):
        assert np.abs(pixels(applied) - pixels(other)).max() <= 1  # fp32 rounding only
    # --am per prompt: multipliers 0 and 0 give the base model back
    (off,) = run(files, tmp_path, "--prompt", "a red circle --d 7 --am 0", *common[2:], *lora, outdir="off")
    assert np.abs(pixels(off) - pixels(base)).max() <= 1


# ------------------------------------------------------------------ samplers, prompts, seeds, PNG text


@torch.no_grad()
def test_every_sampler_name_gives_a_finite_image(files, tmp_path):
    names = list(SAMPLERS) + list(SAMPLER_ALIASES)
    models = build_tiny_models(SD1, seed=3)
    prompt = SamplePrompt("a cat", width=64, height=64, steps=3)
    for name in names:
        (image,) = generate_images([prompt], [1], models=models, scheduler=make_scheduler(name, "epsilon"),
                                   output_type="np")
        assert np.isfinite(image).all() and image.std() > 0.01, name
    # and through the script: --ss per prompt line, each image saying (in WebUI's name if it has one) which
    # sampler made it
    some = {"k_euler_a": "Euler a", "dpmsingle": "dpmsingle", "pndm": "PLMS", "dpm_2_a": "DPM2 a"}
    prompt_file = tmp_path / "samplers.txt"
    prompt_file.write_text("".join(f"a cat --ss {name} --d 1\n" for name in some))
    paths = run(files, tmp_path, "--from_file", prompt_file, "--steps", 3, "--batch_size", 4)
    for path, shown in zip(paths, some.values()):
        assert f"Sampler: {shown}," in Image.open(path).text["parameters"]
        assert pixels(path).std() > 1


@pytest.mark.numbers
def test_prompt_file_options_file_names_and_png_text(files, tmp_path):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("# comment\n\n"
                           "a (red:1.3) circle --n blurry, ugly --w 72 --h 64 --d 5 --l 4.5 --s 3\n"
                           "a square --d 8,9 --f square\n"
                           "a long prompt " + "word " * 100 + "--d 3 --s 2\n")
    paths = run(files, tmp_path, "--from_file", prompt_file, "--images_per_prompt", 2, "--clip_skip", 2,
                "--batch_size", 2)
    assert [p.name for p in paths] == ["im_000000_5.png", "im_000001_5.png", "square_000002.png",
                                       "square_000003.png", "im_000004_3.png", "im_000005_3.png"]
    first = Image.open(paths[0])
    assert first.size == (72, 64)
    assert first.text["parameters"] == ("a (red:1.3) circle\nNegative prompt: blurry, ugly\nSteps: 3, Sampler: DDIM, "
                                        "CFG scale: 4.5, Seed: 5, Size: 72x64, Model: sd1, Clip skip: 2")
    assert np.array_equal(pixels(paths[0]), pixels(paths[1]))  # kohya: a --d list that runs out repeats its last
    assert "Seed: 9" in Image.open(paths[3]).text["parameters"]
    # A second run numbers on instead of overwriting.
    again = run(files, tmp_path, "--prompt", "a (red:1.3) circle --n blurry, ugly --w 72 --h 64 --d 5 --l 4.5 --s 3",
                "--clip_skip", 2)
    assert again[0].name == "im_000006_5.png"
    # The same prompt and seed, alone instead of in a batch of 2: the same image up to rounding.
    assert_images_close(pixels(again[0]), pixels(paths[0]), what="one image alone vs in a batch")


@pytest.mark.numbers
def test_weighted_and_long_prompts_reach_the_pipeline(files, tmp_path):
    """A weighted 100-word prompt is encoded in two CLIP windows with WebUI's weighting: the image equals
    diffusers' pipeline given exactly those embeddings."""
    from diffusers import StableDiffusionPipeline

    text = "a (red:1.4) [blue] circle " + "word " * 100
    (path,) = run(files, tmp_path, "--prompt", f"{text}--d 4", "--steps", 3)
    models = build_tiny_models(SD1, seed=3)
    conditioner = conditioner_for(models.family, models.tokenizers, models.text_encoders,
                                  CaptionEncoding(max_token_length=150, weighted=True))
    embeds = encode_prompts([text.strip(), ""], [None, None], conditioner).hidden_states
    assert embeds.shape[1] == 152
    pipe = StableDiffusionPipeline.from_pretrained(str(files["sd1_diffusers"]), local_files_only=True,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = sd_ddim(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:], width=64, height=64,
                  num_inference_steps=3, generator=generators(4)[0]).images[0]
    assert_images_close(pixels(path), theirs, what="weighted 150-token prompt")


def test_seed_plan_follows_kohya():
    one = [SamplePrompt("a")]
    assert [j.seed for j in plan_images(one, seed=42)] == [42]  # a single image uses --seed itself
    rng = random.Random(42)
    expected = [rng.randint(0, 2 ** 32 - 1) for _ in range(4)]
    two = [SamplePrompt("a"), SamplePrompt("b")]
    assert [j.seed for j in plan_images(two, images_per_prompt=2, seed=42)] == expected
    mixed = [SamplePrompt("a", seed=1, extra_seeds=(2,)), SamplePrompt("b")]
    jobs = plan_images(mixed, images_per_prompt=3, seed=42)
    assert [j.seed for j in jobs] == [1, 2, 2] + expected[:3]  # --d seeds draw nothing from the generator
    assert [j.index for j in jobs] == list(range(6))


@pytest.mark.numbers
def test_batch_size_does_not_change_images(files, tmp_path):
    common = ["--prompt", "a red circle", "--seed", 3, "--images_per_prompt", 3, "--steps", 3, "--sampler", "euler_a"]
    one = run(files, tmp_path, *common, outdir="b1")
    three = run(files, tmp_path, *common, "--batch_size", 3, outdir="b3")
    assert [p.name for p in one] == [p.name for p in three]
    for a, b in zip(one, three):
        assert_images_close(pixels(a), pixels(b), what=f"{a.name} alone vs in a batch of 3")


# ------------------------------------------------------------------ SD 2.x v-prediction, precision


@pytest.mark.numbers
def test_v_prediction_sd2_equals_diffusers(files, tmp_path):
    (path,) = run(files, tmp_path, "--prompt", "a red circle --d 2", "--steps", 3, "--sampler", "ddim", "--v2",
                  model="sd2v")
    pipe = diffusers_pipe(files, sd_ddim, model="sd2v")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    theirs = pipe("a red circle", width=64, height=64, num_inference_steps=3, generator=generators(2)[0]).images[0]
    assert_images_close(pixels(path), theirs, what="SD 2.x v-prediction")


def test_bf16_runs_and_fp16_is_refused_on_cpu(files, tmp_path):
    (path,) = run(files, tmp_path, "--prompt", "a red circle --d 2", "--steps", 2, "--bf16")
    assert pixels(path).std() > 1
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--fp16 needs a CUDA GPU"):
            run(files, tmp_path, "--prompt", "x", "--fp16")


@pytest.mark.numbers
@pytest.mark.parametrize("family", [SD1, SDXL], ids=["sd1", "sdxl"])
@pytest.mark.parametrize("img2img", [False, True], ids=["txt2img", "img2img"])
def test_vae_apart_from_the_pipeline_matches_the_pipelines_own_vae_steps(family, img2img):
    """--no_half_vae runs the VAE on its own (encode for img2img, decode), outside the pipeline; on one precision
    both paths must give the same image, so the VAE steps (scaling, posterior sample from each image's generator
    before the noise) are the pipelines' own. Same ops on the same inputs: measured equal to the last bit; the
    image tolerance (1e-5 of the range) leaves room for a reordered batch reduction."""
    models = build_tiny_models(family, seed=3)
    prompts = [SamplePrompt("a red circle", NEGATIVE, width=64, height=64, steps=3, scale=5.0,
                            strength=0.6 if img2img else None)] * 2
    init = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)) for i in (0, 1)]
    kwargs = dict(models=models, scheduler=make_scheduler("euler_a", "epsilon"), output_type="np",
                  init_images=init if img2img else None)
    inside = np.stack(generate_images(prompts, [7, 8], vae_apart=False, **kwargs))
    apart = np.stack(generate_images(prompts, [7, 8], vae_apart=True, **kwargs))
    assert np.abs(inside[0] - inside[1]).max() > 0.05  # two seeds, two images
    assert_outputs_close(apart, inside, rel=1e-5, what="VAE apart vs inside the pipeline")


def test_no_half_vae_keeps_the_vae_in_fp32_outside_autocast(files, tmp_path, monkeypatch):
    """gen_img --bf16 --no_half_vae: the U-Net runs in bf16, the VAE decodes fp32 latents with fp32 weights and no
    autocast (which would put its convolutions back in bf16); without the flag the VAE is bf16."""
    from diffusers import AutoencoderKL

    seen, latents = [], []
    decode = AutoencoderKL.decode

    def spy(self, z, *args, **kwargs):
        seen.append((self.dtype, z.dtype, torch.is_autocast_enabled("cpu")))
        latents.append(z.clone())
        return decode(self, z, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "decode", spy)
    (fp32_vae,) = run(files, tmp_path, "--prompt", "a red circle --d 2", "--steps", 2, "--bf16", "--no_half_vae",
                      outdir="fp32_vae")
    (bf16_vae,) = run(files, tmp_path, "--prompt", "a red circle --d 2", "--steps", 2, "--bf16", outdir="bf16_vae")
    assert seen == [(torch.float32, torch.float32, False), (torch.bfloat16, torch.bfloat16, False)]
    # The U-Net's work is the same in both runs (bf16, same seed): the fp32 VAE gets those latents, unscaled in fp32
    # (the bf16 VAE's are unscaled in bf16, which is the fp32 quotient rounded).
    assert torch.equal(latents[0].to(torch.bfloat16), latents[1])
    assert not np.array_equal(pixels(fp32_vae), pixels(bf16_vae))  # ...and decodes them in another precision


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("line, message", [
    ("ok prompt\nbad prompt --w wide\n", r"line 2: bad value for --w"),
    ("x --zz 3\n", r"line 1: unknown option '--zz'"),
    ("\n# c\nx --dsd1 3\n", r"line 3: --dsd1 \(Deep Shrink"),
    ("x --t 1.5\n", r"line 1: bad value for --t"),
    ("x --am 0.5\n", r"line 1: --am needs networks"),
    ("\n# only a comment\n", r"no prompts in the file"),
])
def test_malformed_prompt_file_names_the_line(files, tmp_path, line, message):
    prompt_file = tmp_path / "bad.txt"
    prompt_file.write_text(line)
    with pytest.raises(SystemExit, match=message):
        run(files, tmp_path, "--from_file", prompt_file, "--image_path", files["init"])


def test_command_line_exit_status(files, tmp_path, monkeypatch):
    """`python gen_img.py`: exit status 0 with the images written, a one-line error (status 1) otherwise. The script
    runs as __main__ in this process (runpy), so its own `sys.exit(main())` line is what is tested, without a fresh
    interpreter's import time; a SystemExit with a message is what the interpreter prints and exits 1 with."""
    import runpy

    script = str(Path(gen_img.__file__))
    common = [script, "--ckpt", str(files["sd1"]), "--W", "64", "--H", "64", "--steps", "2"]

    def exit_code(argv: list[str]):
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as exited:
            runpy.run_path(script, run_name="__main__")
        return exited.value.code

    assert exit_code(common + ["--outdir", str(tmp_path / "ok"), "--prompt", "a red circle --d 1"]) == 0
    assert len(list((tmp_path / "ok").glob("*.png"))) == 1
    (tmp_path / "empty.txt").write_text("# nothing\n")
    message = exit_code(common + ["--outdir", str(tmp_path / "bad"), "--from_file", str(tmp_path / "empty.txt")])
    assert isinstance(message, str) and message.startswith("error: --from_file") and "no prompts" in message


@pytest.mark.parametrize("args, message", [
    (["--v2"], "--v2 was given, but the weights are an SD 1.x model"),
    (["--sampler", "dpm_fast"], "unknown sampler 'dpm_fast'"),
    (["--network_weights", "missing.safetensors"], "no such file"),
    (["--network_weights", "A", "B", "--network_mul", "0.5"], "1 --network_mul values for 2"),
    (["--negative_scale", "4", "--scale", "1"], "a negative scale .* raise --scale / --l above 1"),
    (["--W", "100"], "--W 100: use a multiple of 8"),
])
def test_bad_options_are_one_line_errors(files, tmp_path, args, message):
    with pytest.raises(SystemExit, match=message):
        run(files, tmp_path, "--prompt", "x", *args)


def test_lora_of_another_family_is_refused(files, tmp_path):
    """An SD 1.x LoRA on an SD 2.x model: same module names, other widths."""
    with pytest.raises(SystemExit, match="lora_a.safetensors"):
        run(files, tmp_path, "--prompt", "x", "--network_weights", files["lora_a"], model="sd2v")


@pytest.mark.numbers
def test_textual_inversion_embedding_equals_diffusers_load_textual_inversion(files, tmp_path):
    """--textual_inversion_embeddings: the file's name is the prompt word (a 2-vector embedding here), and the image
    equals diffusers' pipeline with the same file loaded by load_textual_inversion."""
    from library.textual_inversion import save_embedding

    torch.manual_seed(3)
    embedding = save_embedding(tmp_path / "qzxw.safetensors", torch.randn(2, 32) * 0.5, token_string="qzxw", step=0)
    paths = run(files, tmp_path, "--prompt", "a qzxw circle --d 5", "--steps", 3, "--sampler", "ddim",
                "--textual_inversion_embeddings", embedding)
    pipe = diffusers_pipe(files, sd_ddim)
    pipe.load_textual_inversion(str(embedding), token="qzxw")
    theirs = pipe("a qzxw circle", width=64, height=64, num_inference_steps=3, generator=generators(5)).images[0]
    assert_images_close(pixels(paths[0]), theirs, what="textual-inversion embedding")
    plain = run(files, tmp_path, "--prompt", "a qzxw circle --d 5", "--steps", 3, "--sampler", "ddim",
                outdir="plain")
    assert_images_differ(pixels(plain[0]), pixels(paths[0]), what="the embedding's word")
