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
from tests.numerics import assert_images_close, assert_images_differ

NEGATIVE = "blurry"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny SD 1.x (also as a diffusers folder), SD 1.x inpainting and SDXL models, two LoRAs of the SD 1.x model
    with random non-zero weights, img2img inputs and a mask."""
    from networks.lora import create_network

    root = tmp_path_factory.mktemp("gen_img_options")
    out = {}
    for name in ("sd1", "sd1-inpainting", "sdxl"):
        checkpoint = checkpoint_from_models(build_tiny_models(FAMILIES[name], seed=8))
        out[name] = save_checkpoint(checkpoint, root / f"{name}.safetensors", SaveFormat.SAFETENSORS)
        if name == "sd1":
            out["sd1_diffusers"] = save_checkpoint(checkpoint, root / "sd1_diffusers", SaveFormat.DIFFUSERS_SAFETENSORS)
    models = build_tiny_models(FAMILIES["sd1"], seed=8)
    for lora_name, dim, extra, seed in (("lora_a", 4, {"conv_dim": "4", "conv_alpha": "1"}, 0), ("lora_b", 2, {}, 1)):
        torch.manual_seed(seed)
        network = create_network(1.0, dim, 1.0, None, models.text_encoder, models.unet, **extra)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in network.loras:
                module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=generator) * 0.1)
        out[lora_name] = root / f"{lora_name}.safetensors"
        network.save_weights(out[lora_name], None, {"ss_network_dim": str(dim)})
    rng = np.random.default_rng(0)
    out["init"] = root / "init.png"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(out["init"])
    (root / "inputs").mkdir()
    for name in ("cat", "dog"):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "inputs" / f"{name}.jpg")
    out["inputs"] = root / "inputs"
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


@pytest.mark.numbers
@pytest.mark.parametrize("model", ["sd1", "sdxl"])
def test_negative_scale_collapses_to_plain_guidance(files, tmp_path, model):
    """kohya's U + s (T - U) - ns (N - U) (U: the empty prompt, N: the negative prompt) is plain CFG with an empty
    negative prompt at ns = 0, and plain CFG with the negative prompt, N + s (T - N), at ns = s - 1: both ends of
    the formula (affine in ns) against generations without a negative scale. In between it is neither."""
    def image(*args, outdir):
        return pixels(run(files, tmp_path, *args, model=model, outdir=outdir)[0])

    with_negative = image("--prompt", f"a red circle --n {NEGATIVE} --d 3", outdir="plain")
    without_negative = image("--prompt", "a red circle --d 3", outdir="empty")
    at_zero = image("--prompt", f"a red circle --n {NEGATIVE} --d 3", "--negative_scale", 0, outdir="zero")
    assert_images_close(at_zero, without_negative, what=f"{model} negative scale 0")
    at_s_minus_1 = image("--prompt", f"a red circle --n {NEGATIVE} --d 3 --nl 4", outdir="s-1")  # --scale 5
    assert_images_close(at_s_minus_1, with_negative, what=f"{model} negative scale = scale - 1")
    between = image("--prompt", f"a red circle --n {NEGATIVE} --d 3", "--negative_scale", 8, outdir="between")
    assert_images_differ(between, with_negative, what=f"{model} negative scale 8 vs plain CFG")
    assert_images_differ(between, without_negative, what=f"{model} negative scale 8 vs no negative prompt")
    # --nl none turns the run's --negative_scale off for that prompt
    off = image("--prompt", f"a red circle --n {NEGATIVE} --d 3 --nl none", "--negative_scale", 8, outdir="off")
    assert np.array_equal(off, with_negative)
    text = Image.open(run(files, tmp_path, "--prompt", f"a red circle --n {NEGATIVE} --d 3 --c a clip prompt",
                          "--negative_scale", 8, model=model, outdir="text")[0]).text
    assert "Negative scale: 8.0" in text["parameters"] and text["clip-prompt"] == "a clip prompt"


# ------------------------------------------------------------------ networks


def test_network_pre_calc_equals_applied(files, tmp_path, caplog):
    """--network_pre_calc merges the applied networks per batch at that batch's --am multipliers: the images of
    applied networks (merged W + dW is rounded once more than W and dW apart: 1 level at most, as merged vs applied
    in tests/test_gen_img.py). --network_show_meta logs each file's metadata."""
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a red circle --d 3 --am 0.7,-0.4\na blue square --d 4 --am 1.0,0.5\n")
    lora = ["--network_weights", files["lora_a"], files["lora_b"], "--from_file", prompt_file]
    applied = run(files, tmp_path, *lora, outdir="applied")
    with caplog.at_level("INFO", logger="gen_img"):
        pre_calc = run(files, tmp_path, *lora, "--network_pre_calc", "--network_show_meta", outdir="pre_calc")
    plain_file = tmp_path / "plain.txt"
    plain_file.write_text("a red circle --d 3\na blue square --d 4\n")
    base = run(files, tmp_path, "--from_file", plain_file, outdir="base")
    for a, b, plain in zip(applied, pre_calc, base):
        assert np.abs(pixels(a) - pixels(plain)).max() > 10  # the networks matter...
        assert np.abs(pixels(a) - pixels(b)).max() <= 1  # ...and pre-calculated they give the same images
    assert f"metadata of {files['lora_a']}: {{'ss_network_dim': '4'" in caplog.text


