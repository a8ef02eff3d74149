"""Recipe tests: the real sdxl_train.py (full SDXL fine-tune / DreamBooth) on a tiny SDXL base model.

Golden losses pin the numbers; exact checks say what trained (each text encoder at its own rate or frozen, U-Net
blocks frozen by --block_lr byte-identical to the base model), the saved files load in diffusers'
StableDiffusionXLPipeline (`from_single_file` with a local config, `from_pretrained`) with exactly the trained
weights, resume is bit-exact, and the wrong family or flags are answered by name.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from library.safetensors_io import SafetensorsReader
from tests.numerics import CAPTIONS_LOST, check_golden_losses, golden_case_args
from tests.recipe_helpers import logged_losses, run_script


def run(argv: list[str], stop_after: int | None = None, script: str = "sdxl_train") -> None:
    run_script(script, argv, stop_after)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tools.make_synthetic_dataset import write_dataset
    from tools.make_tiny_model import main as make_model

    root = tmp_path_factory.mktemp("sdxl_train")
    write_dataset(root / "data", images=4, size=128, seed=0, folder="2_sks shape")
    write_dataset(root / "reg", images=2, size=96, seed=1, folder="1_shape", prefix="shape, ")
    for family in ("sdxl", "sd1"):
        assert make_model(["--family", family, str(root / f"{family}.safetensors")]) == 0
    return root


def base_args(root: Path, out: str, model: str = "sdxl.safetensors") -> list[str]:
    return ["--pretrained_model_name_or_path", str(root / model), "--train_data_dir", str(root / "data"),
            "--output_dir", str(root / out), "--output_name", "model", "--resolution", "64", "--enable_bucket",
            "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "32",
            "--learning_rate", "1e-4", "--seed", "3", "--train_batch_size", "2", "--max_data_loader_n_workers", "0",
            "--save_model_as", "safetensors", "--logging_dir", str(root / out / "logs")]


def file_tensors(path: Path) -> dict[str, torch.Tensor]:
    with SafetensorsReader(path) as reader:
        return {k: reader.read(k) for k in reader.keys()}


# 23 block rates: the middle block (10-12) and the output convolution (22) frozen.
BLOCK_LR = ",".join("0" if i in (10, 11, 12, 22) else ("2e-4" if i < 10 else "1e-4") for i in range(23))

CASES = {
    "db_reg_te2_block_lr": ["--reg_data_dir", "{root}/reg", "--prior_loss_weight", "0.7", "--cache_latents",
                            "--train_text_encoder", "--learning_rate_te1", "0", "--learning_rate_te2", "5e-5",
                            "--block_lr", BLOCK_LR, "--max_train_steps", "3"],
    "te_cache_flip": ["--cache_text_encoder_outputs", "--flip_aug", "--max_train_steps", "3"],
}
COVERS = {
    "db_reg_te2_block_lr": ["--prior_loss_weight", "0.7"],
    "te_cache_flip": CAPTIONS_LOST,
}


@pytest.mark.numbers
@pytest.mark.parametrize("case", list(CASES))
def test_golden_losses(case, workspace):
    root = workspace
    extra = [a.replace("{root}", str(root)) for a in golden_case_args(case, CASES[case], COVERS)]
    run(base_args(root, f"golden_{case}") + extra)
    check_golden_losses("sdxl_train_losses.json", case, logged_losses(root / f"golden_{case}" / "logs"))


def test_what_trains_follows_the_learning_rates(workspace):
    """--learning_rate_te1 0 keeps CLIP ViT-L byte-identical to the base model, bigG trains; --block_lr 0 keeps
    the middle block and the output convolution byte-identical, every other block changes."""
    from library.key_maps import UNET_PREFIX
    from library.unet_blocks import sdxl_block_of

    root = workspace
    run(base_args(root, "what_trains") + [a.replace("{root}", str(root)) for a in CASES["db_reg_te2_block_lr"]])
    base, trained = file_tensors(root / "sdxl.safetensors"), file_tensors(root / "what_trains" / "model.safetensors")
    assert base.keys() == trained.keys()
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    te1 = [k for k in base if k.startswith("conditioner.embedders.0.")]
    te2 = [k for k in base if k.startswith("conditioner.embedders.1.") and "position" not in k]
    vae = [k for k in base if k.startswith("first_stage_model.")]
    assert te1 and not changed & set(te1), "CLIP ViT-L trained at learning rate 0"
    assert set(te2) & changed, "OpenCLIP bigG did not train"
    assert not changed & set(vae)
    # Read from the file's own key names: blocks 10-12 are `middle_block`, 22 is `out`.
    unet = [k for k in base if k.startswith(UNET_PREFIX)]
    frozen = {k for k in unet if k.startswith((UNET_PREFIX + "middle_block.", UNET_PREFIX + "out."))}
    assert frozen and not frozen & changed, "a block at learning rate 0 trained"
    unet_blocks: dict[int, set[bool]] = {}
    for key in unet:
        unet_blocks.setdefault(sdxl_block_of(key[len(UNET_PREFIX):]), set()).add(key in changed)
    assert len(unet_blocks) == 23 and all(True in unet_blocks[b] for b in range(23) if b not in (10, 11, 12, 22))


def test_resume_reproduces_the_uninterrupted_run(workspace):
    root = workspace
    common = ["--cache_latents", "--train_text_encoder", "--max_train_steps", "4", "--save_every_n_steps", "2",
              "--save_state", "--flip_aug"]
    run(base_args(root, "straight") + common)
    out = root / "resumed"
    run(base_args(root, "resumed") + common, stop_after=2)
    run(base_args(root, "resumed") + common + ["--resume", str(out / "model-step00000002-state")])
    a, b = file_tensors(root / "straight" / "model.safetensors"), file_tensors(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert logged_losses(out / "logs") == logged_losses(root / "straight" / "logs")


@pytest.mark.parametrize("fmt", ["safetensors", "diffusers_safetensors"])
def test_saved_checkpoint_loads_in_diffusers(fmt, workspace, tmp_path):
    """diffusers reads exactly the trained weights (those of the saved training state), in both layouts."""
    from diffusers import StableDiffusionXLPipeline

    from library.checkpoint_writer import write_config_folder
    from library.sd_checkpoint import read_checkpoint

    root = workspace
    out = f"fmt_{fmt}"
    run(base_args(root, out) + ["--max_train_steps", "2", "--train_text_encoder", "--save_model_as", fmt,
                                "--save_state_on_train_end"])
    trained = torch.load(root / out / "model-state" / "trainable.pt", weights_only=True)["models"]
    assert set(trained) == {"unet", "text_encoder", "text_encoder_2"}
    if fmt.startswith("diffusers"):
        pipe = StableDiffusionXLPipeline.from_pretrained(str(root / out / "model"), local_files_only=True)
    else:
        with read_checkpoint(root / "sdxl.safetensors") as base:
            write_config_folder(base, tmp_path / "config")
        pipe = StableDiffusionXLPipeline.from_single_file(str(root / out / "model.safetensors"),
                                                          config=str(tmp_path / "config"), local_files_only=True)
        assert file_tensors(root / out / "model.safetensors").keys() == file_tensors(root / "sdxl.safetensors").keys()
    for component, weights in trained.items():
        loaded = getattr(pipe, component).state_dict()
        for key, value in weights.items():
            if "position_ids" not in key:
                assert torch.equal(loaded[key], value), f"{component}.{key}"


def test_metadata(workspace):
    root = workspace
    run(base_args(root, "meta") + ["--max_train_steps", "1", "--train_text_encoder", "--learning_rate_te2", "0"])
    with SafetensorsReader(root / "meta" / "model.safetensors") as reader:
        metadata = dict(reader.metadata)
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert metadata["ss_training_script"] == "sdxl_train" and metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert (metadata["ss_learning_rate_te1"], metadata["ss_learning_rate_te2"]) == ("None", "0.0")


def expect_error(argv: list[str], *needles: str, script: str = "sdxl_train") -> None:
    with pytest.raises(SystemExit) as info:
        run(argv, script=script)
    message = info.value.code
    assert isinstance(message, str) and message.startswith("error:"), message
    for needle in needles:
        assert needle in message, f"{needle!r} not in:\n{message}"


@pytest.mark.parametrize("script,model,flags,needles", [
    ("sdxl_train", "sdxl.safetensors", ["--block_lr", "1e-6,1e-6"], ["--block_lr: 2 value(s)", "23 blocks"]),
    ("sdxl_train", "sdxl.safetensors", ["--learning_rate_te", "1e-6"], ["--learning_rate_te1", "--learning_rate_te2"]),
    ("sdxl_train", "sdxl.safetensors", ["--cache_text_encoder_outputs", "--train_text_encoder"],
     ["--cache_text_encoder_outputs", "must stay frozen"]),
    ("sdxl_train", "sd1.safetensors", [], ["SD 1.x", "sdxl_train.py handles SDXL base models: use train_db.py"]),
    ("train_db", "sdxl.safetensors", [], ["SDXL base", "train_db.py handles SD 1.x / SD 2.x models: use sdxl_train.py"]),
    ("fine_tune", "sdxl.safetensors", [], ["fine_tune.py handles SD 1.x / SD 2.x models: use sdxl_train.py"]),
    ("sdxl_train", "sdxl.safetensors", ["--fused_backward_pass", "--fused_optimizer_groups", "2"],
     ["--fused_backward_pass", "--fused_optimizer_groups", "give one"]),
    ("sdxl_train", "sdxl.safetensors", ["--fused_optimizer_groups", "2", "--gradient_accumulation_steps", "2"],
     ["--fused_optimizer_groups does not work with --gradient_accumulation_steps 2"]),
])
def test_bad_input_is_named(workspace, script, model, flags, needles):
    out = workspace / "refused"
    expect_error(base_args(workspace, "refused", model=model) + ["--max_train_steps", "1"] + flags, *needles,
                 script=script)
    assert not list(out.glob("*.safetensors"))


def test_fused_optimizer_groups_equal_the_normal_step(workspace):
    """kohya's --fused_optimizer_groups: the U-Net and both text encoders (three learning rates) stepped in shares
    during backward give exactly the weights and losses of the normal step (clipping off, where the two agree)."""
    root = workspace
    extra = ["--optimizer_type", "AdamW", "--max_train_steps", "3", "--max_grad_norm", "0", "--train_text_encoder",
             "--learning_rate_te1", "2e-5", "--learning_rate_te2", "3e-5"]
    run(base_args(root, "unfused") + extra)
    run(base_args(root, "groups") + extra + ["--fused_optimizer_groups", "4"])
    a, b = file_tensors(root / "unfused" / "model.safetensors"), file_tensors(root / "groups" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert logged_losses(root / "unfused" / "logs") == logged_losses(root / "groups" / "logs")
