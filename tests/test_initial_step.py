"""kohya's --initial_step / --initial_epoch / --skip_until_initial_step: a run that starts counting at a later step
(no state to resume), and with the skip also at that step's data and noise."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.recipe_helpers import logged_losses, run_script


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tools.make_synthetic_dataset import write_dataset
    from tools.make_tiny_model import main as make_model

    root = tmp_path_factory.mktemp("initial_step")
    write_dataset(root / "data", images=6, size=64, seed=0, folder="2_sks shape")  # 12 samples: 6 steps per epoch
    assert make_model(["--family", "sd1", str(root / "sd1.safetensors")]) == 0
    return root


def args(root: Path, out: str, *extra: str) -> list[str]:
    # SGD without momentum at a constant rate: the step after loading saved weights is the step the run would
    # have taken (no optimizer state to lose), so a continuation can be compared with the run itself.
    return ["--pretrained_model_name_or_path", str(root / "sd1.safetensors"), "--train_data_dir", str(root / "data"),
            "--output_dir", str(root / out), "--output_name", "lora", "--resolution", "64", "--network_dim", "4",
            "--network_alpha", "2", "--learning_rate", "0.5", "--optimizer_type", "SGD", "--seed", "7",
            "--train_batch_size", "2", "--max_data_loader_n_workers", "0", "--cache_latents", "--save_precision",
            "float", "--logging_dir", str(root / out / "logs"), *extra]


def test_skipping_to_the_initial_step_continues_the_run_with_its_own_data_and_noise(workspace):
    root = workspace
    run_script("train_network", args(root, "straight", "--max_train_steps", "8", "--save_every_n_steps", "3"))
    straight = logged_losses(root / "straight" / "logs")
    saved = str(root / "straight" / "lora-step00000003.safetensors")
    run_script("train_network", args(root, "skipped", "--max_train_steps", "8", "--network_weights", saved,
                                     "--initial_step", "3", "--skip_until_initial_step"))
    skipped = logged_losses(root / "skipped" / "logs")
    assert len(skipped) == 5 and skipped == straight[3:]  # steps 4..8, bit for bit: same weights, data and noise
    # Without the skip the counters start at step 3 but the data at the start of its epoch (epoch 1 here).
    run_script("train_network", args(root, "counted", "--max_train_steps", "8", "--network_weights", saved,
                                     "--initial_step", "3"))
    counted = logged_losses(root / "counted" / "logs")
    assert len(counted) == 5 and counted[0] != straight[3]
    assert (root / "counted" / "lora.safetensors").is_file()


def test_initial_epoch_starts_at_that_epochs_first_step(workspace):
    root = workspace
    run_script("train_network", args(root, "epoch2", "--max_train_steps", "8", "--network_weights",
                                     str(root / "straight" / "lora-step00000003.safetensors"),
                                     "--initial_epoch", "2"))
    assert len(logged_losses(root / "epoch2" / "logs")) == 2  # epoch 2 begins at step 7 (6 steps per epoch)


@pytest.mark.parametrize("extra, needle", [
    (["--initial_step", "8"], "--initial_step 8: must be at least 0 and below --max_train_steps 8"),
    (["--skip_until_initial_step"], "--skip_until_initial_step needs --initial_step"),
    (["--initial_epoch", "3"], "--initial_epoch 3: the run has only 8 steps (6 per epoch)"),
    (["--initial_step", "2", "--resume", "nowhere"], "with --resume"),
])
def test_impossible_starts_are_refused(workspace, extra, needle):
    with pytest.raises(SystemExit) as exited:
        run_script("train_network", args(workspace, "bad", "--max_train_steps", "8", *extra))
    assert needle in str(exited.value.code), exited.value.code
