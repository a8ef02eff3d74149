"""Recipe tests: the real sdxl_train_network.py on a tiny SDXL base model and synthetic images.

Golden losses pin the numbers; the trained file is read by diffusers' SDXL pipeline (`load_lora_weights`) and
computes what our network computed; stopping and resuming ends with identical weights; kohya's SDXL names and
metadata; the trainers send each family to its script. The synthetic images are 80 px (and 120 x 80 / 80 x 120)
trained at 64 px, so every sample is resized and cropped and its size/crop ids differ from its bucket's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from library.safetensors_io import SafetensorsReader
from tests.numerics import (CAPTIONS_LOST, FP32_OUTPUT_REL, SIZE_IDS_LOST, assert_outputs_close,
                            assert_process_split_close, check_golden_losses, golden_case_args, relative_deviation,
                            training_deviation)
from tests.recipe_helpers import assert_averaged_once, logged_losses, one_and_two_processes, run_script


def run(argv: list[str], stop_after: int | None = None, script: str = "sdxl_train_network") -> None:
    run_script(script, argv, stop_after)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tools.make_synthetic_dataset import write_dataset
    from tools.make_tiny_model import main as make_model

    root = tmp_path_factory.mktemp("sdxl_train_network")
    write_dataset(root / "data", images=6, size=128, seed=0, folder="3_sks shape")
    for family in ("sdxl", "sdxl-refiner", "sd1"):
        assert make_model(["--family", family, str(root / f"{family}.safetensors")]) == 0
    return root


def base_args(root: Path, out: str, model: str = "sdxl.safetensors") -> list[str]:
    return ["--pretrained_model_name_or_path", str(root / model), "--train_data_dir", str(root / "data"),
            "--output_dir", str(root / out), "--output_name", "lora", "--resolution", "64", "--enable_bucket",
            "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "32", "--network_dim", "4",
            "--network_alpha", "2", "--learning_rate", "1e-3", "--seed", "7", "--train_batch_size", "2", "--max_data_loader_n_workers", "0",
            "--logging_dir", str(root / out / "logs")]


def read_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with SafetensorsReader(path) as reader:
        return {k: reader.read(k) for k in reader.keys()}, dict(reader.metadata)


def logged_scalars(log_root: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = next(p for p in log_root.iterdir() if p.is_dir())
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [e.value for e in events.Scalars(tag)]



CASES = {
    "sdxl_cached_two_te_lrs": ["--cache_latents", "--text_encoder_lr", "1e-3", "5e-4", "--max_train_steps", "4"],
    "sdxl_flip_weighted_long_locon": ["--flip_aug", "--weighted_captions", "--caption_prefix", "(sks:1.3)",
                                      "--max_token_length", "150", "--network_args", "conv_dim=4", "conv_alpha=1",
                                      "--max_train_steps", "3"],
}
# The option each case is there for (tests/golden/README.md: what removing it does to the losses).
COVERS = {
    "sdxl_cached_two_te_lrs": SIZE_IDS_LOST,
    "sdxl_flip_weighted_long_locon": CAPTIONS_LOST,
}


@pytest.mark.numbers
@pytest.mark.parametrize("case", list(CASES))
def test_golden_losses(case, workspace):
    root = workspace
    run(base_args(root, f"golden_{case}") + golden_case_args(case, CASES[case], COVERS))
    losses = logged_losses(root / f"golden_{case}" / "logs")
    check_golden_losses("sdxl_train_network_losses.json", case, losses)
    lora, metadata = read_lora(root / f"golden_{case}" / "lora.safetensors")
    assert all(torch.isfinite(t).all() for t in lora.values())
    # kohya's SDXL names and metadata (what WebUI, ComfyUI and kohya's tools key on).
    prefixes = {k.split(".")[0].split("_")[1] for k in lora}
    assert prefixes == {"te1", "te2", "unet"}, prefixes
    assert any(k.startswith("lora_unet_input_blocks_4_1_") for k in lora)
    assert not any("down_blocks" in k for k in lora)
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["modelspec.resolution"] == "64x64"
    if case == "sdxl_cached_two_te_lrs":  # one learning rate per text encoder, as kohya logs them
        logs = root / f"golden_{case}" / "logs"
        assert logged_scalars(logs, "lr/textencoder1")[0] == pytest.approx(1e-3)
        assert logged_scalars(logs, "lr/textencoder2")[0] == pytest.approx(5e-4)


def test_resume_reproduces_the_uninterrupted_run(workspace):
    root = workspace
    common = ["--cache_latents", "--max_train_steps", "5", "--save_every_n_steps", "2", "--save_state", "--flip_aug",
              "--shuffle_caption"]
    run(base_args(root, "straight") + common)
    straight, _ = read_lora(root / "straight" / "lora.safetensors")
    out = root / "resumed"
    run(base_args(root, "resumed") + common, stop_after=2)
    assert not (out / "lora.safetensors").exists()
    run(base_args(root, "resumed") + common + ["--resume", str(out / "lora-step00000002-state")])
    resumed, _ = read_lora(out / "lora.safetensors")
    assert resumed.keys() == straight.keys()
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key
    assert logged_losses(out / "logs") == logged_losses(root / "straight" / "logs")


def test_kill_9_between_saves_then_resume_gives_the_uninterrupted_run(workspace):
    """A real `kill -9` of a running sdxl_train_network.py (a subprocess), as soon as its step-2 state is on disk:
    resuming from the newest complete state (what `--resume_from_checkpoint latest` picks) ends with the LoRA and
    the losses of the run that was never interrupted, bit for bit."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from library.training_loop import STATE_FILE, latest_state

    root = workspace
    common = ["--cache_latents", "--max_train_steps", "12", "--save_every_n_steps", "2", "--save_state",
              "--flip_aug"]
    run(base_args(root, "unkilled") + common)
    out = root / "killed"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "sdxl_train_network.py", *base_args(root, "killed"), *common],
                               cwd=Path(__file__).resolve().parent.parent, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    first_state = out / "lora-step00000002-state" / STATE_FILE
    deadline = time.monotonic() + 300
    while not first_state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]  # killed, not finished
    assert not (out / "lora.safetensors").exists()
    state = latest_state(out)
    assert state is not None and int(Path(state).name.split("-step")[1][:8]) < 12
    run(base_args(root, "killed") + common + ["--resume", state])
    a, _ = read_lora(root / "unkilled" / "lora.safetensors")
    b, _ = read_lora(out / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert logged_losses(out / "logs") == logged_losses(root / "unkilled" / "logs")


@pytest.mark.numbers
def test_trained_lora_gives_the_same_outputs_in_diffusers(workspace):
    """The file sdxl_train_network.py writes, loaded by diffusers' StableDiffusionXLPipeline.load_lora_weights,
    computes what our network computed in training: both text encoders and the U-Net, fp32 (FP32_OUTPUT_REL; the
    measured spread and planted defects of this comparison: tests/test_sdxl_lora.py)."""
    root = workspace
    # A high learning rate, so the trained LoRA changes the outputs by far more than the comparison's tolerance.
    run(base_args(root, "to_diffusers") + ["--cache_latents", "--max_train_steps", "3", "--learning_rate", "1e-2",
                                           "--network_args", "conv_dim=4", "conv_alpha=1"])
    assert_diffusers_applies_it_as_we_do(root / "sdxl.safetensors", root / "to_diffusers" / "lora.safetensors")


def assert_diffusers_applies_it_as_we_do(model_file: Path, lora_file: Path, what: str = "") -> None:
    """diffusers' StableDiffusionXLPipeline.load_lora_weights and our loader (networks.lora, as WebUI applies
    kohya's tensors) give the same outputs of both text encoders and the U-Net with `lora_file`, and the LoRA does
    change each of them (FP32_OUTPUT_REL)."""
    import networks.lora as lora
    from library.model_loading import instantiate_models
    from library.sd_checkpoint import read_checkpoint
    from tests.test_sdxl_lora import diffusers_sdxl_pipeline, outputs

    with read_checkpoint(model_file) as checkpoint:
        models = instantiate_models(checkpoint)
    reference = outputs(models)
    pipe = diffusers_sdxl_pipeline(models)
    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    network, _ = lora.create_network_from_weights(1.0, str(lora_file), None, models.text_encoders, models.unet)
    network.apply_to(models.text_encoders, models.unet)
    network.load_weights(lora_file)
    ours = outputs(models)
    theirs = outputs(models, unet=pipe.unet, text_encoders=[pipe.text_encoder, pipe.text_encoder_2])
    for i, (got, want, base) in enumerate(zip(theirs, ours, reference)):
        assert relative_deviation(want, base) > 10 * FP32_OUTPUT_REL, f"output {i}: the trained LoRA changes nothing"
        assert_outputs_close(got, want, what=f"diffusers' SDXL pipeline vs ours{what}, output {i}")


@pytest.mark.numbers
def test_lycoris_network_module_on_sdxl(workspace):
    """kohya's --network_module interface with LyCORIS (LoCon) on SDXL: both text encoders (lora_te1_ / lora_te2_)
    and the U-Net; diffusers' StableDiffusionXLPipeline.load_lora_weights computes what our loader computes with
    the file (FP32_OUTPUT_REL). Two text-encoder rates are refused by name: the module takes one."""
    pytest.importorskip("lycoris.kohya")
    root = workspace
    extra = ["--cache_latents", "--max_train_steps", "3", "--learning_rate", "1e-2", "--network_module",
             "lycoris.kohya", "--network_args", "algo=locon", "preset=attn-mlp"]
    expect_error(base_args(root, "lycoris_refused") + extra + ["--text_encoder_lr", "1e-3", "5e-4"],
                 "--network_module lycoris.kohya takes one learning rate for all text encoders")
    run(base_args(root, "lycoris") + extra + ["--text_encoder_lr", "1e-2"])
    lora_file = root / "lycoris" / "lora.safetensors"
    weights, metadata = read_lora(lora_file)
    assert {k.split("_")[1] for k in weights} == {"te1", "te2", "unet"} and metadata["ss_network_module"] == \
        "lycoris.kohya"
    # kohya's SDXL names (LyCORIS itself walks diffusers' U-Net paths: renamed on saving, and back on reading).
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.") for k in weights)
    assert not any(k.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_unet_mid_block"))
                   for k in weights)
    # Continued from the file (--network_weights) by a step of rate 1e-30, which no stored value can feel: the file
    # comes back with the same values (a file not read back would start from a fresh initialisation, ~1e-2 away).
    run(base_args(root, "lycoris_again") + extra + ["--network_weights", str(lora_file), "--learning_rate", "1e-30",
                                                    "--text_encoder_lr", "1e-30", "--max_train_steps", "1"])
    again, _ = read_lora(root / "lycoris_again" / "lora.safetensors")
    assert again.keys() == weights.keys()
    assert all(torch.allclose(again[k], weights[k], rtol=0, atol=1e-20) for k in weights)
    # LoCon files have kohya's lora_down / lora_up / alpha tensors: our loader applies them as WebUI does.
    # (LyCORIS' own loader cannot read the file back: it names the text encoders' modules without the `text_model`
    # level that transformers 5 dropped and the saved file restores for WebUI / ComfyUI / diffusers.)
    assert_diffusers_applies_it_as_we_do(root / "sdxl.safetensors", lora_file, ", LyCORIS LoCon file")


@pytest.mark.numbers
@pytest.mark.parametrize("module", ["networks.dylora", "networks.oft"])
def test_other_network_types_write_kohyas_sdxl_names(workspace, module):
    """sdxl_train_network.py --network_module networks.dylora / networks.oft. DyLoRA: networks.lora's SDXL keys
    (lora_te1_ / lora_te2_, where kohya's own DyLoRA names both encoders lora_te_, and original-layout U-Net names),
    and diffusers' SDXL pipeline applies the file as our loader does (FP32_OUTPUT_REL). OFT: U-Net modules only,
    `oft_unet_` + the original layout (what WebUI maps to its own module names)."""
    from library.tiny_models import fresh_tiny_models
    from networks import lora, oft

    root = workspace
    dylora = module == "networks.dylora"
    out = "sdxl_" + module.split(".")[1]
    run(base_args(root, out) + ["--cache_latents", "--max_train_steps", "2", "--learning_rate", "1e-2",
                                "--network_module", module]
        + (["--network_args", "unit=2"] if dylora else ["--network_alpha", "1e-3"]))
    weights, metadata = read_lora(root / out / "lora.safetensors")
    assert metadata["ss_network_module"] == module
    models = fresh_tiny_models("sdxl")
    if dylora:
        expected = lora.create_network(1.0, 4, 2, None, models.text_encoders, models.unet).state_dict()
        assert {k.split("_")[1] for k in weights} == {"te1", "te2", "unet"}
    else:
        expected = oft.create_network(1.0, 4, 1e-3, None, models.text_encoders, models.unet).state_dict()
        assert any(k.startswith("oft_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.") for k in weights)
    assert weights.keys() == expected.keys()
    assert all(weights[k].shape == expected[k].shape for k in weights)
    if dylora:
        assert_diffusers_applies_it_as_we_do(root / "sdxl.safetensors", root / out / "lora.safetensors",
                                             ", DyLoRA file")


def test_loraplus_with_two_text_encoder_rates(workspace):
    """LoRA+ (`loraplus_lr_ratio`, `loraplus_text_encoder_lr_ratio`) on SDXL: each text encoder's up projections
    train at its own --text_encoder_lr times the ratio, the U-Net's at --unet_lr times its ratio (logged per group)."""
    root = workspace
    run(base_args(root, "loraplus") + ["--cache_latents", "--max_train_steps", "2", "--unet_lr", "1e-3",
                                       "--text_encoder_lr", "1e-4", "2e-4", "--lr_scheduler", "constant",
                                       "--network_args", "loraplus_lr_ratio=16", "loraplus_text_encoder_lr_ratio=4"])
    logs = root / "loraplus" / "logs"
    lrs = {tag: logged_scalars(logs, tag)[0] for tag in ("lr/textencoder1", "lr/textencoder1 plus",
                                                        "lr/textencoder2", "lr/textencoder2 plus", "lr/unet",
                                                        "lr/unet plus")}
    assert lrs == pytest.approx({"lr/textencoder1": 1e-4, "lr/textencoder1 plus": 4e-4, "lr/textencoder2": 2e-4,
                                 "lr/textencoder2 plus": 8e-4, "lr/unet": 1e-3, "lr/unet plus": 1.6e-2})


def test_sample_images_during_training(workspace):
    from PIL import Image

    root = workspace
    prompts = root / "prompts.txt"
    prompts.write_text("sks shape, red circle --n blurry --d 3 --s 2 --w 96\n")
    run(base_args(root, "samples") + ["--cache_latents", "--max_train_steps", "2", "--sample_prompts", str(prompts),
                                      "--sample_every_n_steps", "2", "--sample_at_first"])
    files = sorted((root / "samples" / "sample").glob("*.png"))
    assert [f.name.split("_")[1] for f in files] == ["000000", "000002"]
    image = Image.open(files[-1])
    assert image.size == (96, 64) and "sks shape, red circle" in image.text["parameters"]


def expect_error(argv: list[str], *needles: str, script: str = "sdxl_train_network") -> str:
    with pytest.raises(SystemExit) as info:
        run(argv, script=script)
    message = info.value.code
    assert isinstance(message, str) and message.startswith("error:"), message
    for needle in needles:
        assert needle in message, f"{needle!r} not in:\n{message}"
    return message


@pytest.mark.parametrize("model,needles", [
    ("sd1.safetensors", ["SD 1.x", "sdxl_train_network.py handles SDXL base models: use train_network.py"]),
    ("sdxl-refiner.safetensors", ["SDXL refiner", "sdxl_train_network.py handles SDXL base models"]),
])
def test_other_families_are_refused_by_name(workspace, model, needles):
    out = workspace / f"refused_{model.split('.')[0]}"
    expect_error(base_args(workspace, out.name, model=model) + ["--max_train_steps", "1"], model, *needles)
    assert not out.exists() or not list(out.glob("*.safetensors"))


@pytest.mark.parametrize("flags,needles", [
    (["--clip_skip", "2"], ["--clip_skip 2", "SDXL", "remove --clip_skip"]),
    (["--text_encoder_lr", "1e-4", "1e-4", "1e-4"], ["--text_encoder_lr", "2 text encoder(s)", "one per encoder"]),
])
def test_flags_sdxl_cannot_honour(workspace, flags, needles):
    expect_error(base_args(workspace, "bad_flags") + ["--max_train_steps", "1"] + flags, *needles)
    assert not (workspace / "bad_flags" / "lora.safetensors").exists()


def test_sd_models_give_two_text_encoder_lrs_a_clear_error(workspace):
    argv = base_args(workspace, "sd1_two_lrs", model="sd1.safetensors") + [
        "--max_train_steps", "1", "--text_encoder_lr", "1e-4", "5e-5"]
    expect_error(argv, "--text_encoder_lr 0.0001 5e-05", "1 text encoder(s); give one value", script="train_network")



# ------------------------------------------------------------------------------------------------------------
# --cache_text_encoder_outputs(_to_disk)

CACHE_RUN = ["--cache_latents", "--network_train_unet_only", "--max_train_steps", "4"]


def assert_same_losses(got: list[float], want: list[float]) -> None:
    from tests.numerics import golden_tolerances

    assert len(got) == len(want)
    for step, (a, b, tol) in enumerate(zip(got, want, golden_tolerances(len(want))), start=1):
        assert abs(a - b) <= tol * abs(b), f"step {step}: {a} vs {b}"


def test_cached_text_encoder_outputs_train_as_the_encoders_do(workspace, caplog):
    """The same run with the text encoders' outputs cached (and the encoders released: a call to them would fail)
    logs the losses of the run without a cache, within the golden tolerances: the cache encodes captions in other
    batches than the steps do, and a caption encoded beside others can differ in the last bits from the same
    caption alone (measured here: losses identical for the first comparison, 2e-7 relative for the last). Planted:
    every sample given the first cached caption's outputs moves the first loss 3.9x the first-step tolerance (the
    synthetic captions are alike; tests/test_text_encoder_cache.py compares the cached outputs themselves, 750x).
    A second run reads the disk entries (no encoding); an edited caption makes its entry stale: recomputed."""
    import logging

    root = workspace
    run(base_args(root, "te_plain") + CACHE_RUN)
    caplog.set_level(logging.INFO)
    run(base_args(root, "te_cached") + CACHE_RUN + ["--cache_text_encoder_outputs_to_disk"])
    assert "the text encoders are released" in caplog.text
    cached = logged_losses(root / "te_cached" / "logs")
    assert_same_losses(cached, logged_losses(root / "te_plain" / "logs"))
    entries = sorted((root / "data" / "3_sks shape").glob("*_te_outputs.safetensors"))
    assert len(entries) == 6
    with SafetensorsReader(entries[0]) as reader:
        key = json.loads(reader.metadata["cache_key"])
        assert reader.info("hidden_states").shape == (77, 32 + 48)  # tiny CLIP ViT-L + bigG widths, side by side
        assert reader.info("pooled").shape == (48,)
    caption_file = root / "data" / "3_sks shape" / (entries[0].name.split("_te_outputs")[0] + ".caption")
    assert key["caption"] == caption_file.read_text().strip()

    caplog.clear()
    run(base_args(root, "te_reused") + CACHE_RUN + ["--cache_text_encoder_outputs_to_disk"])
    assert "reused 6 entries from disk" in caplog.text and "stale" not in caplog.text
    assert logged_losses(root / "te_reused" / "logs") == cached

    original = caption_file.read_text()
    caption_file.write_text("sks shape, a green hexagon\n")
    try:
        caplog.clear()
        run(base_args(root, "te_edited") + CACHE_RUN + ["--cache_text_encoder_outputs"])  # memory only: disk kept
        run(base_args(root, "te_edited_disk") + CACHE_RUN + ["--cache_text_encoder_outputs_to_disk"])
        assert "1 entries were stale" in caplog.text and "reused 5 entries" in caplog.text
        with SafetensorsReader(entries[0]) as reader:
            assert json.loads(reader.metadata["cache_key"])["caption"] == "sks shape, a green hexagon"
        assert_same_losses(logged_losses(root / "te_edited_disk" / "logs"), logged_losses(root / "te_edited" / "logs"))
    finally:
        caption_file.write_text(original)
        for entry in entries:  # the other tests read this folder; leave it as it was
            entry.unlink()


@pytest.mark.parametrize("flags,needles", [
    (["--shuffle_caption"], ["--cache_text_encoder_outputs", "--shuffle_caption", "3_sks shape"]),
    (["--caption_dropout_rate", "0.1", "--enable_wildcard"],
     ["--caption_dropout_rate, --enable_wildcard", "Turn them off"]),
])
def test_caption_options_that_change_per_step_are_refused_with_the_cache(workspace, flags, needles):
    expect_error(base_args(workspace, "te_refused") + CACHE_RUN + ["--cache_text_encoder_outputs"] + flags, *needles)
    assert not list((workspace / "data" / "3_sks shape").glob("*_te_outputs.safetensors"))


def test_the_cache_needs_frozen_text_encoders(workspace):
    expect_error(base_args(workspace, "te_trained") + ["--cache_text_encoder_outputs", "--max_train_steps", "1"],
                 "--cache_text_encoder_outputs", "add --network_train_unet_only")


def test_sample_prompts_keep_the_encoders_beside_the_cache(workspace, caplog):
    import logging

    prompts = workspace / "prompts_cache.txt"
    prompts.write_text("sks shape, red circle --d 3 --s 2\n")
    caplog.set_level(logging.INFO)
    run(base_args(workspace, "te_samples") + ["--cache_latents", "--network_train_unet_only", "--max_train_steps", "2",
                                              "--cache_text_encoder_outputs", "--sample_prompts", str(prompts),
                                              "--sample_every_n_steps", "2"])
    assert "stay in memory for the sample prompts" in caplog.text
    assert len(list((workspace / "te_samples" / "sample").glob("*.png"))) == 1


@pytest.mark.numbers
def test_diffusers_layout_file_loads_in_diffusers_like_the_kohya_file(workspace):
    """--save_lora_format kohya diffusers: the second file, in diffusers' own layout (PEFT lora_A / lora_B, scale
    folded into lora_B, pipeline component names), loads with StableDiffusionXLPipeline.load_lora_weights to the
    same U-Net and text-encoder outputs as the kohya file (FP32_OUTPUT_REL; both go through diffusers' loader).
    Planted: the scale not folded in (alpha 2 / rank 4) halves every update and fails by far more."""
    from library.model_loading import instantiate_models
    from library.sd_checkpoint import read_checkpoint
    from tests.test_sdxl_lora import diffusers_sdxl_pipeline, outputs

    root = workspace
    run(base_args(root, "both_layouts") + ["--cache_latents", "--max_train_steps", "2", "--learning_rate", "1e-2",
                                           "--save_lora_format", "kohya", "diffusers"])
    folder = root / "both_layouts"
    assert (folder / "lora.safetensors").is_file() and (folder / "lora_diffusers.safetensors").is_file()
    tensors, metadata = read_lora(folder / "lora_diffusers.safetensors")
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    assert {k.split(".")[0] for k in tensors} == {"unet", "text_encoder", "text_encoder_2"}
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and not any(k.startswith("sshs_") for k in metadata)
    with read_checkpoint(root / "sdxl.safetensors") as checkpoint:
        models = instantiate_models(checkpoint)
    reference = outputs(models)
    results = []
    for name in ("lora.safetensors", "lora_diffusers.safetensors"):
        pipe = diffusers_sdxl_pipeline(models)
        pipe.load_lora_weights(str(folder), weight_name=name)
        results.append(outputs(models, unet=pipe.unet, text_encoders=[pipe.text_encoder, pipe.text_encoder_2]))
    for i, (kohya, diffusers_layout, base) in enumerate(zip(*results, reference)):
        assert relative_deviation(kohya, base) > 10 * FP32_OUTPUT_REL, f"output {i}: the LoRA changes nothing"
        assert_outputs_close(diffusers_layout, kohya, what=f"diffusers-layout file vs kohya file, output {i}")


def test_two_processes_match_one_process_at_the_same_global_batch(workspace):
    """accelerate launch with 2 CPU processes (gloo) x batch 1 == 1 process x batch 2, for SDXL with both text
    encoders' LoRAs training: the same samples, noise, timesteps and size ids (losses equal to float precision) and
    DDP's averaged gradient (one SGD step makes the lora_up weights -lr x the gradient), within PROCESS_SPLIT_REL (a
    fault in the averaging: tests/test_train_network.py). CLIP ViT-L's last layer feeds nothing (SDXL conditions on
    its penultimate state), so DDP looks for parameters without gradients."""
    root = workspace
    common = ["--cache_latents", "--max_train_steps", "1", "--flip_aug", "--optimizer_type", "SGD",
              "--learning_rate", "0.01", "--max_grad_norm", "0", "--text_encoder_lr", "0.01", "0.01"]

    communication = one_and_two_processes("sdxl_train_network", base_args(root, "one_process") + common,
                                          base_args(root, "two_processes") + common)
    assert_averaged_once(communication, optimizer_steps=1)
    assert communication["ddp_options"]["find_unused_parameters"] is True
    one, _ = read_lora(root / "one_process" / "lora.safetensors")
    two, _ = read_lora(root / "two_processes" / "lora.safetensors")
    assert one.keys() == two.keys()
    for prefix in ("lora_unet_", "lora_te1_", "lora_te2_"):
        ups = [k for k in one if k.startswith(prefix) and k.endswith("lora_up.weight")]  # zero before the step
        got, want = ({k: d[k] for k in ups} for d in (two, one))
        assert_process_split_close(training_deviation(got, want, {k: torch.zeros_like(v) for k, v in want.items()}),
                                   what=f"sdxl_train_network {prefix}")
    assert logged_losses(root / "two_processes" / "logs") == pytest.approx(
        logged_losses(root / "one_process" / "logs"), rel=1e-5)


def test_an_sd_lora_as_network_weights_is_named(workspace, tmp_path):
    """--network_weights with an SD 1.x LoRA on SDXL: the error says which family the file is for."""
    from tests.test_bad_inputs import tiny_lora

    lora = tiny_lora(tmp_path / "sd1_lora.safetensors", "sd1")
    message = expect_error(base_args(workspace, "sd_lora") + ["--max_train_steps", "1", "--network_weights", str(lora)],
                           f"--network_weights {lora}", "SD 1.x / 2.x")
    assert "SDXL" in message, message
    assert not (workspace / "sd_lora" / "lora.safetensors").exists()
