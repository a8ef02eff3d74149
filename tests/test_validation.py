"""The validation loss (library/validation.py, kohya's --validation_split & co.): the hold-out, fixed noise and
timesteps (so equal weights give equal losses), no effect on training, exact resume, the logged curve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from library.dataset_config import split_validation
from library.safetensors_io import SafetensorsReader
from tests.numerics import check_golden_losses
from tests.recipe_helpers import logged_losses, run_script


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tools.make_synthetic_dataset import write_dataset
    from tools.make_tiny_model import main as make_model

    root = tmp_path_factory.mktemp("validation")
    write_dataset(root / "data", images=6, size=64, seed=0, folder="2_sks shape")
    write_dataset(root / "reg", images=3, size=64, seed=1, folder="1_shape", prefix="shape, ")
    assert make_model(["--family", "sd1", str(root / "sd1.safetensors")]) == 0
    return root


def args(root: Path, out: str, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(root / "sd1.safetensors"), "--train_data_dir", str(root / "data"),
            "--output_dir", str(root / out), "--output_name", "lora", "--resolution", "64", "--network_dim", "4",
            "--network_alpha", "2", "--learning_rate", "1e-3", "--seed", "7", "--train_batch_size", "2",
            "--max_data_loader_n_workers", "0", "--cache_latents", "--logging_dir", str(root / out / "logs"), *extra]


def scalars(log_root: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for run_dir in sorted(p for p in log_root.iterdir() if p.is_dir()):
        events = EventAccumulator(str(run_dir))
        events.Reload()
        if tag in events.Tags()["scalars"]:
            values.update({e.step: e.value for e in events.Scalars(tag)})
    return values


def lora(path: Path) -> dict[str, torch.Tensor]:
    with SafetensorsReader(path) as reader:
        return {k: reader.read(k) for k in reader.keys()}


def test_the_hold_out_is_disjoint_seeded_and_keeps_a_training_image():
    from library.dataset_sources import ImageRecord, Subset

    subset = Subset(image_dir=Path("x"))
    records = [ImageRecord(Path(f"x/{i:02d}.png"), (64, 64), "", subset) for i in range(10)]
    train, held = split_validation(records, 0.25, seed=3)
    assert len(held) == round(10 * 0.25) and len(train) == 8 and not set(map(id, train)) & set(map(id, held))
    assert [r.path for r in split_validation(records, 0.25, seed=3)[1]] == [r.path for r in held]
    assert [r.path for r in split_validation(records, 0.25, seed=4)[1]] != [r.path for r in held]
    assert [r.path for r in train] == sorted(r.path for r in train)  # training keeps the folder's order
    assert len(split_validation(records[:1], 0.9, seed=0)[0]) == 1  # a subset never loses its last image


def test_held_out_images_are_never_in_a_training_batch(workspace, tmp_path):
    from library.dataset_config import build_training_dataset
    from library.train_dataset import EpochBatches

    cli = {"train_data_dir": str(workspace / "data"), "reg_data_dir": str(workspace / "reg"), "batch_size": 2,
           "resolution": (64, 64), "validation_split": 0.34, "validation_seed": 5}
    dataset, summary = build_training_dataset(cli, None, family_step=8, seed=1, prior_loss_weight=1.0,
                                              max_train_steps=0)
    held = {str(item.record.path) for item in dataset.items if item.validation}
    assert len(held) == 2 and summary["num_validation_images"] == 2
    assert not any("reg" in path for path in held)  # regularisation images are never held out
    batches = EpochBatches(dataset, 1)
    trained = {str(dataset.items[i].record.path) for epoch in (1, 2, 3) for batch in batches.batches(epoch)
               for i, _ in batch}
    assert trained and not trained & held
    # The dataset config key does the same.
    (tmp_path / "d.toml").write_text(f"[[datasets]]\nresolution = 64\nvalidation_split = 0.34\nvalidation_seed = 5\n"
                                     f"[[datasets.subsets]]\nimage_dir = '{workspace / 'data' / '2_sks shape'}'\n")
    from_config, _ = build_training_dataset({"batch_size": 2, "resolution": (64, 64)}, tmp_path / "d.toml",
                                            family_step=8, seed=1, prior_loss_weight=1.0, max_train_steps=0)
    assert {str(i.record.path) for i in from_config.items if i.validation} == held


@pytest.mark.numbers
def test_validating_changes_nothing_in_training_and_equal_weights_give_equal_losses(workspace):
    root = workspace
    split = ["--validation_split", "0.34", "--max_train_steps", "4"]
    run_script("train_network", args(root, "val_every_step", *split, "--validate_every_n_steps", "1"))
    run_script("train_network", args(root, "val_rarely", *split, "--validate_every_n_epochs", "100"))
    # The training losses and the trained LoRA are those of the run that never validated.
    assert logged_losses(root / "val_every_step" / "logs") == logged_losses(root / "val_rarely" / "logs")
    a, b = lora(root / "val_every_step" / "lora.safetensors"), lora(root / "val_rarely" / "lora.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert scalars(root / "val_rarely" / "logs", "loss/validation/step_average") == {}
    curve = scalars(root / "val_every_step" / "logs", "loss/validation/step_average")
    assert sorted(curve) == [1, 2, 3, 4] and len(set(curve.values())) == 4  # the weights move, so does the loss
    check_golden_losses("validation_losses.json", "lora_every_step", [curve[s] for s in sorted(curve)])
    divergence = scalars(root / "val_every_step" / "logs", "loss/validation/step_divergence")
    assert sorted(divergence) == [1, 2, 3, 4]
    # Epoch 1 ends at step 4 (4 training images x 2 repeats, batch 2): its validation sees step 4's weights, and
    # fixed noise and timesteps make the two losses equal, bit for bit.
    epoch = scalars(root / "val_every_step" / "logs", "loss/validation/epoch_average")
    assert epoch == {4: curve[4]}
    with SafetensorsReader(root / "val_every_step" / "lora.safetensors") as reader:
        assert reader.metadata["ss_num_validation_images"] == "2"
        assert reader.metadata["ss_validation_split"] == "0.34"


def test_epoch_validation_by_default_equals_the_step_validation_of_the_same_weights(workspace):
    root = workspace
    run_script("train_network", args(root, "val_epochs", "--validation_split", "0.34", "--max_train_steps", "8"))
    epoch = scalars(root / "val_epochs" / "logs", "loss/validation/epoch_average")
    step = scalars(root / "val_every_step" / "logs", "loss/validation/step_average")
    assert sorted(epoch) == [4, 8] and epoch[4] == step[4] and epoch[8] != epoch[4]


def test_a_resumed_run_validates_as_the_uninterrupted_one(workspace):
    root = workspace
    common = ["--validation_split", "0.34", "--validate_every_n_steps", "1", "--max_train_steps", "4",
              "--save_every_n_steps", "2", "--save_state"]
    run_script("train_network", args(root, "resumed", *common), stop_after=2)
    run_script("train_network", args(root, "resumed", *common, "--resume",
                                     str(root / "resumed" / "lora-step00000002-state")))
    straight = scalars(root / "val_every_step" / "logs", "loss/validation/step_average")
    assert scalars(root / "resumed" / "logs", "loss/validation/step_average") == straight
    a, b = lora(root / "resumed" / "lora.safetensors"), lora(root / "val_every_step" / "lora.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra, needle", [
    (["--validate_every_n_steps", "2"], "--validate_every_n_steps: no images are held out"),
    (["--validation_split", "1.5"], "--validation_split 1.5: the share of images held out"),
    (["--validation_split", "0.3", "--max_validation_steps", "0"], "--max_validation_steps 0: must be at least 1"),
])
def test_bad_validation_flags_are_named(workspace, extra, needle):
    with pytest.raises(SystemExit) as exited:
        run_script("train_network", args(workspace, "bad", *extra, "--max_train_steps", "1"))
    assert needle in str(exited.value.code), exited.value.code
    assert not (workspace / "bad" / "lora.safetensors").exists()


def test_the_golden_file_holds_what_the_test_checks():
    data = json.loads((Path(__file__).parent / "golden" / "validation_losses.json").read_text())
    assert list(data) == ["lora_every_step"] and len(data["lora_every_step"]) == 4
