"""Seconds per step and peak RSS of a full fine-tune step (`train_db.py`: the whole U-Net trained, text encoder
frozen) for AdamW, AdamW8bit and Adafactor + `--fused_backward_pass`, each with and without
`--gradient_checkpointing`.

    . .venv/bin/activate && export HF_HUB_OFFLINE=1
    python benchmarks/bench_full_finetune.py --tiny        # smoke check: tiny model, 64 px, ~1 min
    python benchmarks/bench_full_finetune.py --tiny --threads 1   # the same, steadier while other jobs share the CPU
    python benchmarks/bench_full_finetune.py               # full SD 1.5 size, 256 px: ~8-10 min on an idle CPU,
                                                           # peak ~15 GB RAM (one run at a time), ~4 GB in /tmp
    python benchmarks/bench_full_finetune.py --only adamw --only adafactor-fused --steps 6

A model with the SD 1.5 architecture and random weights (no download) is written once, by a child process, as an
original-layout fp32 `.safetensors`, next to 2 synthetic captioned images (`tools/make_synthetic_dataset`).
Every configuration then runs the real CLI in its own fresh child process, one after the other (never two at once:
with no swap, two full-size runs can exceed the RAM):

    train_db.py --pretrained_model_name_or_path MODEL --train_data_dir DATA --resolution 256 --train_batch_size 1
        --cache_latents --stop_text_encoder_training -1 --max_train_steps N --optimizer_type OPT
        --learning_rate 1e-5 --max_data_loader_n_workers 0 --seed 0 --logging_dir LOGS [--gradient_checkpointing]
        [--fused_backward_pass]

`--stop_text_encoder_training -1`: the text encoder never trains (it still runs forward, frozen, every step);
`--cache_latents`: the VAE encodes the images once before training, so it is not in the timed step.

Seconds per step come from the run's own TensorBoard log: the trainer writes `loss/current` once per step, right
after the step ends, with its wall time. The differences between consecutive steps' wall times are the durations of
steps 2..N (data loading, forward, backward, optimizer, LR scheduler, logging: the whole step); step 1 (warm-up:
first-touch allocations, optimizer state creation) is excluded, and the table shows the median of the rest, with
their min and max. Nothing in the trainer is patched.

The final model save is skipped (`SDTRAIN_STOP_AFTER_STEPS=N`, the loop's stop-after-N-steps test aid: the run ends
after step N as if interrupted), since it writes a full 4 GB checkpoint per configuration and is no part of a step.

Peak RSS is each child's own `ru_maxrss` (from `os.wait4`): it includes loading the model and caching the latents,
so it is the peak of the whole run, which for full training is reached during the steps (weights + gradients +
optimizer state). Threads: `--threads` (default 2, the machine's cores) as OMP_NUM_THREADS / MKL_NUM_THREADS. Other
jobs distort the timings: each child first waits (up to `--wait` s) for an idle CPU, and the share of the CPU other
processes used while it ran is printed. A full-size child is not started while less than `--min-free-gib` of
memory is available (MemAvailable).
"""

from __future__ import annotations

import argparse
import glob
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora_step import run_child  # noqa: E402  (same child runner: fresh process, wait4 rusage, CPU share)

RESOLUTION = {"full": 256, "tiny": 64}
LR = 1e-5
IMAGES = 2
# name -> (label, extra train_db.py arguments). The first is the baseline of the ratio columns.
CONFIGS = {
    "adamw": ("AdamW", ["--optimizer_type", "AdamW"]),
    "adamw-gc": ("AdamW + grad checkpointing", ["--optimizer_type", "AdamW", "--gradient_checkpointing"]),
    "adamw8bit": ("AdamW8bit", ["--optimizer_type", "AdamW8bit"]),
    "adamw8bit-gc": ("AdamW8bit + grad checkpointing", ["--optimizer_type", "AdamW8bit", "--gradient_checkpointing"]),
    "adafactor-fused": ("Adafactor + fused backward", ["--optimizer_type", "Adafactor", "--fused_backward_pass"]),
    "adafactor-fused-gc": ("Adafactor + fused backward + grad checkpointing",
                           ["--optimizer_type", "Adafactor", "--fused_backward_pass", "--gradient_checkpointing"]),
}
BASELINE = "adamw"


def build_model(size: str, dest: Path) -> None:
    """Child process: random-weight SD 1.5 models -> original-layout fp32 .safetensors."""
    from library.checkpoint_writer import SaveFormat, save_checkpoint
    from library.families import FAMILIES, ModelSize
    from library.model_loading import checkpoint_from_models
    from library.tiny_models import build_random_models

    models = build_random_models(FAMILIES["sd1"], ModelSize(size), seed=0, perturb=False)
    save_checkpoint(checkpoint_from_models(models), dest, SaveFormat.SAFETENSORS)


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


def mem_available_gib() -> float:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2 ** 20
    return float("inf")


