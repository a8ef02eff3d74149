"""Pieces the benchmark scripts share: the random-weight model, the child-process runner with its CPU and memory
figures, TensorBoard step times, and, for the scripts that run one trainer configuration per child
(bench_full_finetune.py, bench_controlnet.py), their command-line options, configuration loop and result table.

Only the standard library is imported here (torch and tensorboard only inside the functions that need them): a
child's `ru_maxrss` starts at its parent's peak RSS, so the benchmark process must stay small.
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
RESOLUTION = {"full": 256, "tiny": 64}  # training resolution in px for --size / --tiny


def machine_line() -> str:
    """'machine: ...' with the CPU architecture, core count, RAM and the python and torch versions."""
    return (f"machine: {platform.machine()}, nproc {os.cpu_count()}, "
            f"RAM {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB; "
            f"python {platform.python_version()}, torch {importlib.metadata.version('torch')}")


def build_model(size: str, dest: Path, family: str = "sd1") -> None:
    """Child process: random-weight models of a family (default SD 1.5) -> original-layout fp32 .safetensors."""
    from library.checkpoint_writer import SaveFormat, save_checkpoint
    from library.families import FAMILIES, ModelSize
    from library.model_loading import checkpoint_from_models
    from library.tiny_models import build_random_models

    models = build_random_models(FAMILIES[family], ModelSize(size), seed=0, perturb=False)
    save_checkpoint(checkpoint_from_models(models), dest, SaveFormat.SAFETENSORS)


def model_file_parser(description: str) -> argparse.ArgumentParser:
    """The options of the scripts that build one random-weight model file and run tools on it (bench_conversion,
    bench_loading, bench_gen_img): --size, --family, --workdir, --keep, and the internal --build-into."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["full", "tiny"], default="full")
    p.add_argument("--family", choices=["sd1", "sdxl"], default="sd1")
    p.add_argument("--workdir", type=Path, default=None, help="where the files go (default: a new temp dir in /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (default: delete it at the end)")
    p.add_argument("--build-into", type=Path, help=argparse.SUPPRESS)  # internal: the model-building child
    return p


def finish_work(work: Path, log: Path, keep: bool) -> None:
    if keep:
        print(f"kept {work} (log: {log})")
    else:
        shutil.rmtree(work)


def work_dir(given: Path | None, prefix: str) -> Path:
    """The work folder: `given` (created if missing) or else a new temp dir in /tmp named `prefix...`."""
    work = given or Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    return work


def cpu_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    ticks = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - ticks[3] - ticks[4]) / hz, sum(ticks) / hz  # idle and iowait are not busy


def wait_for_idle(limit: float) -> None:
    """Wait (up to `limit` s) until other processes use under 10 % of the CPU for 2 s."""
    deadline = time.monotonic() + limit
    while limit and time.monotonic() < deadline:
        b0, t0 = cpu_busy()
        time.sleep(2)
        b1, t1 = cpu_busy()
        if (b1 - b0) < 0.1 * (t1 - t0):
            return
    if limit:
        print(f"  (the CPU was not idle within {limit:.0f} s: measuring anyway)", flush=True)


def run_child(argv: list[str], log: Path, threads: int | None = None, wait: float = 0.0, append: bool = False,
              **env: str) -> dict:
    """Run `argv` in a fresh process: its wall s, CPU s (user + sys), peak RSS MiB, CPU share of other processes.

    Output goes to `log` (`append`: after what it holds). `threads` sets OMP_NUM_THREADS / MKL_NUM_THREADS (None:
    inherited); `wait`: seconds to wait for an idle CPU first; `env`: further environment variables. A child that
    fails raises SystemExit with the tail of its log.
    """
    wait_for_idle(wait)
    if threads is not None:
        env = dict(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **env)
    env = dict(os.environ, HF_HUB_OFFLINE="1", **env)
    with open(log, "a" if append else "w") as out:
        out.write(("\n" if append else "") + f"$ {' '.join(argv)}\n")
        out.flush()
        busy0, total0 = cpu_busy()
        start = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # rusage of this child alone (RUSAGE_CHILDREN keeps the max)
        wall = time.perf_counter() - start
        busy1, total1 = cpu_busy()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"failed (exit {code}): {' '.join(argv)}\n--- {log} (tail) ---\n{log.read_text()[-3000:]}")
    cpu = usage.ru_utime + usage.ru_stime
    return {"wall": wall, "cpu": cpu, "rss": usage.ru_maxrss / 1024,  # Linux reports ru_maxrss in KiB
            "others": max(0.0, busy1 - busy0 - cpu) / max(total1 - total0, 1e-9)}


def build_in_child(argv: list[str], model: Path, size: str, log: Path, threads: int) -> dict:
    """Run the model-building child `argv` (which writes `model`) and print the file's size, time and peak RSS."""
    build = run_child(argv, log, threads, 0.0)
    print(f"built {size} model: {model.stat().st_size / 2**20:.0f} MiB in {build['wall']:.1f} s "
          f"(peak RSS {build['rss']:.0f} MiB)", flush=True)
    return build


def mem_available_gib() -> float:
    """The machine's available memory (MemAvailable in /proc/meminfo) in GiB; infinite if not reported."""
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2 ** 20
    return float("inf")


