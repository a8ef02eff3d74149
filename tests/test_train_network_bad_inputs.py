"""Bad inputs to the LoRA trainer (train_network.py), run in-process on a tiny model and synthetic images.

Every case either stops with `SystemExit("error: ...")` whose message names the culprit (folder, file, flag or
key) and says what to do, with no model file written when the run failed before training, or, where skipping
with a warning is the documented behaviour, logs that warning and still trains to the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
from PIL import Image

import train_network

# ----------------------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny SD 1.x and SD 2.x (512, epsilon) models, written once for the module."""
    from tools.make_tiny_model import main as make_model

    root = tmp_path_factory.mktemp("bad_inputs_models")
    assert make_model(["--family", "sd1", str(root / "sd1.safetensors")]) == 0
    assert make_model(["--family", "sd2-512", str(root / "sd2.safetensors")]) == 0
    return root


def make_data(parent: Path, images: int = 2, folder: str = "3_sks shape", seed: int = 0) -> Path:
    """A `--train_data_dir` with one `<repeats>_<class>` folder of small captioned images; returns the parent."""
    from tools.make_synthetic_dataset import write_dataset

    write_dataset(parent, images=images, size=64, seed=seed, folder=folder)
    return parent


def args_for(models: Path, data: Path, out: Path, *extra: str, model: str = "sd1.safetensors",
             cache: bool = True, steps: int = 1) -> list[str]:
    argv = ["--pretrained_model_name_or_path", str(models / model), "--train_data_dir", str(data),
            "--output_dir", str(out), "--output_name", "lora", "--resolution", "64", "--enable_bucket",
            "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "32",
            "--network_dim", "4", "--network_alpha", "2", "--learning_rate", "1e-3", "--seed", "7",
            "--train_batch_size", "1", "--max_data_loader_n_workers", "0", "--max_train_steps", str(steps)]
    return argv + (["--cache_latents"] if cache else []) + list(extra)


def train_ok(argv: list[str]) -> None:
    assert train_network.main(argv) == 0


def expect_error(argv: list[str], *needles: str) -> str:
    """Run; it must stop with SystemExit("error: ...") mentioning every needle. Returns the message."""
    with pytest.raises(SystemExit) as info:
        train_network.main(argv)
    message = info.value.code
    assert isinstance(message, str), f"exit code {message!r} instead of an error message"
    assert message.startswith("error:"), message
    for needle in needles:
        assert needle in message, f"{needle!r} not in:\n{message}"
    return message


def assert_no_model(out: Path) -> None:
    written = sorted(p.name for p in out.glob("*")) if out.exists() else []
    assert not [n for n in written if n.endswith((".safetensors", ".ckpt", ".pt"))], written


