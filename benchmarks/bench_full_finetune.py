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

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (RESOLUTION, ROOT, build_in_child, build_model, finish, parse_run_args,  # noqa: E402
                          print_config_table, run_configs, run_training, work_dir)

sys.path.insert(0, str(ROOT))
LR = 1e-5
IMAGES = 2
MIN_FREE_GIB = 16.0  # default --min-free-gib at full size
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


def run_config(name: str, work: Path, model: Path, data: Path, size: str, steps: int, threads: int,
               wait: float) -> dict:
    """train_db.py with configuration `name` for `steps` steps: run_training's figures."""
    out, logs = work / f"out_{name}", work / f"logs_{name}"
    argv = [sys.executable, str(ROOT / "train_db.py"), "--pretrained_model_name_or_path", str(model),
            "--train_data_dir", str(data), "--output_dir", str(out), "--output_name", "bench",
            "--resolution", str(RESOLUTION[size]), "--train_batch_size", "1", "--cache_latents",
            "--stop_text_encoder_training", "-1", "--max_train_steps", str(steps), "--learning_rate", str(LR),
            "--max_data_loader_n_workers", "0", "--seed", "0", "--logging_dir", str(logs),
            *CONFIGS[name][1]]
    return run_training(argv, work / f"{name}.log", logs, out, steps, threads, wait)


def main(argv: list[str] | None = None) -> int:
    args = parse_run_args(__doc__, CONFIGS, MIN_FREE_GIB, argv)
    size = args.size
    if args.build_into:  # the model-building child
        build_model(size, args.build_into)
        return 0

    from tools.make_synthetic_dataset import write_dataset

    work = work_dir(args.workdir, "bench_full_finetune_")
    model, data = work / f"sd15_{size}.safetensors", work / "data"
    # No --enable_bucket: every image (write_dataset mixes aspect ratios) is resized and centre-cropped to the one
    # RxR bucket, so every step has the same 1x4x(R/8)x(R/8) latent. Enough repeats that the N steps stay in one epoch.
    write_dataset(data, images=IMAGES, size=RESOLUTION[size], seed=0, folder=f"{max(1, args.steps)}_sks shape")
    started = time.perf_counter()
    build_in_child([sys.executable, __file__, "--build-into", str(model)] + (["--tiny"] if args.tiny else []),
                   model, size, work / "build.log", args.threads)

    results = run_configs(args.names, args.min_free_gib, args.steps, lambda name: run_config(
        name, work, model, data, size, args.steps, args.threads, args.wait))

    print(f"\n{size} SD 1.5 architecture, {RESOLUTION[size]} px, batch 1, fp32, U-Net trained / text encoder frozen, "
          f"--cache_latents, {args.threads} threads, {args.steps} steps per run; s/step = median of steps "
          f"2..{args.steps} (step 1 excluded), from the run's TensorBoard wall times. Ratios: vs the AdamW row.\n")
    print_config_table(results, CONFIGS, BASELINE)
    return finish(results, work, args, started)


if __name__ == "__main__":
    sys.exit(main())
