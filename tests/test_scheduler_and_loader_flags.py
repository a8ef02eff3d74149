"""kohya flags that used to be parsed and ignored: `--lr_scheduler_type` / `--lr_scheduler_args` (a scheduler
class), `--persistent_data_loader_workers`, and the memory hints `--lowram` / `--highvram`; also the modelspec
keys of a trained LoRA, and conftest's `--runslow`.

The scheduler is checked against torch's own class, then in real train_network.py runs on a tiny model (its
logged learning rates, and an exact resume); persistent workers must give the very same losses as fresh ones
while the worker process really lives on from one epoch to the next.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import pytest
import torch

from library import train_args
from library.optimizers import OptimizerConfig, build_scheduler
from library.safetensors_io import SafetensorsReader

from tests.recipe_helpers import logged_losses, run_script, tiny_workspace


# ------------------------------------------------------------------ --lr_scheduler_type: the scheduler itself


def _optimizer(lr: float = 1e-3) -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=lr)


def _lrs(scheduler, optimizer, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        out.append(scheduler.get_last_lr()[0])
    return out


def _config(argv: list[str]) -> OptimizerConfig:
    """The OptimizerConfig the trainers build from these command-line words."""
    parser = argparse.ArgumentParser()
    train_args.add_optimizer_arguments(parser)
    return train_args.optimizer_config(parser.parse_args(argv))


@pytest.mark.parametrize("argv, reference", [
    (["--lr_scheduler_type", "CosineAnnealingLR", "--lr_scheduler_args", "T_max=7", "eta_min=1e-5"],
     lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7, eta_min=1e-5)),
    (["--lr_scheduler_type", "torch.optim.lr_scheduler.MultiStepLR", "--lr_scheduler_args", "milestones=[2,5]",
      "gamma=0.5"], lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 5], gamma=0.5)),
    # --lr_scheduler_type wins over --lr_scheduler (kohya)
    (["--lr_scheduler", "cosine", "--lr_scheduler_type", "OneCycleLR", "--lr_scheduler_args", "max_lr=0.01",
      "total_steps=10"], lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=10)),
])
def test_scheduler_class_gives_torch_own_learning_rates(argv, reference):
    config = _config(["--learning_rate", "1e-3"] + argv)
    ours_opt, theirs_opt = _optimizer(), _optimizer()
    ours = build_scheduler(config, ours_opt, total_steps=10)
    theirs = reference(theirs_opt)
    assert type(ours) is type(theirs)
    assert _lrs(ours, ours_opt, 10) == _lrs(theirs, theirs_opt, 10)


@pytest.mark.parametrize("warmup", ["2", "0.2", "20%"])
def test_named_cosine_schedule_with_warmup_follows_its_formula(warmup):
    """`--lr_scheduler cosine --lr_warmup_steps W` (the golden cases' scheduler flags, which a few loss steps cannot
    tell apart): a linear ramp over W steps, then a half cosine to 0 at the last step; W as steps, ratio or %."""
    import math

    config = _config(["--learning_rate", "1e-3", "--lr_scheduler", "cosine", "--lr_warmup_steps", warmup])
    optimizer = _optimizer()
    scheduler = build_scheduler(config, optimizer, total_steps=10)
    # The rate in force at each of steps 1..10, then after the last.
    got = [optimizer.param_groups[0]["lr"]] + _lrs(scheduler, optimizer, 10)
    want = [1e-3 * s / 2 if s < 2 else 1e-3 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(11)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-18)


def _rates(argv: list[str], total_steps: int = 10) -> list[float]:
    """The rate in force at each step 1..total_steps, then after the last, for --learning_rate 1 and these flags."""
    config = _config(["--learning_rate", "1.0"] + argv)
    optimizer = _optimizer(1.0)
    scheduler = build_scheduler(config, optimizer, total_steps=total_steps)
    return [optimizer.param_groups[0]["lr"]] + _lrs(scheduler, optimizer, total_steps)


def test_kohyas_inverse_sqrt_min_lr_and_warmup_stable_decay_schedules_follow_their_formulas():
    """kohya's --lr_scheduler_timescale, --lr_scheduler_min_lr_ratio and --lr_decay_steps, each against the formula
    of its schedule written out here: inverse square root after a linear warm-up (rate sqrt(T / (s + T - W)));
    a half cosine from 1 down to the floor r; a warm-up from r (transformers' schedule starts there), stable at 1,
    then a half cosine from 1 to r over the last D steps (D as steps, a ratio or a percentage, like the warm-up)."""
    import math

    W, T, r = 2, 4, 0.1
    assert _rates(["--lr_scheduler", "inverse_sqrt", "--lr_warmup_steps", "2", "--lr_scheduler_timescale", "4"]) \
        == pytest.approx([s / W if s < W else math.sqrt(T / (s + T - W)) for s in range(11)], rel=1e-12)
    assert _rates(["--lr_scheduler", "cosine_with_min_lr", "--lr_scheduler_min_lr_ratio", "0.1"]) == pytest.approx(
        [r + (1 - r) * 0.5 * (1 + math.cos(math.pi * s / 10)) for s in range(11)], rel=1e-12)
    for decay in ("4", "0.4", "40%"):
        want = [r + (1 - r) * s / W if s < W else 1.0 if s < 6
                else r + (1 - r) * 0.5 * (1 + math.cos(math.pi * (s - 6) / 4)) for s in range(11)]
        assert _rates(["--lr_scheduler", "warmup_stable_decay", "--lr_warmup_steps", "2", "--lr_decay_steps", decay,
                       "--lr_scheduler_min_lr_ratio", "0.1"]) == pytest.approx(want, rel=1e-12, abs=1e-15), decay


@pytest.mark.parametrize("argv, message", [
    (["--lr_scheduler", "cosine_with_min_lr"], "cosine_with_min_lr needs --lr_scheduler_min_lr_ratio"),
    (["--lr_scheduler", "cosine_with_min_lr", "--lr_scheduler_min_lr_ratio", "1.5"], "between 0 and 1"),
    (["--lr_scheduler", "warmup_stable_decay", "--lr_warmup_steps", "6", "--lr_decay_steps", "5"],
     r"--lr_warmup_steps \(6 steps\) and --lr_decay_steps \(5 steps\) are longer than the run \(10 steps\)"),
    (["--lr_scheduler", "inverse_sqrt", "--lr_scheduler_timescale", "0"], "--lr_scheduler_timescale 0"),
])
def test_bad_schedule_values_are_named(argv, message):
    with pytest.raises(ValueError, match=message):
        build_scheduler(_config(argv), _optimizer(), total_steps=10)


def test_a_schedule_flag_the_scheduler_does_not_read_is_said(caplog):
    """GUI-made configs carry --lr_decay_steps etc. for every scheduler: a value that does nothing is a warning
    naming it (kohya ignores it silently)."""
    with caplog.at_level(logging.WARNING):
        build_scheduler(_config(["--lr_scheduler", "cosine", "--lr_decay_steps", "0.2"]), _optimizer(), total_steps=10)
    assert "--lr_decay_steps 0.2 is not used: only --lr_scheduler warmup_stable_decay reads it" in caplog.text


def test_piecewise_constant_reads_step_rules_from_lr_scheduler_args():
    config = _config(["--learning_rate", "1.0", "--lr_scheduler", "piecewise_constant",
                           "--lr_scheduler_args", "step_rules='1:2,0.1:4,0.01'"])
    optimizer = _optimizer(1.0)
    lrs = _lrs(build_scheduler(config, optimizer, total_steps=6), optimizer, 6)
    assert lrs == pytest.approx([1.0, 0.1, 0.1, 0.01, 0.01, 0.01])


@pytest.mark.parametrize("argv, message", [
    (["--lr_scheduler_type", "CosineAnnealing"], r"--lr_scheduler_type CosineAnnealing: .*no class "
                                                 r"'CosineAnnealing'.*CosineAnnealingLR"),
    (["--lr_scheduler_type", "no_such_package.Sched"], r"--lr_scheduler_type no_such_package.Sched: cannot import"),
    (["--lr_scheduler_type", "CosineAnnealingLR"], r"refused --lr_scheduler_args \(none\).*T_max"),
    (["--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "step_size=2", "gama=0.5"],
     r"--lr_scheduler_type StepLR refused --lr_scheduler_args step_size=2 gama=0.5 .*gama"),
    (["--lr_scheduler_type", "ReduceLROnPlateau"], r"its step\(\) needs metrics"),
    (["--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "step_size=2", "--lr_warmup_steps", "3"],
     r"--lr_scheduler_type StepLR does not use --lr_warmup_steps"),
    (["--lr_scheduler", "cosine", "--lr_scheduler_args", "T_max=3"],
     r"--lr_scheduler_args T_max: read with --lr_scheduler_type"),
    (["--lr_scheduler", "piecewise_constant"], r"piecewise_constant needs --lr_scheduler_args step_rules"),
])
def test_bad_scheduler_names_and_arguments_are_named(argv, message):
    config = _config(argv)
    with pytest.raises(ValueError, match=message):
        build_scheduler(config, _optimizer(), total_steps=10)


def test_a_value_that_is_not_a_literal_names_the_flag():
    with pytest.raises(SystemExit, match=r"--lr_scheduler_args 'eta_min=small': the value must be a Python literal"):
        _config(["--lr_scheduler_type", "CosineAnnealingLR", "--lr_scheduler_args", "T_max=3", "eta_min=small"])
    with pytest.raises(SystemExit, match=r"--lr_scheduler_args 'T_max': expected key=value"):
        _config(["--lr_scheduler_type", "CosineAnnealingLR", "--lr_scheduler_args", "T_max"])


# ------------------------------------------------------------------ train_network.py runs


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tiny_workspace(tmp_path_factory.mktemp("scheduler_and_loader"), images=4, folder="1_sks shape")


def base_args(root: Path, out: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(root / "sd1.safetensors"), "--train_data_dir", str(root / "data"),
            "--output_dir", str(root / out), "--output_name", "lora", "--resolution", "64", "--enable_bucket",
            "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "32",
            "--network_dim", "4", "--network_alpha", "2", "--learning_rate", "1e-3", "--seed", "7",
            "--train_batch_size", "2", "--max_data_loader_n_workers", "0", "--logging_dir", str(root / out / "logs")]


def read_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with SafetensorsReader(path) as reader:
        return {k: reader.read(k) for k in reader.keys()}, dict(reader.metadata)


def logged_scalars(log_root: Path, prefix: str) -> dict[str, list[float]]:
    """TensorBoard scalars under `log_root` whose tag starts with `prefix`: tag -> values by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[str, dict[int, float]] = {}
    for run_dir in sorted(p for p in log_root.iterdir() if p.is_dir()):
        events = EventAccumulator(str(run_dir))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            if tag.startswith(prefix):
                values.setdefault(tag, {}).update({e.step: e.value for e in events.Scalars(tag)})
    return {tag: [by_step[s] for s in sorted(by_step)] for tag, by_step in values.items()}


SCHEDULER = ["--cache_latents", "--max_train_steps", "5", "--lr_scheduler_type", "CosineAnnealingLR",
             "--lr_scheduler_args", "T_max=4", "eta_min=1e-5"]


def test_train_network_with_a_scheduler_class_logs_its_rates_and_resumes_exactly(workspace):
    root = workspace
    common = SCHEDULER + ["--save_every_n_steps", "2", "--save_state"]
    run_script("train_network", base_args(root, "cosine_straight") + common)
    optimizer = _optimizer(1e-3)
    expected = _lrs(torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=4, eta_min=1e-5), optimizer, 5)
    logged = logged_scalars(root / "cosine_straight" / "logs", "lr/")
    assert logged and all(v == pytest.approx(expected, rel=1e-6) for v in logged.values()), logged

    # Killed after step 2 (its state saved), resumed: the scheduler continues where it was, so the weights match.
    out = root / "cosine_resumed"
    run_script("train_network", base_args(root, "cosine_resumed") + common, stop_after=2)
    run_script("train_network", base_args(root, "cosine_resumed") + common +
               ["--resume", str(out / "lora-step00000002-state")])
    straight, _ = read_lora(root / "cosine_straight" / "lora.safetensors")
    resumed, _ = read_lora(out / "lora.safetensors")
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert logged_losses(out / "logs") == logged_losses(root / "cosine_straight" / "logs")
    assert logged_scalars(out / "logs", "lr/") == logged