def warnings_text(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def image_folder(data: Path) -> Path:
    return data / "3_sks shape"


# ----------------------------------------------------------------------------------------------------------
# 1-2. Folder layout


def test_an_sdxl_model_is_sent_to_sdxl_train_network(tmp_path):
    """An SDXL base model given to train_network.py (kohya's split: SDXL trains with sdxl_train_network.py) stops
    before any work, naming the script that trains it."""
    from tools.make_tiny_model import main as make_model

    assert make_model(["--family", "sdxl", str(tmp_path / "sdxl.safetensors")]) == 0
    data = make_data(tmp_path / "data")
    out = tmp_path / "out"
    expect_error(args_for(tmp_path, data, out, model="sdxl.safetensors"), "sdxl.safetensors", "SDXL base",
                 "train_network.py handles SD 1.x / SD 2.x models: use sdxl_train_network.py")
    assert_no_model(out)


@pytest.mark.parametrize("folder", ["3_sks shape", "photos"])
def test_train_data_dir_pointing_at_the_image_folder(models, tmp_path, folder):
    data = make_data(tmp_path / "data", folder=folder)
    images = data / folder  # the classic kohya mistake: the folder that holds the images
    message = expect_error(args_for(models, images, tmp_path / "out"), f"--train_data_dir {images}:",
                           "must be the PARENT of '<repeats>_<class>' folders", "000.png")
    if folder == "3_sks shape":  # the folder itself is a proper image folder: its parent is the answer
        assert message.rstrip(".").endswith(f"use --train_data_dir {data}"), message
    else:
        assert f"move the images into a folder such as '{images / '10_sks dog'}'" in message, message
    assert_no_model(tmp_path / "out")


def test_folders_without_a_repeat_prefix(models, tmp_path):
    data = tmp_path / "data"
    make_data(data, folder="sks shape")
    make_data(data, folder="more shapes", seed=1)
    expect_error(args_for(models, data, tmp_path / "out"), f"--train_data_dir {data}:", "'sks shape'",
                 "'more shapes'", "without a '<repeats>_' prefix", "rename them, e.g. '10_more shapes'")
    assert_no_model(tmp_path / "out")


def test_a_folder_without_a_repeat_prefix_beside_good_ones_is_skipped(models, tmp_path, caplog):
    data = make_data(tmp_path / "data")
    make_data(data, folder="unsorted", seed=1)
    caplog.set_level(logging.WARNING)
    train_ok(args_for(models, data, tmp_path / "out"))
    warned = warnings_text(caplog)
    assert "'unsorted'" in warned and "<repeats>_" in warned, warned
    assert (tmp_path / "out" / "lora.safetensors").is_file()


def test_an_empty_image_folder(models, tmp_path):
    data = make_data(tmp_path / "data")
    (data / "5_empty").mkdir()
    expect_error(args_for(models, data, tmp_path / "out"), "5_empty", "no images", ".png", "remove the empty")
    assert_no_model(tmp_path / "out")


def test_a_zero_repeat_count(models, tmp_path):
    data = make_data(tmp_path / "data", folder="0_sks shape")
    expect_error(args_for(models, data, tmp_path / "out"), "0_sks shape", "repeat count must be at least 1")
    assert_no_model(tmp_path / "out")


# ----------------------------------------------------------------------------------------------------------
# 3. Unreadable images


def _noise_image(size) -> Image.Image:
    import random

    rng = random.Random(0)  # noise compresses badly: the damaged bytes land in the pixel data
    return Image.frombytes("RGB", size, bytes(rng.randrange(256) for _ in range(size[0] * size[1] * 3)))


def _png_bytes(size=(64, 64)) -> bytes:
    import io

    buffer = io.BytesIO()
    _noise_image(size).save(buffer, format="PNG")
    return buffer.getvalue()


def _corrupt_png() -> bytes:
    data = bytearray(_png_bytes())
    start = data.index(b"IDAT") + 40
    data[start:start + 200] = bytes((i * 37 + 11) % 256 for i in range(200))  # garbage inside the pixel data
    return bytes(data)


BAD_IMAGES = {
    "corrupt_data.png": _corrupt_png,
    "random_bytes.png": lambda: bytes((i * 97 + 13) % 256 for i in range(3000)),
    "truncated.png": lambda: _png_bytes()[: len(_png_bytes()) // 2],
    "empty.png": lambda: b"",
    "notes.jpg": lambda: b"these are my notes about the training run, not a photo\n" * 10,
}


@pytest.mark.parametrize("name", list(BAD_IMAGES))
@pytest.mark.parametrize("cache", [True, False], ids=["cached", "uncached"])
def test_unreadable_image(models, tmp_path, name, cache):
    data = make_data(tmp_path / "data")
    bad = image_folder(data) / name
    bad.write_bytes(BAD_IMAGES[name]())
    message = expect_error(args_for(models, data, tmp_path / "out", cache=cache), str(bad))
    assert "remove" in message or "re-save" in message, message
    assert_no_model(tmp_path / "out")


def _truncated_jpeg() -> bytes:
    import io

    buffer = io.BytesIO()
    _noise_image((64, 64)).save(buffer, format="JPEG")
    return buffer.getvalue()[:-200]


@pytest.mark.parametrize("workers", ["0", "2"])
def test_truncated_jpeg_found_while_training(models, tmp_path, workers):
    """A JPEG's header is intact, so the scan passes; without --cache_latents the image fails when its batch is
    loaded (in a DataLoader worker with workers > 0): the message is still the image's, with the step."""
    data = make_data(tmp_path / "data", images=0)
    bad = image_folder(data) / "cut.jpg"
    bad.write_bytes(_truncated_jpeg())
    argv = args_for(models, data, tmp_path / "out", "--max_data_loader_n_workers", workers, cache=False)
    message = expect_error(argv, str(bad), "corrupt or truncated", "remove it", "step 1")
    assert "Traceback" not in message and "worker" not in message, message
    assert_no_model(tmp_path / "out")


def test_every_unreadable_image_is_listed(models, tmp_path):
    data = make_data(tmp_path / "data")
    for name in ("empty.png", "notes.jpg"):
        (image_folder(data) / name).write_bytes(BAD_IMAGES[name]())
    expect_error(args_for(models, data, tmp_path / "out"), "empty.png", "notes.jpg")


# ----------------------------------------------------------------------------------------------------------
# 4-5. Image sizes


def test_image_smaller_than_one_bucket_step_with_no_upscale(models, tmp_path):
    data = make_data(tmp_path / "data")
    small = image_folder(data) / "small.png"
    Image.new("RGB", (20, 20), (200, 30, 30)).save(small)
    expect_error(args_for(models, data, tmp_path / "out", "--bucket_no_upscale"), str(small), "20x20",
                 "shorter than --bucket_reso_steps 32", "--bucket_no_upscale")
    assert_no_model(tmp_path / "out")


def test_tiny_image_is_upscaled_without_no_upscale(models, tmp_path, caplog):
    data = make_data(tmp_path / "data", images=1)
    Image.new("RGB", (12, 12), (200, 30, 30)).save(image_folder(data) / "tiny.png")
    caplog.set_level(logging.INFO)
    train_ok(args_for(models, data, tmp_path / "out", steps=2))
    assert (tmp_path / "out" / "lora.safetensors").is_file()


def test_enormous_image(models, tmp_path, monkeypatch):
    import library.images

    monkeypatch.setattr(library.images, "MAX_PIXELS", 100 * 100)  # the synthetic images are at most 96x64
    data = make_data(tmp_path / "data")
    big = image_folder(data) / "big.png"
    Image.new("RGB", (128, 128), (30, 30, 200)).save(big)
    expect_error(args_for(models, data, tmp_path / "out"), str(big), "128x128", "too large", "downscale")
    assert_no_model(tmp_path / "out")


# ----------------------------------------------------------------------------------------------------------
# 6. Captions


def test_missing_caption_file_uses_the_class_tokens(models, tmp_path, caplog):
    data = make_data(tmp_path / "data")
    (image_folder(data) / "001.caption").unlink()
    caplog.set_level(logging.WARNING)
    train_ok(args_for(models, data, tmp_path / "out"))
    warned = warnings_text(caplog)
    assert "001.png" in warned and "class tokens 'sks shape'" in warned, warned
    assert (tmp_path / "out" / "lora.safetensors").is_file()


@pytest.mark.parametrize("content, needles", [
    (b"", ("is empty", "write a caption", "delete it")),
    (b"  \n\t\n", ("is empty",)),
    ("sks shape, café".encode("latin-1"), ("not UTF-8", "UTF-8 encoding")),
], ids=["empty", "whitespace", "latin-1"])
def test_unusable_caption_file(models, tmp_path, content, needles):
    data = make_data(tmp_path / "data")
    caption = image_folder(data) / "001.caption"
    caption.write_bytes(content)
    expect_error(args_for(models, data, tmp_path / "out"), str(caption), *needles)
    assert_no_model(tmp_path / "out")


# ----------------------------------------------------------------------------------------------------------
# 7. Conflicting or invalid flags


FLAG_CASES = {
    "cache_latents+color_aug": (["--color_aug"], ["--cache_latents", "--color_aug", "drop one"]),
    "cache_latents+random_crop": (["--random_crop"], ["--cache_latents", "--random_crop", "drop one"]),
    "full_fp16_without_fp16": (["--full_fp16"], ["--full_fp16", "--mixed_precision fp16"]),
    "unet_only+te_only": (["--network_train_unet_only", "--network_train_text_encoder_only"],
                          ["--network_train_unet_only", "--network_train_text_encoder_only", "at most one"]),
    "dim_from_weights_without_weights": (["--dim_from_weights"], ["--dim_from_weights", "--network_weights"]),
    "unknown_network_arg": (["--network_args", "conv_dim=4", "no_such_key=1"],
                            ["--network_args", "no_such_key", "known: "]),
    "network_arg_without_value": (["--network_args", "conv_dim"], ["--network_args", "'conv_dim'", "key=value"]),
    "bad_network_arg_value": (["--network_args", "conv_dim=four"], ["--network_args", "conv_dim", "int"]),
    "constant_with_warmup": (["--lr_scheduler", "constant", "--lr_warmup_steps", "10"],
                             ["--lr_scheduler constant", "constant_with_warmup", "--lr_warmup_steps"]),
    "max_token_length_100": (["--max_token_length", "100"], ["--max_token_length", "75, 150 or 225"]),
    "unknown_optimizer": (["--optimizer_type", "NoSuchOptimizer"], ["--optimizer_type NoSuchOptimizer", "AdamW"]),
    "optimizer_args_not_a_literal": (["--optimizer_args", "betas=oops"], ["--optimizer_args", "betas=oops"]),
    "optimizer_args_unknown_name": (["--optimizer_args", "no_such_option=1"],
                                    ["--optimizer_args", "no_such_option", "AdamW"]),
    "optimizer_args_wrong_type": (["--optimizer_args", "betas=0.9"], ["--optimizer_args", "betas", "AdamW"]),
    "missing_network_weights": (["--network_weights", "{tmp}/nowhere.safetensors"],
                                ["nowhere.safetensors", "no such file"]),
    "log_with_all_without_logging_dir": (["--log_with", "all"], ["--log_with all", "--logging_dir"]),
    # kohya's other network types (networks.lora_fa / dylora / oft)
    "misspelt_network_module": (["--network_module", "networks.dyloar"],
                                ["--network_module networks.dyloar", "no such module", "networks.dylora"]),
    "dylora_rank_not_a_multiple_of_unit": (["--network_module", "networks.dylora", "--network_args", "unit=3"],
                                           ["--network_dim 4 is not a multiple of --network_args unit=3"]),
    "oft_on_the_text_encoder_alone": (["--network_module", "networks.oft", "--network_alpha", "1e-3",
                                       "--network_train_text_encoder_only"],
                                      ["networks.oft trains the U-Net only", "--network_train_text_encoder_only"]),
    "oft_blocks_that_do_not_divide_a_layer": (["--network_module", "networks.oft", "--network_dim", "3"],
                                              ["--network_dim 3", "does not divide 32"]),
    "oft_unknown_network_arg": (["--network_module", "networks.oft", "--network_args", "conv_dim=4"],
                                ["unknown key(s) for networks.oft: conv_dim", "enable_conv"]),
    "oft_scale_weight_norms": (["--network_module", "networks.oft", "--network_alpha", "1e-3",
                                "--scale_weight_norms", "1"], ["--scale_weight_norms", "networks.oft"]),
    "oft_in_diffusers_layout": (["--network_module", "networks.oft", "--save_lora_format", "diffusers"],
                                ["--save_lora_format diffusers", "networks.lora, lora_fa or dylora"]),
    "lora_fa_loraplus": (["--network_module", "networks.lora_fa", "--network_args", "loraplus_lr_ratio=16"],
                         ["loraplus_lr_ratio", "networks.lora_fa trains only the up matrices"]),
    "missing_tracker_config": (["--log_with", "wandb", "--log_tracker_config", "{tmp}/nowhere.toml"],
                               ["--log_tracker_config", "nowhere.toml", "no such file"]),
}


def test_wandb_not_installed(models, tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    data = make_data(tmp_path / "data")
    expect_error(args_for(models, data, tmp_path / "out", "--log_with", "wandb"),
                 "--log_with wandb", "not installed", "pip install wandb")
    assert_no_model(tmp_path / "out")


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_bad_flags(models, tmp_path, case):
    extra, needles = FLAG_CASES[case]
    data = make_data(tmp_path / "data")
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    expect_error(args_for(models, data, tmp_path / "out", *extra), *needles)
    assert_no_model(tmp_path / "out")


# ----------------------------------------------------------------------------------------------------------
# 8. --config_file


@pytest.mark.parametrize("text, needles", [
    ('learning_rate = 1e-3\nnetwork_dim = [4\n', ("invalid TOML",)),
    ('[training]\nlearning_rate = 1e-3\nlearning_rte = 1e-4\n', ("unknown", "learning_rte")),
    ('[training]\nmax_token_length = 100\n', ("--max_token_length", "75, 150 or 225")),
    ('network_dim = [8]\ncache_latents = "false"\nmixed_precision = "fp32"\n',
     ("network_dim = [8]: expected an integer", "cache_latents = 'false': expected true or false",
      "mixed_precision = 'fp32': expected one of no, fp16, bf16")),
], ids=["malformed", "unknown_key", "bad_value", "wrong_types"])
def test_bad_config_file(models, tmp_path, text, needles):
    config = tmp_path / "config.toml"
    config.write_text(text)
    data = make_data(tmp_path / "data")
    message = expect_error(args_for(models, data, tmp_path / "out", "--config_file", str(config)), *needles)
    if "max_token_length" not in text:
        assert str(config) in message
    assert_no_model(tmp_path / "out")


# ----------------------------------------------------------------------------------------------------------
# 9. --network_weights that do not fit


@pytest.fixture(scope="module")
def other_loras(models, tmp_path_factory):
    """LoRA files trained for one step: on SD 1.x with --network_dim 8, and on the tiny SD 2.x model."""
    root = tmp_path_factory.mktemp("other_loras")
    data = make_data(root / "data")
    train_ok(args_for(models, data, root / "dim8", "--network_dim", "8"))
    train_ok(args_for(models, data, root / "sd2", model="sd2.safetensors"))
    return {"dim8": root / "dim8" / "lora.safetensors", "sd2": root / "sd2" / "lora.safetensors"}


@pytest.mark.parametrize("which, extra, needles", [
    ("dim8", [], ["(8, ", "(4, ", "--dim_from_weights", "--network_dim"]),
    ("sd2", [], ["lora_", "base model"]),
    ("sd2", ["--dim_from_weights"], ["lora_", "base model"]),
], ids=["other_dim", "other_family", "other_family_dim_from_weights"])
def test_network_weights_that_do_not_fit(models, other_loras, tmp_path, which, extra, needles):
    data = make_data(tmp_path / "data")
    weights = other_loras[which]
    message = expect_error(args_for(models, data, tmp_path / "out", "--network_weights", str(weights), *extra),
                           "--network_weights", str(weights), *needles)
    assert ".lora_down.weight" in message or ".lora_up.weight" in message or ".alpha" in message, message
    assert_no_model(tmp_path / "out")


def test_network_weights_of_the_same_shape_load(models, other_loras, tmp_path):
    """Positive control: the dim-8 file continues training with --dim_from_weights."""
    data = make_data(tmp_path / "data")
    train_ok(args_for(models, data, tmp_path / "out", "--network_weights", str(other_loras["dim8"]),
                      "--dim_from_weights"))
    assert (tmp_path / "out" / "lora.safetensors").is_file()


# ----------------------------------------------------------------------------------------------------------
# 10. --resume


STATE_ARGS = ["--save_every_n_steps", "1", "--save_state"]


@pytest.fixture(scope="module")
def saved_state(models, tmp_path_factory):
    """(data dir, state folder) of a 2-step run that saved its state after step 1."""
    root = tmp_path_factory.mktemp("saved_state")
    data = make_data(root / "data")
    train_ok(args_for(models, data, root / "run", *STATE_ARGS, steps=2))
    state = root / "run" / "lora-step00000001-state"
    assert (state / "train_state.json").is_file()
    return data, state


def test_resume_with_another_seed(models, saved_state, tmp_path):
    data, state = saved_state
    argv = args_for(models, data, tmp_path / "out", *STATE_ARGS, "--resume", str(state), steps=2)
    argv[argv.index("--seed") + 1] = "8"
    expect_error(argv, "--resume", str(state), "different run configuration", "seed: state has 7, this run 8",
                 "original settings")
    assert_no_model(tmp_path / "out")


def test_resume_with_a_changed_dataset(models, tmp_path):
    data = make_data(tmp_path / "data")
    train_ok(args_for(models, data, tmp_path / "run", *STATE_ARGS, steps=2))
    state = tmp_path / "run" / "lora-step00000001-state"
    Image.new("RGB", (64, 64), (10, 200, 10)).save(image_folder(data) / "new.png")  # one more image
    expect_error(args_for(models, data, tmp_path / "out", *STATE_ARGS, "--resume", str(state), steps=2),
                 str(state), "different run configuration", "dataset_items", "original settings")
    assert_no_model(tmp_path / "out")


def test_resume_from_a_folder_that_is_not_a_state(models, saved_state, tmp_path):
    data, _ = saved_state
    expect_error(args_for(models, data, tmp_path / "out", "--resume", str(data)),
                 "--resume", str(data), "not a training state folder", "--save_state")
    assert_no_model(tmp_path / "out")


@pytest.mark.parametrize("damage", ["not_json", "unknown_field", "missing_weights"])
def test_resume_from_a_damaged_state(models, saved_state, tmp_path, damage):
    data, state = saved_state
    broken = tmp_path / "state"
    shutil.copytree(state, broken)
    if damage == "not_json":
        (broken / "train_state.json").write_text("{ half a file")
    elif damage == "unknown_field":
        saved = json.loads((broken / "train_state.json").read_text())
        (broken / "train_state.json").write_text(json.dumps({**saved, "from_the_future": 1}))
    else:
        (broken / "optimizer.pt").unlink()
    expect_error(args_for(models, data, tmp_path / "out", *STATE_ARGS, "--resume", str(broken), steps=2),
                 "--resume", str(broken))
    assert_no_model(tmp_path / "out")


# ----------------------------------------------------------------------------------------------------------
# 11. Non-finite loss


def test_nan_loss_stops_naming_the_step_and_keeps_the_earlier_save(models, tmp_path, monkeypatch):
    saved: dict[str, str] = {}
    original_save = train_network.LoRATask.save_model

    def recording_save(self, path_stem, **kwargs):
        path = original_save(self, path_stem, **kwargs)
        saved[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
        return path

    monkeypatch.setattr(train_network.LoRATask, "save_model", recording_save)
    data = make_data(tmp_path / "data")
    out = tmp_path / "out"
    argv = args_for(models, data, out, "--save_every_n_steps", "1", "--max_grad_norm", "0", steps=3)
    argv[argv.index("--learning_rate") + 1] = "1e30"  # the first update throws the weights to ~1e30
    expect_error(argv, "at step 2", "learning rate", "intact")
    assert list(saved) == ["lora-step00000001.safetensors"]
    step1 = out / "lora-step00000001.safetensors"
    assert hashlib.sha256(step1.read_bytes()).hexdigest() == saved[step1.name]
    assert not (out / "lora.safetensors").exists() and not (out / "lora-step00000002.safetensors").exists()


def test_fp16_mixed_precision_on_cpu_is_refused(tmp_path):
    import train_network
    from tools.make_synthetic_dataset import write_dataset
    from tools.make_tiny_model import main as make_model

    write_dataset(tmp_path / "data", images=2, size=64, seed=0, folder="1_x")
    assert make_model(["--family", "sd1", str(tmp_path / "m.safetensors")]) == 0
    with pytest.raises(SystemExit, match="fp16 needs a CUDA GPU"):
        train_network.main(["--pretrained_model_name_or_path", str(tmp_path / "m.safetensors"), "--train_data_dir",
                            str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"), "--resolution", "64",
                            "--mixed_precision", "fp16", "--max_train_steps", "1"])
