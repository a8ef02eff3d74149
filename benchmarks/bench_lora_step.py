"""Seconds per step and peak RSS of a LoRA run (`train_network.py`) next to the bare compute floor.

    . .venv/bin/activate && export HF_HUB_OFFLINE=1
    python benchmarks/bench_lora_step.py --size tiny   # smoke check (tiny model, 64 px), under a minute
    python benchmarks/bench_lora_step.py               # full SD 1.5 size, 256 px, 2 threads: ~10 min on an idle CPU
    python benchmarks/bench_lora_step.py --threads 1   # ~25 min; far steadier while other jobs share the CPU

A model with the SD 1.5 architecture and random weights (no download) is written once as an original-layout fp32
`.safetensors` by a child process, next to 8 synthetic captioned images. Every measurement runs in a fresh child
process; the configurations alternate for `--repeats` rounds:

- "ours": the real CLI, `train_network.py --resolution 256 --network_dim 16 --network_alpha 16 --train_batch_size 1
  --cache_latents ...` (text-encoder LoRA on), once for W and once for W + K steps. Seconds per step =
  (t(W + K) - t(W)) / K, t being the trainer's own "trained N steps in T s" (CPU: the processes' user + sys time).
  Start-up, loading, latent caching, the first W steps and the final save cancel out. Cross-check: the CLI file runs
  under `runpy` with `Trainer._log` wrapped to record wall and CPU time after every step (nothing else changes), which
  gives steps W+1..W+K of the W + K run one by one.
- "floor": the same model (`read_checkpoint` + `instantiate_models`) and LoRA (`create_network` + `apply_to`), then
  the bare step: tokenize a fixed caption, text-encoder forward (with grad), U-Net forward on a 1x4x32x32 latent
  with random noise and timestep, MSE loss, backward, AdamW step, zero_grad; K steps after W warm-up steps. Then, in
  the same process, the LoRA is removed and K steps of a reference are timed: U-Net + text-encoder forward/backward
  of the same shapes with no LoRA and no optimizer (gradients flow to the activations only).

`--threads` intra-op threads (default 2, the machine's cores): the floor calls `torch.set_num_threads`, the CLI gets
OMP_NUM_THREADS and MKL_NUM_THREADS (torch reads them at start-up). Peak RSS is each child's own `ru_maxrss` (from
`os.wait4`); it includes loading the model (and, for "ours", the latent cache). Other jobs distort the timings: each
child first waits (up to 60 s) for an idle CPU, and the share of the CPU other processes used while it ran is shown.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import RESOLUTION, ROOT, build_in_child, build_model, machine_line, run_child, work_dir  # noqa: E402

CAPTION = "sks shape, red circle, simple background"
RANK, LR = 16, 1e-4
# "ours" runs the CLI file as __main__, recording (wall, CPU) times after each step (Trainer._log ends a step).
HOOK = """import json, os, runpy, sys, time
import library.training_loop as tl
stamps, log = [], tl.Trainer._log
def timed_log(self, *args):
    log(self, *args)
    stamps.append((time.perf_counter(), time.process_time()))
