"""What the recipe tests share: running a training script in-process, and reading the losses it logged."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path


def run_script(script: str, argv: list[str], stop_after: int | None = None) -> None:
    """`script.main(argv)` in this process. `stop_after`: end the run after that many steps as if killed (no final
    save), through the trainers' testing aid SDTRAIN_STOP_AFTER_STEPS."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # several runs per test (see conftest)
    environment = dict(os.environ)  # a DeepSpeed run sets accelerate's and torch.distributed's variables
    if stop_after:
        os.environ["SDTRAIN_STOP_AFTER_STEPS"] = str(stop_after)
    try:
        assert importlib.import_module(script).main(argv) == 0
    finally:
        os.environ.clear()
        os.environ.update(environment)


def tiny_workspace(root: Path, *, images: int, folder: str, prefix: str = "sks shape, ",
                   models: dict[str, str] | None = None, companions: dict[str, Path] | None = None) -> Path:
    """A recipe test's workspace: `images` synthetic 64 px images with captions under root/data/<folder> (seed 0),
    and tiny models (family name -> file name; default: SD 1.x as sd1.safetensors). `companions`: same-stem images
    beside them (make_synthetic_dataset's kinds, e.g. {"edge_maps": root / "cond"})."""
    from tools.make_synthetic_dataset import write_dataset
    from tools.make_tiny_model import main as make_model

    write_dataset(root / "data", images=images, size=64, seed=0, folder=folder, prefix=prefix, companions=companions)
    for family, name in (models or {"sd1": "sd1.safetensors"}).items():
        assert make_model(["--family", family, str(root / name)]) == 0
    return root


def logged_losses(log_root: Path, tag: str = "loss/current") -> list[float]:
    """`tag` (loss/current) per step from the TensorBoard runs under `log_root` (a resumed run adds a second one)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for run_dir in sorted(p for p in log_root.iterdir() if p.is_dir()):
        events = EventAccumulator(str(run_dir))
        events.Reload()
        values.update({e.step: e.value for e in events.Scalars(tag)})
    return [values[s] for s in sorted(values)]


def file_tensors(path: Path) -> dict:
    """Every tensor of a .safetensors file, read independently of the code under test's loaders."""
    from library.safetensors_io import SafetensorsReader

    with SafetensorsReader(path) as reader:
        return {k: reader.read(k) for k in reader.keys()}


def assert_same_training(root: Path, a: str, b: str, file: str) -> None:
    """Runs root/a and root/b trained the same: `file` bit-identical tensor by tensor, every logged loss equal."""
    import torch

    x, y = file_tensors(root / a / file), file_tensors(root / b / file)
    assert x.keys() == y.keys()
    assert all(torch.equal(x[k], y[k]) for k in x), [k for k in x if not torch.equal(x[k], y[k])]
    assert logged_losses(root / a / "logs") == logged_losses(root / b / "logs")


def with_batch(argv: list[str], batch: int) -> list[str]:
    """`argv` with --train_batch_size `batch` and without aspect bucketing (see one_and_two_processes)."""
    argv = [a for a in argv if a != "--enable_bucket"]
    argv[argv.index("--train_batch_size") + 1] = str(batch)
    return argv


# How the tests launch their processes: on CPU with gloo (ACCELERATE_USE_CPU); accelerate's own `--cpu` would start
# one process only, as it starts several CPU processes only through mpirun.
LAUNCH_ENV = {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
LAUNCH = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--mixed_precision", "no",
          "--dynamo_backend", "no"]


def _probe_reports(launches: list[list[dict]], machine_flags: list[list[str]]) -> list[dict]:
    """Launch tests/ddp_probe.py once per entry of `machine_flags` (each with its own list of runs), all at once;
    the reports of each run (the same on every process)."""
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    root = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory(prefix="ddp_probe_") as tmp:
        processes = []
        for m, (runs, flags) in enumerate(zip(launches, machine_flags)):
            (Path(tmp) / f"runs{m}.json").write_text(json.dumps(runs))
            command = [sys.executable, *LAUNCH, *flags, str(root / "ddp_probe.py"), str(Path(tmp) / f"runs{m}.json"),
                       str(Path(tmp) / "report")]
            # Output to files, not pipes: a launch blocked on a full pipe would stall the other at a collective.
            with open(Path(tmp) / f"launch{m}.log", "w") as log:
                processes.append(subprocess.Popen(command, env=dict(os.environ, **LAUNCH_ENV), cwd=root.parent,
                                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + 300 * len(launches[0])
        try:  # until all end, one fails (the other would wait for it at a collective), or the time is up
            while any(p.poll() is None for p in processes) and time.monotonic() < deadline \
                    and not any(p.poll() for p in processes):
                time.sleep(0.5)
        finally:
            for p in processes:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)  # the launcher and the workers it started
                    p.wait()
        for m, p in enumerate(processes):
            assert p.returncode == 0, (Path(tmp) / f"launch{m}.log").read_text()[-3000:]
        reports = [json.loads((Path(tmp) / f"report.{rank}.json").read_text()) for rank in (0, 1)]
    assert reports[0] == reports[1], reports
    return reports[0]


def two_processes(runs: list[dict]) -> list[dict]:
    """Each run ({"script", "argv"}, optionally "stop_after": end after N steps as if killed, "fault": a defect
    planted in DDP's averaging) in turn in one `accelerate launch` with 2 CPU processes (gloo), through
    tests/ddp_probe.py; returns the counts of each run's gradient communication and caches (its docstring), the same
    on both processes."""
    return _probe_reports([runs], [["--num_machines", "1"]])


def two_machines(machine0_runs: list[dict], machine1_runs: list[dict]) -> list[dict]:
    """As `two_processes`, but as two "machines" on this host: two `accelerate launch --num_machines 2` (one
    process each, ranks 0 and 1, meeting at a free port of 127.0.0.1), each with its own runs (the same runs, with
    per-machine paths where a test wants to see what each writes)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = [["--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
              "--main_process_port", str(port)] for rank in (0, 1)]
    return _probe_reports([machine0_runs, machine1_runs], flags)


def one_and_two_processes(script: str, one_process_argv: list[str], two_process_argv: list[str]) -> dict:
    """The same run as 1 process x batch 2 (in this process) and as `accelerate launch` with 2 CPU processes (gloo) x
    batch 1 (`two_processes`; its communication counts are returned): each argv's --train_batch_size is set here,
    and aspect bucketing is turned off, so one bucket gives full global batches (a bucket's short last batch is where
    the two layouts legitimately differ: see EpochBatches)."""
    run_script(script, with_batch(one_process_argv, 2))
    return two_processes([{"script": script, "argv": with_batch(two_process_argv, 1)}])[0]


def assert_averaged_once(communication: dict, optimizer_steps: int, *, validations: int = 0) -> None:
    """DDP averaged every trained gradient value exactly once per optimizer step (not once per micro-batch of a
    gradient accumulation, not twice), each time from inside the backward pass (overlapping it), and nothing else
    was all-reduced but the one loss value the log takes per step and the two sums of each validation pass (no
    hand-written gradient averaging)."""
    assert communication["ddp_held"] > 0, communication
    assert communication["ddp_reduced"] == optimizer_steps * communication["ddp_held"], communication
    assert communication["ddp_reduced_after_backward"] == 0, communication
    assert communication["other_all_reduce"] == optimizer_steps + 2 * validations, communication
