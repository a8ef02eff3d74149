"""--fused_backward_pass / --fused_optimizer_groups in the adapter trainers (train_network.py,
train_textual_inversion.py and their SDXL scripts, which run the same recipes): the optimizer steps the LoRA's (or
the new word's) parameters inside the backward pass, with the same arithmetic as the normal step. With clipping off
(--max_grad_norm 0: the fused step clips each parameter by its own norm, library/fused_backward.py) the trained files
and the logged losses are bit-identical to the normal step's; what cannot work is refused by name before any model
loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.recipe_helpers import assert_same_training, file_tensors, run_script, tiny_workspace


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tiny_workspace(tmp_path_factory.mktemp("fused_adapters"), images=4, folder="2_zwxq shape",
                          prefix="zwxq shape, ")


def common(root: Path, out: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(root / "sd1.safetensors"), "--train_data_dir", str(root / "data"),
            "--output_dir", str(root / out), "--resolution", "64", "--seed", "3", "--train_batch_size", "2",
            "--max_data_loader_n_workers", "0", "--max_train_steps", "3", "--max_grad_norm", "0",
            "--logging_dir", str(root / out / "logs")]


def lora_args(root: Path, out: str) -> list[str]:
    # U-Net and text-encoder LoRA at two rates, so the fused optimizer has two param groups to follow.
    return common(root, out) + ["--output_name", "lora", "--network_dim", "4", "--network_alpha", "2",
                                "--learning_rate", "1e-3", "--text_encoder_lr", "5e-4"]


def ti_args(root: Path, out: str) -> list[str]:
    return common(root, out) + ["--output_name", "emb", "--token_string", "zwxq", "--init_word", "shape",
                                "--num_vectors_per_token", "2", "--learning_rate", "5e-2",
                                "--save_model_as", "safetensors"]


@pytest.mark.parametrize("optimizer", [["--optimizer_type", "AdamW"],
                                       ["--optimizer_type", "Adafactor", "--optimizer_args", "relative_step=False",
                                        "scale_parameter=False", "warmup_init=False"]])
def test_lora_fused_steps_equal_the_normal_step(workspace, optimizer):
    root, name = workspace, optimizer[1].lower()
    run_script("train_network", lora_args(root, f"{name}_unfused") + optimizer)
    run_script("train_network", lora_args(root, f"{name}_fused") + optimizer + ["--fused_backward_pass"])
    run_script("train_network", lora_args(root, f"{name}_groups") + optimizer + ["--fused_optimizer_groups", "3"])
    initial = file_tensors(root / f"{name}_unfused" / "lora.safetensors")
    assert any(k.startswith("lora_te_") for k in initial) and any(k.startswith("lora_unet_") for k in initial)
    assert_same_training(root, f"{name}_unfused", f"{name}_fused", "lora.safetensors")
    assert_same_training(root, f"{name}_unfused", f"{name}_groups", "lora.safetensors")


def test_textual_inversion_fused_step_equals_the_normal_step(workspace):
    root = workspace
    run_script("train_textual_inversion", ti_args(root, "ti_unfused"))
    run_script("train_textual_inversion", ti_args(root, "ti_fused") + ["--fused_backward_pass"])
    assert_same_training(root, "ti_unfused", "ti_fused", "emb.safetensors")


def test_a_state_saved_fused_does_not_resume_unfused(workspace):
    """The fused step clips per parameter: a run resumed without it would drift from the one that saved the state,
    so the resume fingerprint tells them apart."""
    root = workspace
    run_script("train_network", lora_args(root, "fused_state") + ["--fused_backward_pass", "--save_state"])
    with pytest.raises(SystemExit, match="the state comes from a different run configuration.*fused_step"):
        run_script("train_network", lora_args(root, "unfused_resume") + ["--resume",
                                                                         str(root / "fused_state" / "lora-state")])


@pytest.mark.parametrize("script,flags,needles", [
    ("train_network", ["--fused_backward_pass", "--optimizer_type", "Prodigy"], ["--fused_backward_pass", "Prodigy"]),
    ("train_network", ["--fused_optimizer_groups", "2", "--gradient_accumulation_steps", "2"],
     ["--fused_optimizer_groups does not work with --gradient_accumulation_steps 2"]),
    ("train_textual_inversion", ["--fused_backward_pass", "--fused_optimizer_groups", "2"],
     ["--fused_backward_pass", "--fused_optimizer_groups", "give one"]),
])
def test_what_a_fused_step_cannot_do_is_refused_by_name(workspace, script, flags, needles):
    argv = (lora_args if script == "train_network" else ti_args)(workspace, "refused") + flags
    with pytest.raises(SystemExit) as info:
        run_script(script, argv)
    message = info.value.code
    assert isinstance(message, str) and message.startswith("error:"), message
    for needle in needles:
        assert needle in message, message