def run_config(name: str, work: Path, model: Path, data: Path, size: str, steps: int, threads: int,
               wait: float) -> dict:
    out, logs = work / f"out_{name}", work / f"logs_{name}"
    argv = [sys.executable, str(ROOT / "train_db.py"), "--pretrained_model_name_or_path", str(model),
            "--train_data_dir", str(data), "--output_dir", str(out), "--output_name", "bench",
            "--resolution", str(RESOLUTION[size]), "--train_batch_size", "1", "--cache_latents",
            "--stop_text_encoder_training", "-1", "--max_train_steps", str(steps), "--learning_rate", str(LR),
            "--max_data_loader_n_workers", "0", "--seed", "0", "--logging_dir", str(logs),
            *CONFIGS[name][1]]
    run = run_child(argv, work / f"{name}.log", threads, wait, SDTRAIN_STOP_AFTER_STEPS=str(steps))
    run["steps"] = step_times(logs)
    if len(run["steps"]) != steps - 1:
        raise SystemExit(f"{work / f'{name}.log'}: expected {steps} logged steps, got {len(run['steps']) + 1}")
    shutil.rmtree(out, ignore_errors=True)
    return run


def ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}" if value is not None and base else "-"


def print_table(results: dict[str, dict | None], size: str, steps: int, threads: int) -> None:
    print(f"\n{size} SD 1.5 architecture, {RESOLUTION[size]} px, batch 1, fp32, U-Net trained / text encoder frozen, "
          f"--cache_latents, {threads} threads, {steps} steps per run; s/step = median of steps 2..{steps} "
          "(step 1 excluded), from the run's TensorBoard wall times. Ratios: vs the AdamW row.\n")
    print("| configuration | s/step (median) | min | max | peak RSS GiB | s/step ratio | peak RSS ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = results.get(BASELINE)
    base_s = statistics.median(base["steps"]) if base else None
    base_rss = base["rss"] / 1024 if base else None
    for name, run in results.items():
        label = f"{CONFIGS[name][0]} (`{name}`)"
        if run is None:
            print(f"| {label} | failed | - | - | - | - | - |")
            continue
        med, rss = statistics.median(run["steps"]), run["rss"] / 1024  # run_child gives MiB
        print(f"| {label} | {med:.3f} | {min(run['steps']):.3f} | {max(run['steps']):.3f} | {rss:.2f} | "
              f"{ratio(med, base_s)} | {ratio(rss, base_rss)} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny model at 64 px: checks the script in seconds")
    p.add_argument("--steps", type=int, default=4, help="steps per run (the first is excluded from the timing)")
    p.add_argument("--only", action="append", choices=list(CONFIGS), metavar="NAME",
                   help=f"run only this configuration (repeatable): {', '.join(CONFIGS)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--wait", type=float, default=None,
                   help="seconds to wait for an idle CPU before each child (default: 60 full size, 0 with --tiny)")
    p.add_argument("--min-free-gib", type=float, default=None,
                   help="do not start a child while MemAvailable is below this (default: 16 full size, 0 with --tiny)")
    p.add_argument("--workdir", type=Path, default=None, help="where the model, data and logs go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--build-into", type=Path, default=None, help=argparse.SUPPRESS)  # internal: the model child
    args = p.parse_args(argv)
    size = "tiny" if args.tiny else "full"
    if args.build_into:
        build_model(size, args.build_into)
        return 0
    if args.steps < 2:
        p.error("--steps must be at least 2 (step 1 is the warm-up, excluded from the timing)")
    wait = args.wait if args.wait is not None else (0.0 if args.tiny else 60.0)
    min_free = args.min_free_gib if args.min_free_gib is not None else (0.0 if args.tiny else 16.0)
    names = [n for n in CONFIGS if not args.only or n in args.only]

    from tools.make_synthetic_dataset import write_dataset

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_full_finetune_"))
    work.mkdir(parents=True, exist_ok=True)
    model, data = work / f"sd15_{size}.safetensors", work / "data"
    # No --enable_bucket: every image (write_dataset mixes aspect ratios) is resized and centre-cropped to the one
    # RxR bucket, so every step has the same 1x4x(R/8)x(R/8) latent. Enough repeats that the N steps stay in one epoch.
    write_dataset(data, images=IMAGES, size=RESOLUTION[size], seed=0, folder=f"{max(1, args.steps)}_sks shape")
    started = time.perf_counter()
    build = run_child([sys.executable, __file__, "--build-into", str(model)] + (["--tiny"] if args.tiny else []),
                      work / "build.log", args.threads, 0.0)
    print(f"built {size} model: {model.stat().st_size / 2**20:.0f} MiB in {build['wall']:.1f} s "
          f"(peak RSS {build['rss']:.0f} MiB)", flush=True)

    results: dict[str, dict | None] = {}
    for name in names:
        free = mem_available_gib()
        if free < min_free:
            print(f"{name}: skipped, only {free:.1f} GiB of memory available (--min-free-gib {min_free:g})")
            results[name] = None
            continue
        try:
            run = run_config(name, work, model, data, size, args.steps, args.threads, wait)
        except (SystemExit, ValueError) as e:  # one failed configuration (e.g. killed for memory) spoils no other
            print(f"{name}: FAILED\n{e}", flush=True)
            results[name] = None
            continue
        results[name] = run
        print(f"{name}: process {run['wall']:.1f} s wall, {run['cpu']:.1f} s CPU, peak RSS {run['rss']:.0f} MiB, "
              f"others used {100 * run['others']:.0f} % CPU; steps 2..{args.steps}: "
              f"{', '.join(f'{t:.3f}' for t in run['steps'])} s", flush=True)

    print_table(results, size, args.steps, args.threads)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.keep:
        print(f"kept {work}")
    elif args.workdir is None:
        shutil.rmtree(work)
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