def test_trained_lora_has_the_modelspec_keys_of_an_extracted_one(workspace):
    """Both come through checkpoint_writer.modelspec_keys: the same key set, the date included."""
    from networks.extract_lora_from_models import main as extract
    from tools.make_tiny_model import main as make_model

    root = workspace
    run_script("train_network", base_args(root, "modelspec") + ["--cache_latents", "--max_train_steps", "1"])
    assert make_model(["--family", "sd1", "--seed", "1", str(root / "sd1_tuned.safetensors")]) == 0
    assert extract(["--model_org", str(root / "sd1.safetensors"), "--model_tuned", str(root / "sd1_tuned.safetensors"),
                    "--save_to", str(root / "extracted.safetensors"), "--dim", "2"]) == 0
    _, trained = read_lora(root / "modelspec" / "lora.safetensors")
    _, extracted = read_lora(root / "extracted.safetensors")
    assert trained["modelspec.date"][:4].isdigit() and "T" in trained["modelspec.date"]
    assert {k for k in trained if k.startswith("modelspec.")} == {k for k in extracted if k.startswith("modelspec.")}
    for key in ("modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation",
                "modelspec.prediction_type"):
        assert trained[key] == extracted[key], key
    # What differs is what the files are: the training resolution, the output name.
    assert (trained["modelspec.resolution"], extracted["modelspec.resolution"]) == ("64x64", "512x512")
    assert trained["modelspec.title"] == "lora"


