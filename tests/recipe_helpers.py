"""What the recipe tests share: running a training script in-process, and reading the losses it logged."""

from __future__ import annotations

import importlib
import os
from pathlib import Path


def run_script(script: str, argv: list[str], stop_after: int | None = None) -> None:
    """`script.main(argv)` in this process. `stop_after`: end the run after that many steps as if killed (no final
    save), through the trainers' testing aid SDTRAIN_STOP_AFTER_STEPS."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # several runs per test (see conftest)
    if stop_after:
        os.environ["SDTRAIN_STOP_AFTER_STEPS"] = str(stop_after)
    try:
        assert importlib.import_module(script).main(argv) == 0
    finally:
        os.environ.pop("SDTRAIN_STOP_AFTER_STEPS", None)


def tiny_workspace(root: Path, *, images: int, folder: str, prefix: str = "sks shape, ",
                   models: dict[str, str] | None = None) -> Path:
    """A recipe test's workspace: `images` synthetic 64 px images with captions under root/data/<folder> (seed 0),
    and tiny models (family name -> file name; default: SD 1.x as sd1.safetensors)."""
    from tools.make_synthetic_dataset import write_dataset
    from tools.make_tiny_model import main as make_model

    write_dataset(root / "data", images=images, size=64, seed=0, folder=folder, prefix=prefix)
    for family, name in (models or {"sd1": "sd1.safetensors"}).items():
        assert make_model(["--family", family, str(root / name)]) == 0
    return root


def logged_losses(log_root: Path) -> list[float]:
    """loss/current per step from the TensorBoard runs under `log_root` (a resumed run adds a second one)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for run_dir in sorted(p for p in log_root.iterdir() if p.is_dir()):
        events = EventAccumulator(str(run_dir))
        events.Reload()
        values.update({e.step: e.value for e in events.Scalars("loss/current")})
    return [values[s] for s in sorted(values)]


def one_and_two_processes(script: str, one_process_argv: list[str], two_process_argv: list[str]) -> None:
    """The same run as 1 process x batch 2 (in this process) and as `accelerate launch` with 2 CPU processes (gloo) x
    batch 1 (a subprocess): each argv's --train_batch_size is set here, and aspect bucketing is turned off, so one
    bucket gives full global batches (a bucket's short last batch is where the two layouts legitimately differ: see
    EpochBatches)."""
    import subprocess
    import sys

    def with_batch(argv: list[str], batch: int) -> list[str]:
        argv = [a for a in argv if a != "--enable_bucket"]
        argv[argv.index("--train_batch_size") + 1] = str(batch)
        return argv

    run_script(script, with_batch(one_process_argv, 2))
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              str(Path(__file__).resolve().parent.parent / f"{script}.py")]
    result = subprocess.run(launch + with_batch(two_process_argv, 1), env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