@torch.no_grad()
def test_pre_calculation_is_undone_exactly():
    """kohya's interface on our LoRANetwork: pre_calculation merges at the current multiplier and takes the LoRA
    forward off; restore_weights gives back the exact weights and the applied network."""
    from networks.lora import create_network

    models = build_tiny_models(FAMILIES["sd1"], seed=8)
    network = create_network(0.5, 4, 1.0, None, models.text_encoder, models.unet)
    for module in network.loras:
        module.lora_up.weight.normal_(0, 0.1)
    network.apply_to(models.text_encoder, models.unet)
    before = {k: v.clone() for k, v in models.unet.state_dict().items()}
    x, t, states = torch.randn(1, 4, 8, 8), torch.tensor(500), torch.randn(1, 77, 32)
    applied = models.unet(x, t, states).sample
    network.backup_weights()
    network.pre_calculation()
    assert not all(torch.equal(before[k], v) for k, v in models.unet.state_dict().items())
    assert all(not lora.enabled for lora in network.loras)
    merged = models.unet(x, t, states).sample
    assert (merged - applied).abs().max() <= 1e-4 * applied.abs().max()  # fp32 rounding of W + dW
    network.restore_weights()
    assert all(torch.equal(before[k], v) for k, v in models.unet.state_dict().items())
    assert torch.equal(models.unet(x, t, states).sample, applied)


def test_pre_calc_needs_applied_networks(files, tmp_path):
    with pytest.raises(SystemExit, match="--network_pre_calc .* all networks are merged"):
        run(files, tmp_path, "--prompt", "x", "--network_weights", files["lora_a"], "--network_merge",
            "--network_pre_calc")


# ------------------------------------------------------------------ prompts: order, sources, names


def test_shuffle_prompts(files, tmp_path):
    """kohya's --shuffle_prompts: the list is shuffled in place at the start of every iteration (seeded by
    --seed here), and the seeds are drawn in the new order."""
    import random

    from library.prompt_files import SamplePrompt
    from library.sampling import plan_images

    prompts = [SamplePrompt(p) for p in "abcde"]
    jobs = plan_images(prompts, n_iter=2, seed=5, shuffle=random.Random(1))
    order, shuffler = list("abcde"), random.Random(1)
    shuffler.shuffle(order)
    first = list(order)
    shuffler.shuffle(order)
    assert [j.prompt.prompt for j in jobs] == first + order
    draws = random.Random(5)
    assert [j.seed for j in jobs] == [draws.randint(0, 2 ** 32 - 1) for _ in range(10)]
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("".join(f"{word}\n" for word in ("one", "two", "three", "four")))
    paths = run(files, tmp_path, "--from_file", prompt_file, "--shuffle_prompts", "--seed", 3, "--steps", 1)
    written = [Image.open(p).text["parameters"].split("\n")[0] for p in paths]
    expected = ["one", "two", "three", "four"]
    random.Random("shuffle_prompts 3").shuffle(expected)
    assert written == expected and expected != ["one", "two", "three", "four"]


def test_use_original_file_name(files, tmp_path):
    paths = run(files, tmp_path, "--prompt", "a red circle --d 1", "--image_path", files["inputs"], "--strength", 0.5,
                "--images_per_prompt", 3, "--use_original_file_name", "--steps", 2)
    # kohya's names (the input's stem + .png); several images of one input are numbered
    assert [p.name for p in paths] == ["cat_000000.png", "dog.png", "cat_000002.png"]