tl.Trainer._log = timed_log
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    open(os.environ["BENCH_STEP_STAMPS"], "w").write(json.dumps(stamps))
"""


def floor(model: Path, size: str, threads: int, warmup: int, steps: int, result: Path) -> None:
    """Child process: the bare LoRA step, then the no-LoRA reference; writes their step times to `result`."""
    import torch
    import torch.nn.functional as F

    from library.model_loading import instantiate_models
    from library.sd_checkpoint import read_checkpoint
    from networks.lora import create_network

    torch.set_num_threads(threads)
    with read_checkpoint(model) as checkpoint:
        models = instantiate_models(checkpoint)
    unet, te, tokenizer = models.unet, models.text_encoder, models.tokenizer
    for m in (unet, te, models.vae):  # the VAE stays loaded, as in the trainer
        m.requires_grad_(False)
    torch.manual_seed(0)
    network = create_network(1.0, RANK, RANK, None, te, unet)
    network.apply_to(te, unet)
    groups, _ = network.prepare_optimizer_params(None, None, LR)
    optimizer = torch.optim.AdamW(groups, lr=LR)
    latents = torch.randn(1, 4, RESOLUTION[size] // 8, RESOLUTION[size] // 8)

    def step(lora: bool):
        ids = tokenizer([CAPTION], padding="max_length", truncation=True, max_length=77, return_tensors="pt").input_ids
        cond = te(ids).last_hidden_state
        noise = torch.randn_like(latents)
        noisy = latents + noise if lora else (latents + noise).requires_grad_(True)
        prediction = unet(noisy, torch.randint(0, 1000, (1,)), cond).sample
        F.mse_loss(prediction, noise).backward()
        if lora:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def timed(lora: bool) -> list[tuple[float, float]]:  # (wall, CPU) seconds of each measured step
        times = []
        for _ in range(warmup + steps):
            wall, cpu = time.perf_counter(), time.process_time()
            step(lora)
            times.append((time.perf_counter() - wall, time.process_time() - cpu))
        return times[warmup:]

    out = {"floor": timed(True)}
    network.restore()
    # Without the LoRA nothing in the text encoder needs a gradient: make its embeddings' output need one, so the
    # backward pass runs through the text encoder as it does with the LoRA.
    embeddings = getattr(te, "embeddings", None) or te.text_model.embeddings
    embeddings.register_forward_hook(lambda module, inputs, output: output.detach().requires_grad_(True))
    out["reference"] = timed(False)
    result.write_text(json.dumps(out))


def ours(work: Path, model: Path, data: Path, size: str, threads: int, steps: int, tag: str, wait: float) -> dict:
    """train_network.py for `steps` steps: run_child's figures, the trainer's own total and per-step (wall, CPU)."""
    out, stamps, log = work / f"out_{tag}", work / f"{tag}.stamps.json", work / f"{tag}.log"
    argv = [sys.executable, "-c", HOOK, str(ROOT / "train_network.py"), "--pretrained_model_name_or_path", str(model),
            "--train_data_dir", str(data), "--output_dir", str(out), "--output_name", "lora",
            "--resolution", str(RESOLUTION[size]), "--network_dim", str(RANK), "--network_alpha", str(RANK),
            "--train_batch_size", "1", "--cache_latents", "--max_train_steps", str(steps), "--learning_rate", str(LR),
            "--max_data_loader_n_workers", "0", "--seed", "0"]
    run = run_child(argv, log, threads, wait, BENCH_STEP_STAMPS=str(stamps))
    shutil.rmtree(out)
    found = re.findall(r"trained (\d+) steps in ([\d.]+) s", log.read_text())
    times = json.loads(stamps.read_text())
    if not found or int(found[-1][0]) != steps or len(times) != steps:
        raise SystemExit(f"{log}: expected {steps} steps and a 'trained {steps} steps in ... s' line")
    run["total"] = float(found[-1][1])
    run["steps"] = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(times, times[1:])]  # steps 2..N
    return run


def print_table(metric: int, labels: dict, rounds: dict, steps: dict, rss: dict) -> None:
    """One markdown table for metric 0 (wall) or 1 (CPU): per configuration the mean, min and max over rounds of
    the round's s/step, the median single step, and each of these relative to the floor's."""
    print("| configuration | mean | min | max | median step | peak RSS MiB | vs floor: mean | min | median step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    floor_rounds = [r[metric] for r in rounds["floor"]]
    floor_median = statistics.median(s[metric] for s in steps["floor"])
    pct = lambda a, b: f"{100 * (a / b - 1):+.1f} %"  # noqa: E731
    for name, values in rounds.items():
        v = [r[metric] for r in values]
        median = statistics.median(s[metric] for s in steps[name]) if name in steps else None
        print(f"| {labels[name]} | {statistics.mean(v):.3f} | {min(v):.3f} | {max(v):.3f} | "
              f"{'-' if median is None else f'{median:.3f}'} | {f'{rss[name]:.0f}' if name in rss else '-'} | "
              f"{pct(statistics.mean(v), statistics.mean(floor_rounds))} | {pct(min(v), min(floor_rounds))} | "
              f"{'-' if median is None else pct(median, floor_median)} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["full", "tiny"], default="full")
    p.add_argument("--warmup", type=int, default=2, help="W: steps not measured (default 2)")
    p.add_argument("--steps", type=int, default=6, help="K: steps measured (default 6; W + K <= 8 is one epoch)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--repeats", type=int, default=None, help="rounds of ours + floor (default 3; tiny: 1)")
    p.add_argument("--workdir", type=Path, default=None, help="where the files go (default: a new temp dir in /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (default: delete it at the end)")
    p.add_argument("--build-into", type=Path, help=argparse.SUPPRESS)  # internal: the model-building child
    p.add_argument("--floor", nargs=2, type=Path, help=argparse.SUPPRESS)  # internal: MODEL RESULT, the floor child
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    w, k, size, threads = args.warmup, args.steps, args.size, args.threads
    if w < 1 or k < 1:
        p.error("--warmup and --steps must be at least 1")
    if args.build_into:
        build_model(size, args.build_into)
        return 0
    if args.floor:
        floor(args.floor[0], size, threads, w, k, args.floor[1])
        return 0
    repeats = args.repeats or (1 if size == "tiny" else 3)
    wait = 0.0 if size == "tiny" else 60.0  # seconds to wait for an idle CPU before each child

    from tools.make_synthetic_dataset import write_dataset  # PIL only: this process never imports torch

    work = work_dir(args.workdir, "bench_lora_step_")
    print(f"{machine_line()}; {threads} thread(s); work dir {work}")
    model, data = work / "model.safetensors", work / "data"
    write_dataset(data, images=8, size=RESOLUTION[size], seed=0, folder="1_sks shape")
    build_in_child([sys.executable, __file__, "--size", size, "--build-into", str(model)], model, size,
                   work / "build.log", threads)

    # (wall, CPU) s/step of each round, and of every single measured step (the difference has no single steps).
    labels = {"ours": "ours: `train_network.py`, (t(W+K) - t(W)) / K",
              "ours steps": "ours: single steps W+1..W+K of the same W+K runs",
              "floor": "floor: bare LoRA step (TE + U-Net fwd/bwd, AdamW)",
              "reference": "reference: TE + U-Net fwd/bwd, no LoRA, no optimizer"}
    rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in labels}
    steps: dict[str, list[tuple[float, float]]] = {name: [] for name in ("ours steps", "floor", "reference")}
    rss = {"ours": 0.0, "floor": 0.0}
    mean = lambda pairs: tuple(statistics.mean(p[i] for p in pairs) for i in (0, 1))  # noqa: E731
    show = lambda pairs: ", ".join(f"{a:.2f}/{b:.2f}" for a, b in pairs)  # noqa: E731
    for r in range(1, repeats + 1):
        short, full = (ours(work, model, data, size, threads, n, f"ours{r}_{n}", wait) for n in (w, w + k))
        rounds["ours"].append(((full["total"] - short["total"]) / k, (full["cpu"] - short["cpu"]) / k))
        steps["ours steps"] += full["steps"][w - 1:]
        rounds["ours steps"].append(mean(full["steps"][w - 1:]))
        rss["ours"] = max(rss["ours"], short["rss"], full["rss"])
        for run, n in ((short, w), (full, w + k)):
            print(f"  round {r}: ours {n} steps: trainer {run['total']:.1f} s, process {run['wall']:.1f} s wall, "
                  f"{run['cpu']:.1f} s CPU, peak RSS {run['rss']:.0f} MiB, others used {100 * run['others']:.0f} % CPU")
        print(f"  round {r}: ours, wall/CPU s per step: difference {'%.2f/%.2f' % rounds['ours'][-1]}; "
              f"single steps {show(full['steps'][w - 1:])}", flush=True)
        result = work / f"floor{r}.json"
        argv = [sys.executable, __file__, "--size", size, "--threads", str(threads), "--warmup", str(w),
                "--steps", str(k), "--floor", str(model), str(result)]
        run = run_child(argv, work / f"floor{r}.log", threads, wait)
        rss["floor"] = max(rss["floor"], run["rss"])
        for name, times in json.loads(result.read_text()).items():
            steps[name] += times
            rounds[name].append(mean(times))
            print(f"  round {r}: {name}, wall/CPU s per step: {show(times)}")
        print(f"  round {r}: floor process {run['wall']:.1f} s, peak RSS {run['rss']:.0f} MiB, others used "
              f"{100 * run['others']:.0f} % CPU", flush=True)

    print(f"\n{size} model, {RESOLUTION[size]} px, rank {RANK}, batch 1, {threads} threads, W={w}, K={k}, "
          f"{repeats} round(s). s/step of each round: mean, min, max over the rounds; median of all single steps.")
    for metric, title in ((0, "wall-clock seconds per step"), (1, "CPU seconds per step (process user + sys)")):
        print(f"\n{title}\n")
        print_table(metric, labels, rounds, steps, rss)
    if args.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
