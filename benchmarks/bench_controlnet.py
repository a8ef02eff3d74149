"""Seconds per step and peak RSS of ControlNet training (`train_controlnet.py`: a ControlNet initialised from the
base U-Net is trained, the base model frozen) with the memory-saving flags off and on.

    . .venv/bin/activate && export HF_HUB_OFFLINE=1
    python benchmarks/bench_controlnet.py --tiny           # smoke check: tiny model, 64 px, ~1 min
    python benchmarks/bench_controlnet.py --tiny --threads 1   # the same, steadier while other jobs share the CPU
    python benchmarks/bench_controlnet.py                  # full SD 1.5 size, 256 px: ~7-10 min on an idle CPU,
                                                           # peak ~12 GB RAM (one run at a time), ~4.3 GB in /tmp
    python benchmarks/bench_controlnet.py --only adamw --only all-cached --steps 6

A model with the SD 1.5 architecture and random weights (no download) is written once, by a child process, as an
original-layout fp32 `.safetensors` (`bench_common.build_model`), next to 2 synthetic captioned images
(`tools/make_synthetic_dataset`) and, as their conditioning images, their same-stem Canny edge maps
(`tools/canny.py`, folder mode, thresholds 16/64). Every configuration then runs the real CLI in its own fresh
child process, one after the other (never two at once: with no swap, two full-size runs can exceed the RAM):

    train_controlnet.py --pretrained_model_name_or_path MODEL --train_data_dir DATA --conditioning_data_dir EDGES
        --resolution 256 --train_batch_size 1 --max_train_steps N --learning_rate 1e-5
        --max_data_loader_n_workers 0 --seed 0 --logging_dir LOGS  [configuration flags, below]

The configurations add, one memory-saving flag at a time (the diffusers guide's order):
`adamw` nothing (AdamW, fp32, the VAE encodes each step's image); `gc` --gradient_checkpointing; `adamw8bit`
--use_8bit_adam (bitsandbytes AdamW8bit); `gc-8bit-bf16` --gradient_checkpointing --use_8bit_adam
--set_grads_to_none --mixed_precision bf16 (frozen U-Net, text encoder and VAE stored in bf16, autocast bf16; the
ControlNet's weights, gradients and optimizer stay fp32); `all-cached` the same plus --cache_latents (the VAE
encodes the 2 images once, before training, so it is not in the timed step). Notes on what the flags do in this
recipe: --gradient_checkpointing checkpoints the ControlNet and the frozen U-Net (whose decoder the gradient
flows back through); --set_grads_to_none is accepted for compatibility only: the shared loop always frees the
gradients (zero_grad(set_to_none=True)), so it changes nothing on its own.

Timing and memory are measured as in bench_full_finetune.py (both use bench_common.py): seconds per step from
the run's own TensorBoard log (wall times of consecutive `loss/current` scalars, one per step: steps 2..N; step 1,
the warm-up with first-touch allocations and optimizer state creation, is excluded; the table shows their median,
min and max); peak RSS is the child's own `ru_maxrss` (`os.wait4`), the peak of the whole run (loading included).
Nothing in the trainer is patched. The final save (a 1.4 GB ControlNet, twice: both layouts) is skipped with
`SDTRAIN_STOP_AFTER_STEPS=N`, the loop's stop-after-N-steps test aid. Threads: `--threads` (default 2) as
OMP_NUM_THREADS / MKL_NUM_THREADS; each child first waits (up to `--wait` s) for an idle CPU, and the share of the
CPU other processes used while it ran is printed. A full-size child is not started while less than
`--min-free-gib` of memory is available (MemAvailable).
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
MIN_FREE_GIB = 14.0  # default --min-free-gib at full size
_GC, _8BIT = ["--gradient_checkpointing"], ["--use_8bit_adam"]
_ALL = _GC + _8BIT + ["--set_grads_to_none", "--mixed_precision", "bf16"]
# name -> (label, extra train_controlnet.py arguments). The first is the baseline of the ratio columns.
CONFIGS = {
    "adamw": ("AdamW, fp32", []),
    "gc": ("AdamW + grad checkpointing", _GC),
    "adamw8bit": ("AdamW8bit (--use_8bit_adam)", _8BIT),
    "gc-8bit-bf16": ("grad checkpointing + AdamW8bit + set_grads_to_none + bf16", _ALL),
    "all-cached": ("grad checkpointing + AdamW8bit + set_grads_to_none + bf16 + cache_latents",
                   _ALL + ["--cache_latents"]),
}
BASELINE = "adamw"


def write_data(work: Path, size: str, steps: int) -> tuple[Path, Path]:
    """2 synthetic captioned images and their same-stem Canny edge maps: (train_data_dir, conditioning_data_dir)."""
    from tools.canny import main as canny
    from tools.make_synthetic_dataset import write_dataset

    data, edges = work / "data", work / "edges"
    # No --enable_bucket: every image (write_dataset mixes aspect ratios) and its edge map get the same resize and
    # centre crop to the one RxR bucket, so every step has the same shapes. Enough repeats that the N steps stay in
    # one epoch.
    images = write_dataset(data, images=IMAGES, size=RESOLUTION[size], seed=0, folder=f"{max(1, steps)}_sks shape")
    # Thresholds below kohya's default 32/224, which finds no edge around the yellow circle on its light ground.
    if canny(["--input", str(images), "--output", str(edges), "--thres1", "16", "--thres2", "64"]) != 0:
        raise SystemExit(f"tools/canny.py failed on {images}")
    return data, edges


def run_config(name: str, work: Path, model: Path, data: Path, edges: Path, size: str, steps: int, threads: int,
               wait: float) -> dict:
    """train_controlnet.py with configuration `name` for `steps` steps: run_training's figures."""
    out, logs = work / f"out_{name}", work / f"logs_{name}"
    argv = [sys.executable, str(ROOT / "train_controlnet.py"), "--pretrained_model_name_or_path", str(model),
            "--train_data_dir", str(data), "--conditioning_data_dir", str(edges), "--output_dir", str(out),
            "--output_name", "bench", "--resolution", str(RESOLUTION[size]), "--train_batch_size", "1",
            "--max_train_steps", str(steps), "--learning_rate", str(LR), "--max_data_loader_n_workers", "0",
            "--seed", "0", "--logging_dir", str(logs), *CONFIGS[name][1]]
    return run_training(argv, work / f"{name}.log", logs, out, steps, threads, wait)