def step_times(logging_dir: Path) -> list[float]:
    """Durations of steps 2..N: differences of the wall times of consecutive `loss/current` scalars."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    stamps = {}
    for path in sorted(glob.glob(str(logging_dir / "**" / "events.out.tfevents.*"), recursive=True)):
        for event in EventFileLoader(path).Load():
            if any(v.tag == "loss/current" for v in event.summary.value):
                stamps[event.step] = event.wall_time
    steps = sorted(stamps)
    if steps != list(range(1, len(steps) + 1)):
        raise ValueError(f"{logging_dir}: expected loss/current at steps 1..N, found steps {steps}")
    return [stamps[s] - stamps[s - 1] for s in steps[1:]]


def ratio(value: float | None, base: float | None) -> str:
    """`value / base` to two decimals, or '-' when either is missing."""
    return f"{value / base:.2f}" if value is not None and base else "-"


# --- one trainer configuration per child: bench_full_finetune.py, bench_controlnet.py ---

def parse_run_args(description: str, configs: dict, min_free_gib: float,
                   argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a configuration benchmark's command line, with `size`, `wait`, `min_free_gib` and `names` resolved.

    Options: --tiny, --steps, --only, --threads, --wait, --min-free-gib (default `min_free_gib` at full size),
    --workdir, --keep, and the internal --build-into (the model-building child: nothing else is checked).
    """
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny model at 64 px: checks the script in about a minute")
    p.add_argument("--steps", type=int, default=4, help="steps per run (the first is excluded from the timing)")
    p.add_argument("--only", action="append", choices=list(configs), metavar="NAME",
                   help=f"run only this configuration (repeatable): {', '.join(configs)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--wait", type=float, default=None,
                   help="seconds to wait for an idle CPU before each child (default: 60 full size, 0 with --tiny)")
    p.add_argument("--min-free-gib", type=float, default=None,
                   help=f"do not start a child while MemAvailable is below this (default: {min_free_gib:g} full "
                        "size, 0 with --tiny)")
    p.add_argument("--workdir", type=Path, default=None, help="where the model, data and logs go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--build-into", type=Path, default=None, help=argparse.SUPPRESS)  # internal: the model child
    args = p.parse_args(argv)
    args.size = "tiny" if args.tiny else "full"
    if args.build_into:
        return args
    if args.steps < 2:
        p.error("--steps must be at least 2 (step 1 is the warm-up, excluded from the timing)")
    if args.wait is None:
        args.wait = 0.0 if args.tiny else 60.0
    if args.min_free_gib is None:
        args.min_free_gib = 0.0 if args.tiny else min_free_gib
    args.names = [n for n in configs if not args.only or n in args.only]
    return args


def run_training(argv: list[str], log: Path, logs: Path, out: Path, steps: int, threads: int, wait: float) -> dict:
    """Run a trainer CLI for `steps` steps (no final save): run_child's figures plus the step times from `logs`.

    "steps" holds the durations of steps 2..N from the TensorBoard log in `logs`; the output folder `out` is deleted.
    """
    run = run_child(argv, log, threads, wait, SDTRAIN_STOP_AFTER_STEPS=str(steps))
    run["steps"] = step_times(logs)
    if len(run["steps"]) != steps - 1:
        raise SystemExit(f"{log}: expected {steps} logged steps, got {len(run['steps']) + 1}")
    shutil.rmtree(out, ignore_errors=True)
    return run


def run_configs(names: list[str], min_free: float, steps: int,
                run_one: Callable[[str], dict]) -> dict[str, dict | None]:
    """Run each configuration in turn with `run_one(name)` and print its progress line: name -> run, or None.

    A configuration is skipped while less than `min_free` GiB of memory is available; a failed one spoils no other.
    """
    results: dict[str, dict | None] = {}
    for name in names:
        free = mem_available_gib()
        if free < min_free:
            print(f"{name}: skipped, only {free:.1f} GiB of memory available (--min-free-gib {min_free:g})")
            results[name] = None
            continue
        try:
            run = run_one(name)
        except (SystemExit, ValueError) as e:  # one failed configuration (e.g. killed for memory) spoils no other
            print(f"{name}: FAILED\n{e}", flush=True)
            results[name] = None
            continue
        results[name] = run
        print(f"{name}: process {run['wall']:.1f} s wall, {run['cpu']:.1f} s CPU, peak RSS {run['rss']:.0f} MiB, "
              f"others used {100 * run['others']:.0f} % CPU; steps 2..{steps}: "
              f"{', '.join(f'{t:.3f}' for t in run['steps'])} s", flush=True)
    return results


def print_config_table(results: dict[str, dict | None], configs: dict, baseline: str) -> None:
    """Markdown table: per configuration the median, min and max s/step, peak RSS GiB, and both vs `baseline`'s."""
    print("| configuration | s/step (median) | min | max | peak RSS GiB | s/step ratio | peak RSS ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = results.get(baseline)
    base_s = statistics.median(base["steps"]) if base else None
    base_rss = base["rss"] / 1024 if base else None
    for name, run in results.items():
        label = f"{configs[name][0]} (`{name}`)"
        if run is None:
            print(f"| {label} | failed | - | - | - | - | - |")
            continue
        med, rss = statistics.median(run["steps"]), run["rss"] / 1024  # run_child gives MiB
        print(f"| {label} | {med:.3f} | {min(run['steps']):.3f} | {max(run['steps']):.3f} | {rss:.2f} | "
              f"{ratio(med, base_s)} | {ratio(rss, base_rss)} |")


def finish(results: dict[str, dict | None], work: Path, args: argparse.Namespace, started: float) -> int:
    """Print the total time, keep the work folder (--keep) or delete it if it was a temp dir; 1 if any run failed."""
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.keep:
        print(f"kept {work}")
    elif args.workdir is None:
        shutil.rmtree(work)
    return 0 if all(results.values()) else 1
