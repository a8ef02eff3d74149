"""Seconds per step and peak RSS of a full fine-tune step (`train_db.py`: the whole U-Net trained, text encoder
frozen) for AdamW, AdamW8bit and Adafactor + `--fused_backward_pass`, each with and without
`--gradient_checkpointing`.

    . .venv/bin/activate && export HF_HUB_OFFLINE=1
    python benchmarks/bench_full_finetune.py --tiny        # smoke check: tiny model, 64 px, ~1 min
    python benchmarks/bench_full_finetune.py --tiny --threads 1   # the same, steadier while other jobs share the CPU
    python benchmarks/bench_full_finetune.py               # full SD 1.5 size, 256 px: ~8-10 min on an idle CPU,
                                                           # peak ~15 GB RAM (one run at a time), ~4 GB in /tmp
    python benchmarks/bench_full_finetune.py --only adamw --only adafactor-fused --steps 6
    python benchmarks/bench_full_finetune.py --family sdxl --tiny      # SDXL smoke check (sdxl_train.py), ~2 min
    python benchmarks/bench_full_finetune.py --family sdxl --model /tmp/bench_sdxl/model.safetensors --steps 4
                                                           # full SDXL, 256 px: reuses a kept 14 GB model file

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
memory is available (MemAvailable); the lowest MemAvailable while it runs is printed, and a child killed by SIGKILL
(the kernel's OOM killer, with no swap) is reported as such and spoils no other configuration.

Options besides those below: `--family sdxl` (issue 13) runs `sdxl_train.py` on an SDXL model (random weights, fp32
file ~14 GB) with `--mixed_precision bf16 --cache_latents --cache_text_encoder_outputs` (both text encoders frozen,
the whole U-Net trained) and the configurations meant to fit a 24 GB card: Adafactor (`--optimizer_args
relative_step=False scale_parameter=False warmup_init=False`) + `--fused_backward_pass` + `--full_bf16`, with and
without `--gradient_checkpointing`. `--resolution PX` (default 256; tiny: 64). `--model FILE` reuses a model file of
this family and size (e.g. the one `bench_lora_step.py --family sdxl --keep` built) instead of building one.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import argparse  # noqa: E402
import threading  # noqa: E402

from bench_common import (RESOLUTION, ROOT, build_in_child, build_model, finish, mem_available_gib,  # noqa: E402
                          parse_run_args, print_config_table, run_configs, run_training, work_dir)

sys.path.insert(0, str(ROOT))
LR = 1e-5
IMAGES = 2
MIN_FREE_GIB = {"sd1": 16.0, "sdxl": 12.0}  # default --min-free-gib at full size
SCRIPT = {"sd1": "train_db.py", "sdxl": "sdxl_train.py"}
OOM_NEAR_GIB = 2.0  # a SIGKILLed child whose run saw MemAvailable below this is reported as the OOM killer's
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
# SDXL (sdxl_train.py): the whole U-Net trained, both text encoders frozen, their outputs cached, bf16 mixed precision.
ADAFACTOR = ["--optimizer_type", "Adafactor", "--optimizer_args", "relative_step=False", "scale_parameter=False",
             "warmup_init=False", "--fused_backward_pass", "--full_bf16"]
SDXL_CONFIGS = {
    "adafactor-fused-bf16-gc": ("Adafactor + fused backward + full bf16 + grad checkpointing",
                                [*ADAFACTOR, "--gradient_checkpointing"]),
    "adafactor-fused-bf16": ("Adafactor + fused backward + full bf16", ADAFACTOR),
}
SDXL_COMMON = ["--mixed_precision", "bf16", "--cache_text_encoder_outputs"]


def run_config(name: str, work: Path, model: Path, data: Path, family: str, resolution: int, steps: int,
               threads: int, wait: float) -> dict:
    """train_db.py (sdxl_train.py) with configuration `name` for `steps` steps: run_training's figures, and the
    lowest MemAvailable (GiB) while it ran. A child killed by SIGKILL is reported as the OOM killer's work."""
    out, logs = work / f"out_{name}", work / f"logs_{name}"
    shutil.rmtree(logs, ignore_errors=True)  # a kept work dir holds an earlier run's TensorBoard events
    extra = (["--stop_text_encoder_training", "-1"] if family == "sd1" else SDXL_COMMON)
    configs = SDXL_CONFIGS if family == "sdxl" else CONFIGS
    argv = [sys.executable, str(ROOT / SCRIPT[family]), "--pretrained_model_name_or_path", str(model),
            "--train_data_dir", str(data), "--output_dir", str(out), "--output_name", "bench",
            "--resolution", str(resolution), "--train_batch_size", "1", "--cache_latents",
            *extra, "--max_train_steps", str(steps), "--learning_rate", str(LR),
            "--max_data_loader_n_workers", "0", "--seed", "0", "--logging_dir", str(logs),
            *configs[name][1]]
    lowest, done = [mem_available_gib()], threading.Event()

    def watch() -> None:  # the machine's lowest MemAvailable while the child runs (sampled every 0.2 s)
        while not done.wait(0.2):
            lowest[0] = min(lowest[0], mem_available_gib())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        run = run_training(argv, work / f"{name}.log", logs, out, steps, threads, wait)
    except SystemExit as e:
        if "(exit -9)" in str(e):  # no swap: a child that outgrows the RAM is killed by the kernel's OOM killer
            why = ("the OOM killer: out of memory" if lowest[0] < OOM_NEAR_GIB else
                   "not by this benchmark; memory never ran low, so perhaps not the OOM killer")
            raise SystemExit(f"{name}: KILLED by SIGKILL ({why}; lowest MemAvailable during the run, sampled every "
                             f"0.2 s: {lowest[0]:.1f} GiB)\n{e}") from None
        raise
    finally:
        done.set()
        watcher.join()
    run["min_available"] = lowest[0]
    print(f"{name}: lowest MemAvailable during the run {lowest[0]:.1f} GiB (of "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB RAM)", flush=True)
    return run