def main(argv: list[str] | None = None) -> int:
    args = parse_run_args(__doc__, CONFIGS, MIN_FREE_GIB, argv)
    size = args.size
    if args.build_into:  # the model-building child
        build_model(size, args.build_into)
        return 0

    work = work_dir(args.workdir, "bench_controlnet_")
    model = work / f"sd15_{size}.safetensors"
    data, edges = write_data(work, size, args.steps)
    started = time.perf_counter()
    build_in_child([sys.executable, __file__, "--build-into", str(model)] + (["--tiny"] if args.tiny else []),
                   model, size, work / "build.log", args.threads)

    results = run_configs(args.names, args.min_free_gib, args.steps, lambda name: run_config(
        name, work, model, data, edges, size, args.steps, args.threads, args.wait))

    print(f"\n{size} SD 1.5 architecture, {RESOLUTION[size]} px, batch 1: ControlNet (from the U-Net) trained, base "
          f"model frozen; {args.threads} threads, {args.steps} steps per run; s/step = median of steps 2..{args.steps} "
          "(step 1 excluded), from the run's TensorBoard wall times. Ratios: vs the AdamW fp32 row.\n")
    print_config_table(results, CONFIGS, BASELINE)
    return finish(results, work, args, started)


if __name__ == "__main__":
    sys.exit(main())
