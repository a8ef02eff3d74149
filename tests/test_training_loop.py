"""Unit tests of the shared loop's pieces that the recipe tests cannot reach on tiny models."""

from __future__ import annotations

import pytest
import torch


def test_non_finite_gradients_stop_the_run_before_the_weights_take_them(tmp_path, monkeypatch):
    """A planted NaN gradient under a finite loss (d/dz of 0 * sqrt(z) at z = 0 is 0 * inf): the run stops at that
    step with an error naming it, and the save from before it stays as it was."""
    from library.diffusion_objective import DiffusionObjective
    from library.safetensors_io import SafetensorsReader
    from tests.recipe_helpers import run_script
    from tools.make_synthetic_dataset import write_dataset
    from tools.make_tiny_model import main as make_model

    write_dataset(tmp_path / "data", images=2, size=64, seed=0, folder="1_sks shape")
    assert make_model(["--family", "sd1", str(tmp_path / "sd1.safetensors")]) == 0
    argv = ["--pretrained_model_name_or_path", str(tmp_path / "sd1.safetensors"), "--train_data_dir",
            str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"), "--output_name", "lora", "--resolution",
            "64", "--network_dim", "4", "--train_batch_size", "2", "--max_train_steps", "3",
            "--save_every_n_steps", "1", "--max_data_loader_n_workers", "0", "--seed", "1"]
    loss = DiffusionObjective.loss
    calls = []

    def nan_gradient_at_step_2(self, prediction, *args, **kwargs):
        calls.append(1)
        value = loss(self, prediction, *args, **kwargs)
        return value + 0 * torch.sqrt(prediction.sum() * 0) if len(calls) == 2 else value

    monkeypatch.setattr(DiffusionObjective, "loss", nan_gradient_at_step_2)
    with pytest.raises(SystemExit, match="gradients became nan at step 2 .*loss was finite"):
        run_script("train_network", argv)
    saved = tmp_path / "out" / "lora-step00000001.safetensors"
    with SafetensorsReader(saved) as reader:
        assert all(torch.isfinite(reader.read(k)).all() for k in reader.keys())
    assert not (tmp_path / "out" / "lora-step00000002.safetensors").exists()
    assert not (tmp_path / "out" / "lora.safetensors").exists()