class Terminal:
    """A stand-in for a terminal on standard input: lines to read, and isatty() true."""

    def __init__(self, text: str):
        import io

        self._lines = io.StringIO(text)

    def readline(self) -> str:
        return self._lines.readline()

    def isatty(self) -> bool:
        return True


def test_interactive(files, tmp_path, monkeypatch, capsys):
    """kohya's --interactive: prompt lines (with options) from the terminal until end of input; a bad line is
    reported and the next one read; each image is previewed unless --no_preview."""
    shown = []
    monkeypatch.setattr(Image.Image, "show", lambda self, title=None: shown.append(title))
    monkeypatch.setattr("sys.stdin", Terminal("a red circle --d 3\nbad --zz 1\n\na blue square --s 2\n"))
    paths = run(files, tmp_path, "--interactive", "--seed", 9, "--images_per_prompt", 2)
    assert [p.name for p in paths] == ["im_000000_3.png", "im_000001_3.png", *[p.name for p in paths[2:]]]
    assert len(paths) == 4 and "Steps: 2" in Image.open(paths[2]).text["parameters"]
    assert "prompt 2: unknown option '--zz'" in capsys.readouterr().err
    assert shown == ["a red circle"] * 2 + ["a blue square"] * 2
    # the seeds of images without --d come from one generator seeded by --seed over the session (kohya's)
    import random

    draws = random.Random(9)
    assert [p.name.split("_")[-1] for p in paths[2:]] == [f"{draws.randint(0, 2 ** 32 - 1)}.png" for _ in range(2)]
    shown.clear()
    monkeypatch.setattr("sys.stdin", Terminal("a cat --d 1\n"))
    run(files, tmp_path, "--interactive", "--no_preview", outdir="quiet")
    assert shown == []


def test_interactive_needs_a_terminal(files, tmp_path, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("a cat\n"))
    with pytest.raises(SystemExit, match="--interactive reads prompts from a terminal, and standard input is not"):
        run(files, tmp_path, "--interactive")


PROMPTER = '''
def get_prompter(args, pipe, networks):
    words = args.prompter_module_args.split(",")
    calls = {"n": 0}

    def prompter(args, pipe, seed_random, iter_seed, prompt_index, global_step):
        if prompt_index == len(words):
            return None
        calls["n"] += 1
        return f"a {words[prompt_index]} number {calls['n']} --d {global_step} --s 1"
    return prompter
'''


def test_from_module(files, tmp_path):
    """kohya's --from_module: the prompter is asked until it returns None, once per iteration; it reads
    --prompter_module_args from args."""
    module = tmp_path / "my_prompts.py"
    module.write_text(PROMPTER)
    paths = run(files, tmp_path, "--from_module", module, "--prompter_module_args", "cat,dog", "--n_iter", 2,
                "--images_per_prompt", 2)
    prompts = [Image.open(p).text["parameters"].split("\n")[0] for p in paths]
    assert prompts == ["a cat number 1"] * 2 + ["a dog number 2"] * 2 + ["a cat number 3"] * 2 + \
        ["a dog number 4"] * 2
    assert [p.name.split("_")[-1] for p in paths[::2]] == ["0.png", "2.png", "4.png", "6.png"]  # global_step
    module.write_text("def get_prompter(args, pipe, networks):\n    return lambda *a: pipe.text_encoder.nothing\n")
    with pytest.raises(SystemExit, match="the prompter module failed: AttributeError"):
        run(files, tmp_path, "--from_module", module)


# ------------------------------------------------------------------ starting noise, memory format, logging