# ------------------------------------------------------------------ --persistent_data_loader_workers


def test_persistent_workers_give_the_same_run_with_one_worker_process(workspace, monkeypatch):
    """Over 3 epochs with one worker: the same losses and weights as fresh workers each epoch, and every batch
    comes from one worker process (fresh workers: one process per epoch, so the check is not vacuous)."""
    import library.training_loop as training_loop

    root = workspace
    pid_log = root / "worker_pids.txt"
    collate = training_loop.collate

    def collate_noting_the_worker(samples):  # runs in the worker process (forked with this patch in place)
        with open(pid_log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return collate(samples)

    monkeypatch.setattr(training_loop, "collate", collate_noting_the_worker)
    results = {}
    for name, extra in (("fresh", []), ("persistent", ["--persistent_data_loader_workers"])):
        pid_log.unlink(missing_ok=True)
        argv = base_args(root, f"workers_{name}") + ["--max_train_epochs", "3", "--flip_aug", "--random_crop",
                                                     "--shuffle_caption"] + extra
        argv[argv.index("--max_data_loader_n_workers") + 1] = "1"
        run_script("train_network", argv)
        pids = pid_log.read_text().split()
        results[name] = (logged_losses(root / f"workers_{name}" / "logs"),
                         read_lora(root / f"workers_{name}" / "lora.safetensors")[0], pids)
    fresh_losses, fresh_lora, fresh_pids = results["fresh"]
    losses, lora, pids = results["persistent"]
    assert len(losses) >= 3 and losses == fresh_losses
    assert all(torch.equal(lora[k], fresh_lora[k]) for k in fresh_lora)
    assert len(set(fresh_pids)) == 3  # a new worker per epoch...
    assert len(set(pids)) == 1 and len(pids) == len(fresh_pids)  # ...but one for the whole persistent run
    assert pids[0] != str(os.getpid())


# ------------------------------------------------------------------ --lowram / --highvram, --runslow


def test_memory_hints_are_accepted_with_a_note(caplog):
    import train_network

    caplog.set_level(logging.INFO, logger="library.train_args")
    args = train_args.parse_args(train_network.setup_parser(), ["--pretrained_model_name_or_path", "m.safetensors",
                                                                "--output_dir", "out", "--lowram", "--highvram"])
    assert args.lowram and args.highvram
    notes = [r.getMessage() for r in caplog.records]
    assert any(n.startswith("--lowram: nothing to change") for n in notes)
    assert any(n.startswith("--highvram: nothing to change") for n in notes)


def test_slow_tests_are_skipped_unless_runslow(request):
    from tests import conftest

    class Item:
        def __init__(self, slow: bool):
            self.keywords = {"slow": True} if slow else {}
            self.markers = []

        def add_marker(self, marker):
            self.markers.append(marker)

    class Config:
        def __init__(self, runslow: bool):
            self.runslow = runslow

        def getoption(self, name):
            assert name == "--runslow"
            return self.runslow

    assert request.config.getoption("--runslow") in (True, False)  # the option is registered
    for runslow in (False, True):
        slow, fast = Item(slow=True), Item(slow=False)
        conftest.pytest_collection_modifyitems(Config(runslow), [slow, fast])
        assert [m.name for m in slow.markers] == ([] if runslow else ["skip"]) and fast.markers == []