def main(argv: list[str] | None = None) -> int:
    # --family, --resolution and --model first: the family decides the configurations the other options choose from.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--family", choices=list(SCRIPT), default="sd1")
    pre.add_argument("--resolution", type=int, default=None)
    pre.add_argument("--model", type=Path, default=None)
    family_args, rest = pre.parse_known_args(argv)
    family = family_args.family
    configs, baseline = (SDXL_CONFIGS, "adafactor-fused-bf16-gc") if family == "sdxl" else (CONFIGS, BASELINE)
    args = parse_run_args(__doc__, configs, MIN_FREE_GIB[family], rest)
    size = args.size
    resolution = family_args.resolution or RESOLUTION[size]
    if args.build_into:  # the model-building child
        build_model(size, args.build_into, family)
        return 0
    if family_args.model and not family_args.model.is_file():
        raise SystemExit(f"--model {family_args.model}: no such file")

    from tools.make_synthetic_dataset import write_dataset

    work = work_dir(args.workdir, "bench_full_finetune_")
    model = family_args.model or work / f"{'sd15' if family == 'sd1' else family}_{size}.safetensors"
    data = work / "data"
    shutil.rmtree(data, ignore_errors=True)  # a kept work dir may hold another run's images
    # No --enable_bucket: every image (write_dataset mixes aspect ratios) is resized and centre-cropped to the one
    # RxR bucket, so every step has the same 1x4x(R/8)x(R/8) latent. Enough repeats that the N steps stay in one epoch.
    write_dataset(data, images=IMAGES, size=resolution, seed=0, folder=f"{max(1, args.steps)}_sks shape")
    started = time.perf_counter()
    if family_args.model:
        print(f"model: {model} ({model.stat().st_size / 2**20:.0f} MiB, not rebuilt)", flush=True)
    else:
        build_in_child([sys.executable, __file__, "--family", family, "--build-into", str(model)]
                       + (["--tiny"] if args.tiny else []), model, size, work / "build.log", args.threads)

    results = run_configs(args.names, args.min_free_gib, args.steps, lambda name: run_config(
        name, work, model, data, family, resolution, args.steps, args.threads, args.wait))

    if family == "sdxl":
        print(f"\n{size} SDXL, {resolution} px, batch 1, bf16 mixed precision, U-Net trained / both text encoders "
              f"frozen, --cache_latents --cache_text_encoder_outputs, {args.threads} threads, {args.steps} steps per "
              f"run; s/step = median of steps 2..{args.steps} (step 1 excluded), from the run's TensorBoard wall "
              f"times. Ratios: vs the first row.\n")
    else:
        print(f"\n{size} SD 1.5 architecture, {RESOLUTION[size]} px, batch 1, fp32, U-Net trained / text encoder "
              f"frozen, --cache_latents, {args.threads} threads, {args.steps} steps per run; s/step = median of steps "
              f"2..{args.steps} (step 1 excluded), from the run's TensorBoard wall times. Ratios: vs the AdamW row.\n")
    print_config_table({name: results[name] for name in args.names}, configs, baseline)
    lows = ", ".join(f"{name} {run['min_available']:.1f}" for name, run in results.items() if run)
    print(f"\nlowest MemAvailable during each run (GiB): {lows or '-'}")
    return finish(results, work, args, started)


if __name__ == "__main__":
    sys.exit(main())