@pytest.mark.numbers
def test_noise_offset(files, tmp_path):
    """--noise_offset_prob 1 with the range (0.3, 0.3) adds kohya's randn * 0 + 0.3 = 0.3 to the starting noise:
    diffusers' pipeline given the noise it draws from the seed plus 0.3 (the generator going on to the sampler's
    step noise) makes the same image. Probability 0 changes nothing, bit for bit."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils.torch_utils import randn_tensor

    from library.samplers import make_scheduler

    (plain,) = run(files, tmp_path, "--prompt", "a red circle --d 6", outdir="plain")
    (never,) = run(files, tmp_path, "--prompt", "a red circle --d 6", "--noise_offset_prob", 0,
                   "--noise_offset_range", 0.3, 0.3, outdir="never")
    assert np.array_equal(pixels(plain), pixels(never))
    (offset,) = run(files, tmp_path, "--prompt", "a red circle --d 6", "--noise_offset_prob", 1,
                    "--noise_offset_range", 0.3, 0.3, outdir="offset")
    pipe = StableDiffusionPipeline.from_pretrained(str(files["sd1_diffusers"]), local_files_only=True,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = make_scheduler("euler_a", "epsilon")
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(6)
    latents = randn_tensor((1, 4, 8, 8), generator=generator, dtype=torch.float32) + 0.3
    theirs = pipe("a red circle", width=64, height=64, num_inference_steps=3, guidance_scale=5.0, latents=latents,
                  generator=generator).images[0]
    assert_images_close(pixels(offset), theirs, what="noise offset 0.3")
    assert_images_differ(pixels(offset), pixels(plain), what="noise offset 0.3 vs none")


def test_pyramid_noise(files, tmp_path):
    """--pyramid_noise_prob 1: another starting noise, the same for the same seed (kohya draws it unseeded)."""
    args = ["--prompt", "a red circle --d 6", "--pyramid_noise_prob", 1, "--pyramid_noise_discount_range", 0.3, 0.5]
    (a,) = run(files, tmp_path, *args, outdir="a")
    (b,) = run(files, tmp_path, *args, outdir="b")
    (plain,) = run(files, tmp_path, "--prompt", "a red circle --d 6", outdir="plain")
    assert np.array_equal(pixels(a), pixels(b))
    assert_images_differ(pixels(a), pixels(plain), what="pyramid noise vs none")


def test_pyramid_noise_is_kohyas_formula():
    """Levels at 1 / r**i of the size, r in [2, 4), added at discount**i, until a side is 1; unit std at the end."""
    from library.guidance import pyramid_noise

    noise = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    generator, expected = torch.Generator().manual_seed(1), noise.clone()
    for i in range(6):
        r = torch.rand(1, generator=generator).item() * 2 + 2
        hn, wn = max(1, int(32 / r ** i)), max(1, int(32 / r ** i))
        low = torch.randn((1, 4, hn, wn), generator=generator)
        expected = expected + torch.nn.functional.interpolate(low, size=(32, 32), mode="bilinear") * 0.4 ** i
        if hn == 1:
            break
    got = pyramid_noise(noise, torch.Generator().manual_seed(1), 0.4)
    assert torch.equal(got, expected / expected.std()) and abs(got.std().item() - 1) < 1e-6


def test_opt_channels_last(files, tmp_path, monkeypatch):
    """--opt_channels_last: the U-Net's convolutions in channels-last memory format, the same image (the same
    math; other kernels, so rounding: the image tolerance)."""
    from diffusers import UNet2DConditionModel

    formats = []
    forward = UNet2DConditionModel.forward

    def spy(self, *args, **kwargs):
        formats.append(self.conv_in.weight.is_contiguous(memory_format=torch.channels_last))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    (plain,) = run(files, tmp_path, "--prompt", "a red circle --d 2", outdir="plain")
    assert not any(formats)
    formats.clear()
    (last,) = run(files, tmp_path, "--prompt", "a red circle --d 2", "--opt_channels_last", outdir="last")
    assert formats and all(formats)
    assert_images_close(pixels(last), pixels(plain), what="channels-last vs contiguous")


def test_console_log_flags(files, tmp_path):
    import logging

    root = logging.getLogger()
    before_level, before_handlers = root.level, list(root.handlers)
    log = tmp_path / "gen.log"
    try:
        run(files, tmp_path, "--prompt", "a cat --d 1", "--steps", 1, "--console_log_level", "info",
            "--console_log_file", log, "--console_log_simple")
        for handler in root.handlers:
            handler.flush()
        assert "INFO gen_img: wrote 1 image(s)" in log.read_text()
    finally:
        for handler in set(root.handlers) - set(before_handlers):
            root.removeHandler(handler)
            handler.close()
        root.setLevel(before_level)


def test_emb_normalize_mode():
    """kohya's --emb_normalize_mode after weighting: restore the mean (original), the mean absolute value (abs), or
    neither (none)."""
    from library.text_encoding import apply_weights

    states = torch.randn(2, 77, 8, generator=torch.Generator().manual_seed(0))
    weights = torch.ones(2, 1, 77)
    weights[:, :, 5:9] = 1.6
    weighted = states * weights[:, 0].unsqueeze(-1)
    assert torch.equal(apply_weights(states, weights, normalize="none"), weighted)
    for mode, measure in (("original", lambda x: x.mean(dim=(-2, -1), keepdim=True)),
                          ("abs", lambda x: x.abs().mean(dim=(-2, -1), keepdim=True))):
        got = apply_weights(states, weights, normalize=mode)
        assert torch.allclose(got, weighted * measure(states) / measure(weighted), rtol=1e-6, atol=0)
        assert torch.allclose(measure(got), measure(states), rtol=1e-5, atol=0)
    assert not torch.allclose(apply_weights(states, weights, normalize="abs"), apply_weights(states, weights))


def test_emb_normalize_mode_reaches_the_encoder(files, tmp_path, monkeypatch):
    from library import text_conditioning

    seen = []
    apply_weights = text_conditioning.apply_weights

    def spy(states, weights, *, normalize="original"):
        seen.append(normalize)
        return apply_weights(states, weights, normalize=normalize)

    monkeypatch.setattr(text_conditioning, "apply_weights", spy)
    run(files, tmp_path, "--prompt", "a (red:1.5) cat --d 1", "--steps", 1, "--emb_normalize_mode", "abs",
        model="sdxl")
    assert seen and set(seen) == {"abs"}


# ------------------------------------------------------------------ accepted as they are, and refused


def test_compatibility_flags_are_accepted(files, tmp_path, caplog):
    with caplog.at_level("INFO", logger="gen_img"):
        (path,) = run(files, tmp_path, "--prompt", "a cat --d 1", "--steps", 1, "--diffusers_xformers",
                      "--tokenizer_cache_dir", tmp_path / "cache", "--force_scheduler_zero_steps_offset")
    assert path.is_file() and "using PyTorch's scaled-dot-product attention instead" in caplog.text


@pytest.mark.parametrize("args, message", [
    (["--control_net_lllite_models", "x.safetensors"], "--control_net_lllite_models: not supported here"),
    (["--clip_vision_strength", "0.5"], "--clip_vision_strength: .* nothing is downloaded here"),
    (["--network_regional_mask_max_color_codes", "3"], "regional LoRA"),
    (["--ds_depth_1", "3"], "--ds_depth_1: not supported here: Deep Shrink"),
    (["--ds_ratio", "0.5"], "--ds_ratio: not supported here: Deep Shrink"),
    (["--gradual_latent_timesteps", "650"], "--gradual_latent_timesteps: not supported here: Gradual Latent"),
    (["--gradual_latent_unsharp_params", "3,0.5,0.5,1"], "--gradual_latent_unsharp_params: not supported"),
    (["--no_preview"], "--no_preview is about --interactive's preview"),
    (["--prompter_module_args", "a"], "--prompter_module_args is for the --from_module prompter"),
    (["--use_original_file_name"], "--use_original_file_name names images after their --image_path inputs"),
    (["--noise_offset_prob", "0.5"], "--noise_offset_prob and --noise_offset_range go together"),
    (["--pyramid_noise_prob", "2", "--pyramid_noise_discount_range", "0.1", "0.3"], "a probability, in"),
    (["--noise_offset_prob", "1", "--noise_offset_range", "0", "0.1", "--image_path", "INIT"],
     "the noise options change the starting noise of txt2img"),
    (["--from_file", "prompts.txt"], "give one prompt source: .*--prompt, --from_file given"),
])
def test_refused_options(files, tmp_path, args, message):
    with pytest.raises(SystemExit, match=message):
        run(files, tmp_path, "--prompt", "x", *[files["init"] if a == "INIT" else a for a in args])


def test_prompt_line_options_still_refused(files, tmp_path):
    for option, feature in (("--dsd1 3", "Deep Shrink"), ("--glt 650", "Gradual Latent")):
        with pytest.raises(SystemExit, match=f"--prompt: {option.split()[0]} \\({feature}"):
            run(files, tmp_path, "--prompt", f"x {option}")


def test_nl_with_cfg_off_is_refused_where_the_line_is_read(tmp_path):
    """Also in a trainer's --sample_prompts file, which is read before training (not at the first sample)."""
    from library.prompt_files import PromptFileError, SamplePrompt, load_prompts

    path = tmp_path / "samples.txt"
    path.write_text("a cat --l 1 --nl 3\n")
    with pytest.raises(PromptFileError, match="line 1: --nl .* a CFG scale of 1.0 turns off"):
        load_prompts(path, SamplePrompt(""))
    path.write_text("a cat --nl 3 --l 2\n")
    assert load_prompts(path, SamplePrompt(""))[0].negative_scale == 3.0
