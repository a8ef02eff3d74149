"""Seconds per step and peak RSS of a LoRA run (`train_network.py`) next to the bare compute floor.

    . .venv/bin/activate && export HF_HUB_OFFLINE=1
    python benchmarks/bench_lora_step.py --size tiny   # smoke check (tiny model, 64 px), under a minute
    python benchmarks/bench_lora_step.py               # full SD 1.5 size, 256 px, 2 threads: ~10 min on an idle CPU
    python benchmarks/bench_lora_step.py --threads 1   # ~25 min; far steadier while other jobs share the CPU
    python benchmarks/bench_lora_step.py --family sdxl --size tiny   # SDXL smoke check, about a minute
    python benchmarks/bench_lora_step.py --family sdxl --warmup 1 --steps 3 --repeats 1 --keep \
        --workdir /tmp/bench_sdxl                      # full SDXL, 256 px: ~10 min, ~15 GB disk, ~9 GB RAM
    python benchmarks/bench_lora_step.py --family sdxl --model /tmp/bench_sdxl/model.safetensors --resolution 512 ...

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
"Time to first step" is read in the "ours" child: from the process's start (its /proc start time) to the start of
the first optimizer step (imports, model loading, caching, network and optimizer set-up) and to its end.

`--family sdxl` (issue 13): the same on an SDXL model (random weights, fp32 file ~14 GB), trained the way that fits
a 24 GB card: "ours" is `sdxl_train_network.py ... --network_train_unet_only --cache_text_encoder_outputs
--cache_latents --mixed_precision bf16 --network_dim 16 --network_alpha 16` (U-Net LoRA only); the floor loads the
same modules in the precision policy's dtypes (every frozen weight in bf16), releases the text encoders as the
trainer does once their outputs are cached, applies the fp32 LoRA to the U-Net only, and times the bare step under
bf16 autocast: fixed text conditioning (random hidden states [1, 77, 2048], pooled output [1, 1280] and time ids
[1, 6]), U-Net forward on the noised latent, MSE, backward, AdamW step. The reference is the U-Net forward/backward
without LoRA or optimizer (`--no-reference` skips it). `--model FILE` reuses a model file an earlier run kept
(`--keep`), so the 14 GB file is built once for several runs; `--model-dtype fp16` writes it in fp16 (6.6 GB, as
SDXL base is published) where the disk has no room for fp32.
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
# "ours" runs the CLI file as __main__, recording (wall, CPU) times and the peak RSS so far after each step
# (Trainer._log ends a step), and the seconds since the process started (/proc/self/stat's start time, on
# CLOCK_BOOTTIME) when the first optimizer step began and ended (with the peak RSS when it began).
HOOK = """import json, os, resource, runpy, sys, time
import library.training_loop as tl
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
since_start = lambda: time.clock_gettime(time.CLOCK_BOOTTIME) - int(
    open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
stamps, first, before, log, step = [], [], [], tl.Trainer._log, tl.Trainer._optimizer_step
def timed_log(self, *args):
    log(self, *args)
    stamps.append((time.perf_counter(), time.process_time(), peak()))
def timed_step(self, *args):
    if not first:
        first.append(since_start())
        before.append(peak())
    out = step(self, *args)
    if len(first) == 1:
        first.append(since_start())
    return out
tl.Trainer._log, tl.Trainer._optimizer_step = timed_log, timed_step
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    open(os.environ["BENCH_STEP_STAMPS"], "w").write(json.dumps({"steps": stamps, "first": first, "peak_before": before}))
"""
SCRIPT = {"sd1": "train_network.py", "sdxl": "sdxl_train_network.py"}
# What "ours" adds for SDXL: the settings that fit a 24 GB card (U-Net LoRA, cached text-encoder outputs, bf16).
SDXL_FLAGS = ["--network_train_unet_only", "--cache_text_encoder_outputs", "--mixed_precision", "bf16"]


def peak_mib() -> float:
    """This process's peak RSS so far, MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_model_file(size: str, dest: Path, family: str, dtype: str) -> None:
    """Child process: bench_common.build_model, or the same models written in fp16 (`dtype` "fp16")."""
    if dtype == "fp32":
        build_model(size, dest, family)
        return
    import torch

    from library.checkpoint_writer import SaveFormat, save_checkpoint
    from library.families import FAMILIES, ModelSize
    from library.model_loading import checkpoint_from_models
    from library.tiny_models import build_random_models

    models = build_random_models(FAMILIES[family], ModelSize(size), seed=0, perturb=False)
    save_checkpoint(checkpoint_from_models(models), dest, SaveFormat.SAFETENSORS, dtype=torch.float16)


def time_steps(step, warmup: int, steps: int) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of each of `steps` calls of `step` after `warmup` unmeasured ones."""
    times = []
    for _ in range(warmup + steps):
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    return times[warmup:]


def floor(model: Path, resolution: int, threads: int, warmup: int, steps: int, result: Path) -> None:
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
    latents = torch.randn(1, 4, resolution // 8, resolution // 8)

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

    def timed(lora: bool) -> list[tuple[float, float]]:
        return time_steps(lambda: step(lora), warmup, steps)

    peaks = {"set up": peak_mib()}
    out = {"floor": timed(True)}
    peaks["floor steps"] = peak_mib()
    network.restore()
    # Without the LoRA nothing in the text encoder needs a gradient: make its embeddings' output need one, so the
    # backward pass runs through the text encoder as it does with the LoRA.
    embeddings = getattr(te, "embeddings", None) or te.text_model.embeddings
    embeddings.register_forward_hook(lambda module, inputs, output: output.detach().requires_grad_(True))
    out["reference"] = timed(False)
    peaks["reference steps"] = peak_mib()
    result.write_text(json.dumps({"times": out, "peaks": peaks}))


def floor_sdxl(model: Path, resolution: int, threads: int, warmup: int, steps: int, result: Path,
               reference: bool) -> None:
    """Child process: the bare SDXL U-Net LoRA step as sdxl_train_network.py runs it with --network_train_unet_only
    --cache_text_encoder_outputs --mixed_precision bf16, then (`reference`) the no-LoRA reference; writes their step
    times to `result`."""
    import torch
    import torch.nn.functional as F

    from library.model_loading import instantiate_models
    from library.precision import precision_policy
    from library.sd_checkpoint import read_checkpoint
    from library.text_encoder_cache import release_text_encoders
    from networks.lora import create_network

    torch.set_num_threads(threads)
    precision = precision_policy("bf16")  # the trainer's policy: frozen weights (and the VAE) bf16, LoRA fp32
    with read_checkpoint(model) as checkpoint:
        models = instantiate_models(checkpoint, dtype=precision.weight_dtype,
                                    component_dtypes={"vae": precision.vae_dtype})
    unet, text_encoders = models.unet, models.text_encoders
    for m in (unet, models.vae, *text_encoders):  # the VAE stays loaded, as in the trainer
        m.requires_grad_(False)
    release_text_encoders(text_encoders)  # as the trainer does once the text-encoder outputs are cached
    torch.manual_seed(0)
    network = create_network(1.0, RANK, RANK, models.vae, text_encoders, unet)
    network.apply_to(text_encoders, unet, apply_text_encoder=False, apply_unet=True)
    network.to(precision.trained_dtype)
    groups, _ = network.prepare_optimizer_params(None, None, LR)
    optimizer = torch.optim.AdamW(groups, lr=LR)
    dtype, config = precision.weight_dtype, unet.config
    latents = torch.randn(1, 4, resolution // 8, resolution // 8)
    # The cached conditioning: both encoders' hidden states side by side, bigG's pooled output, the 6 time ids
    # (original size, crop top-left, target size), in the weight dtype as the loop hands them to the U-Net.
    hidden = torch.randn(1, 77, config.cross_attention_dim).to(dtype)
    pooled = torch.randn(1, config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim)
    added = {"text_embeds": pooled.to(dtype),
             "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=dtype)}

    def step(lora: bool):
        noise = torch.randn_like(latents)
        noisy = latents + noise if lora else (latents + noise).requires_grad_(True)
        with torch.autocast("cpu", dtype=dtype):
            prediction = unet(noisy.to(dtype), torch.randint(0, 1000, (1,)), hidden, added_cond_kwargs=added).sample
        F.mse_loss(prediction.float(), noise).backward()
        if lora:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def timed(lora: bool) -> list[tuple[float, float]]:
        return time_steps(lambda: step(lora), warmup, steps)

    peaks = {"set up": peak_mib()}
    out = {"floor": timed(True)}
    peaks["floor steps"] = peak_mib()
    if reference:
        network.restore()
        out["reference"] = timed(False)
        peaks["reference steps"] = peak_mib()
    result.write_text(json.dumps({"times": out, "peaks": peaks}))


def ours(work: Path, model: Path, data: Path, family: str, resolution: int, threads: int, steps: int, tag: str,
         wait: float) -> dict:
    """train_network.py (sdxl_train_network.py) for `steps` steps: run_child's figures, the trainer's own total and
    per-step (wall, CPU), and the seconds from the process's start to the start and end of its first step."""
    out, stamps, log = work / f"out_{tag}", work / f"{tag}.stamps.json", work / f"{tag}.log"
    argv = [sys.executable, "-c", HOOK, str(ROOT / SCRIPT[family]), "--pretrained_model_name_or_path", str(model),
            "--train_data_dir", str(data), "--output_dir", str(out), "--output_name", "lora",
            "--resolution", str(resolution), "--network_dim", str(RANK), "--network_alpha", str(RANK),
            "--train_batch_size", "1", "--cache_latents", "--max_train_steps", str(steps), "--learning_rate", str(LR),
            "--max_data_loader_n_workers", "0", "--seed", "0", *(SDXL_FLAGS if family == "sdxl" else [])]
    run = run_child(argv, log, threads, wait, BENCH_STEP_STAMPS=str(stamps))
    shutil.rmtree(out)
    found = re.findall(r"trained (\d+) steps in ([\d.]+) s", log.read_text())
    recorded = json.loads(stamps.read_text())
    times = recorded["steps"]
    if not found or int(found[-1][0]) != steps or len(times) != steps or len(recorded["first"]) != 2:
        raise SystemExit(f"{log}: expected {steps} steps and a 'trained {steps} steps in ... s' line")
    run["total"] = float(found[-1][1])
    run["steps"] = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(times, times[1:])]  # steps 2..N
    run["first"] = recorded["first"]  # seconds from the process's start to the first step's start, and end
    run["peaks"] = recorded["peak_before"] + [t[2] for t in times]  # peak RSS MiB: at step 1's start, after each
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
    p.add_argument("--family", choices=list(SCRIPT), default="sd1",
                   help="sd1: train_network.py on SD 1.5 (default); sdxl: sdxl_train_network.py, U-Net LoRA, bf16")
    p.add_argument("--resolution", type=int, default=None, help="training resolution in px (default 256; tiny: 64)")
    p.add_argument("--warmup", type=int, default=2, help="W: steps not measured (default 2)")
    p.add_argument("--steps", type=int, default=6, help="K: steps measured (default 6; the data is W + K images, "
                                                        "one epoch)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--repeats", type=int, default=None, help="rounds of ours + floor (default 3; tiny: 1)")
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="skip the no-LoRA reference (SDXL only; it doubles the floor child's steps)")
    p.add_argument("--model-dtype", choices=["fp32", "fp16"], default="fp32",
                   help="the dtype of the model file built (default fp32; fp16 halves the disk space)")
    p.add_argument("--model", type=Path, default=None,
                   help="reuse this model file (of --family and --size, kept by an earlier run) instead of building one")
    p.add_argument("--workdir", type=Path, default=None, help="where the files go (default: a new temp dir in /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (default: delete it at the end)")
    p.add_argument("--build-into", type=Path, help=argparse.SUPPRESS)  # internal: the model-building child
    p.add_argument("--floor", nargs=2, type=Path, help=argparse.SUPPRESS)  # internal: MODEL RESULT, the floor child
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    w, k, size, threads, family = args.warmup, args.steps, args.size, args.threads, args.family
    resolution = args.resolution or RESOLUTION[size]
    if w < 1 or k < 1:
        p.error("--warmup and --steps must be at least 1")
    if args.build_into:
        build_model_file(size, args.build_into, family, args.model_dtype)
        return 0
    if args.floor:
        if family == "sdxl":
            floor_sdxl(args.floor[0], resolution, threads, w, k, args.floor[1], args.reference)
        else:
            floor(args.floor[0], resolution, threads, w, k, args.floor[1])
        return 0
    if not args.reference and family != "sdxl":
        p.error("--no-reference is for --family sdxl")
    if args.model and not args.model.is_file():
        p.error(f"--model {args.model}: no such file")
    repeats = args.repeats or (1 if size == "tiny" else 3)
    wait = 0.0 if size == "tiny" else 60.0  # seconds to wait for an idle CPU before each child

    from tools.make_synthetic_dataset import write_dataset  # PIL only: this process never imports torch

    work = work_dir(args.workdir, "bench_lora_step_")
    print(f"{machine_line()}; {threads} thread(s); work dir {work}")
    data = work / "data"
    shutil.rmtree(data, ignore_errors=True)  # a kept work dir may hold another run's images
    write_dataset(data, images=w + k, size=resolution, seed=0, folder="1_sks shape")
    if args.model:
        model = args.model
        print(f"model: {model} ({model.stat().st_size / 2**20:.0f} MiB, not rebuilt)", flush=True)
    else:
        model = work / "model.safetensors"
        build_in_child([sys.executable, __file__, "--size", size, "--family", family, "--model-dtype",
                        args.model_dtype, "--build-into", str(model)], model, size, work / "build.log", threads)

    # (wall, CPU) s/step of each round, and of every single measured step (the difference has no single steps).
    if family == "sdxl":
        labels = {"ours": "ours: `sdxl_train_network.py`, (t(W+K) - t(W)) / K",
                  "ours steps": "ours: single steps W+1..W+K of the same W+K runs",
                  "floor": "floor: bare U-Net LoRA step (cached conditioning, bf16 autocast, AdamW)",
                  "reference": "reference: U-Net fwd/bwd, no LoRA, no optimizer"}
        if not args.reference:
            del labels["reference"]
    else:
        labels = {"ours": "ours: `train_network.py`, (t(W+K) - t(W)) / K",
                  "ours steps": "ours: single steps W+1..W+K of the same W+K runs",
                  "floor": "floor: bare LoRA step (TE + U-Net fwd/bwd, AdamW)",
                  "reference": "reference: TE + U-Net fwd/bwd, no LoRA, no optimizer"}
    rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in labels}
    steps: dict[str, list[tuple[float, float]]] = {name: [] for name in ("ours steps", "floor", "reference")}
    rss = {"ours": 0.0, "floor": 0.0}
    first: list[tuple[int, float, float]] = []  # (steps of the run, s to the first step's start, s to its end)
    others: dict[str, list[float]] = {"ours": [], "floor": []}  # other processes' share of the CPU, per child
    mean = lambda pairs: tuple(statistics.mean(p[i] for p in pairs) for i in (0, 1))  # noqa: E731
    show = lambda pairs: ", ".join(f"{a:.2f}/{b:.2f}" for a, b in pairs)  # noqa: E731
    for r in range(1, repeats + 1):
        short, full = (ours(work, model, data, family, resolution, threads, n, f"ours{r}_{n}", wait)
                       for n in (w, w + k))
        rounds["ours"].append(((full["total"] - short["total"]) / k, (full["cpu"] - short["cpu"]) / k))
        steps["ours steps"] += full["steps"][w - 1:]
        rounds["ours steps"].append(mean(full["steps"][w - 1:]))
        rss["ours"] = max(rss["ours"], short["rss"], full["rss"])
        for run, n in ((short, w), (full, w + k)):
            first.append((n, *run["first"]))
            others["ours"].append(run["others"])
            print(f"  round {r}: ours {n} steps: trainer {run['total']:.1f} s, process {run['wall']:.1f} s wall, "
                  f"{run['cpu']:.1f} s CPU, peak RSS {run['rss']:.0f} MiB, others used {100 * run['others']:.0f} % CPU")
            print(f"  round {r}: ours {n} steps: peak RSS so far (MiB) when step 1 began {run['peaks'][0]:.0f}, after "
                  f"each step {', '.join(f'{x:.0f}' for x in run['peaks'][1:])}")
        print(f"  round {r}: ours, wall/CPU s per step: difference {'%.2f/%.2f' % rounds['ours'][-1]}; "
              f"single steps {show(full['steps'][w - 1:])}", flush=True)
        result = work / f"floor{r}.json"
        argv = [sys.executable, __file__, "--size", size, "--family", family, "--resolution", str(resolution),
                "--threads", str(threads), "--warmup", str(w), "--steps", str(k), "--floor", str(model), str(result),
                *([] if args.reference else ["--no-reference"])]
        run = run_child(argv, work / f"floor{r}.log", threads, wait)
        rss["floor"] = max(rss["floor"], run["rss"])
        others["floor"].append(run["others"])
        recorded = json.loads(result.read_text())
        for name, times in recorded["times"].items():
            steps[name] += times
            rounds[name].append(mean(times))
            print(f"  round {r}: {name}, wall/CPU s per step: {show(times)}")
        print(f"  round {r}: floor, peak RSS so far (MiB): "
              + ", ".join(f"{k} {v:.0f}" for k, v in recorded["peaks"].items()))
        print(f"  round {r}: floor process {run['wall']:.1f} s, peak RSS {run['rss']:.0f} MiB, others used "
              f"{100 * run['others']:.0f} % CPU", flush=True)

    model_name = "SDXL, U-Net LoRA, bf16 mixed precision" if family == "sdxl" else "SD 1.5"
    print(f"\n{size} {model_name} model, {resolution} px, rank {RANK}, batch 1, {threads} threads, W={w}, K={k}, "
          f"{repeats} round(s). s/step of each round: mean, min, max over the rounds; median of all single steps.")
    for metric, title in ((0, "wall-clock seconds per step"), (1, "CPU seconds per step (process user + sys)")):
        print(f"\n{title}\n")
        print_table(metric, labels, rounds, steps, rss)
    print("\nours: seconds from the process's start to the first step's start / end (imports, loading, caching, "
          "set-up; then step 1), per run: " + ", ".join(f"{n} steps {a:.1f}/{b:.1f}" for n, a, b in first))
    print("other processes' share of the CPU while each child ran: ours "
          + ", ".join(f"{100 * x:.0f} %" for x in others["ours"]) + "; floor "
          + ", ".join(f"{100 * x:.0f} %" for x in others["floor"]))
    if args.keep or (args.model and work.resolve() in args.model.resolve().parents):
        print(f"kept {work}")  # (also when it holds the --model file)
    else:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
