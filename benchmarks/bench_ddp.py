"""Several processes on one CPU: step time of 2 processes x 1 thread against 1 process x 2 threads at the same
global batch, and the time the gradient averaging costs outside the backward pass, DDP (now) against the
hand-written all_reduce after backward it replaced (an older commit, checked out into a temporary git worktree).

    . .venv/bin/activate && export HF_HUB_OFFLINE=1
    python benchmarks/bench_ddp.py                    # tiny model, 128 px, 2 trainers x 4 layouts: ~3-4 min
    python benchmarks/bench_ddp.py --steps 40 --rounds 2 --wait 30 --only train_db
    python benchmarks/bench_ddp.py --old-ref <commit>   # another commit as "old" (default: the last one with the
                                                        # hand-written averaging, found in git history)

Each run is the real trainer CLI in fresh processes (train_db.py: the whole tiny U-Net and text encoder, 4.8M
trained values; train_network.py: a rank-4 LoRA of both, 118k), 128 px, cached latents, SGD, global batch 2 per
micro-batch and --gradient_accumulation_steps 2, through this script's child mode, which times inside the
trainer's process by wrapping three methods (nothing else changes): `Trainer._optimizer_step` (one optimizer step:
forward, backward, averaging, optimizer), `Accelerator.backward` (each micro-batch's backward pass) and, in the old
code, `Trainer._average_gradients` (its all_reduce after backward). With accumulation, the first micro-batch's
backward never communicates (DDP's no_sync), the second carries DDP's averaging: their difference is the part of
DDP's communication the backward pass did not hide. Layouts:

    1p x 1t   1 process, batch 2, 1 thread      1p x 2t   1 process, batch 2, 2 threads
    2p DDP    2 processes x batch 1, 1 thread each (accelerate launch, gloo): this code
    2p old    the same layout, the old commit's hand-written averaging

Median and minimum over steps 3..N (step 1 builds the optimizer state, and DDP rebuilds its buckets in step 2; on a
shared CPU the fastest step is the least disturbed one, the closest to an idle machine). With --rounds N each layout
runs N times, interleaved with the others, and the round with the fastest median is shown. The share of the CPU
other processes used while a run ran is printed: the dev machines have 2 shared cores, so run it when they are
quiet, and compare layouts measured under similar load. --wait waits (up to that many seconds) for an idle CPU
before each run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, machine_line, run_child  # noqa: E402

TRAINERS = {
    "train_db": ["--save_model_as", "safetensors"],
    "train_network": ["--network_dim", "4", "--network_alpha", "4"],
}
LAYOUTS = {  # name: (processes, threads per process, old code)
    "1p x 1t": (1, 1, False),
    "1p x 2t": (1, 2, False),
    "2p DDP": (2, 1, False),
    "2p old": (2, 1, True),
}


def trainer_argv(work: Path, out: str, batch: int, steps: int, extra: list[str]) -> list[str]:
    return ["--pretrained_model_name_or_path", str(work / "sd1.safetensors"), "--train_data_dir", str(work / "data"),
            "--output_dir", str(work / out), "--output_name", "bench", "--resolution", "128", "--cache_latents",
            "--train_batch_size", str(batch), "--gradient_accumulation_steps", "2", "--max_train_steps", str(steps),
            "--optimizer_type", "SGD", "--learning_rate", "1e-3", "--seed", "0", "--max_data_loader_n_workers", "0",
            *extra]


def old_worktree(ref: str | None, into: Path) -> tuple[Path, str]:
    """A detached worktree of `ref` (default: the parent of the commit that removed `_average_gradients`)."""
    if ref is None:
        removal = subprocess.run(["git", "log", "-1", "--format=%H", "-G", "def _average_gradients", "--",
                                  "library/training_loop.py"], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.strip()
        ref = f"{removal}^"
    commit = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    subprocess.run(["git", "worktree", "add", "--detach", str(into), commit], cwd=ROOT, capture_output=True,
                   check=True)
    return into, commit


def child(root: Path, script: str, argv: list[str], report: Path) -> None:
    """In the trainer's process: time its steps, backward passes and (old code) averaging; run it."""
    sys.path.insert(0, str(root))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from accelerate import Accelerator

    import library.training_loop as loop

    steps, current = [], {}

    def timed(owner, name, record):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                record(time.perf_counter() - start)

        setattr(owner, name, wrapper)

    original_step = loop.Trainer._optimizer_step

    def optimizer_step(self, micro_batches):
        current.update(backward=[], average=0.0)
        start = time.perf_counter()
        result = original_step(self, micro_batches)
        steps.append(dict(current, step=time.perf_counter() - start))
        return result

    loop.Trainer._optimizer_step = optimizer_step
    timed(Accelerator, "backward", lambda seconds: current["backward"].append(seconds))
    if hasattr(loop.Trainer, "_average_gradients"):
        timed(loop.Trainer, "_average_gradients", lambda seconds: current.update(average=seconds))
    from accelerate.state import PartialState

    module = __import__(script)
    assert module.main(argv) == 0
    report.with_name(f"{report.name}.{PartialState().process_index}.json").write_text(json.dumps(steps))


def run_layout(args, work: Path, roots: dict, trainer: str, layout: str) -> dict:
    processes, threads, old = LAYOUTS[layout]
    root = roots["old" if old else "new"]
    out = f"{trainer}-{layout.replace(' ', '')}"
    argv = trainer_argv(work, out, 2 // processes, args.steps, TRAINERS[trainer])
    (work / f"{out}.argv.json").write_text(json.dumps(argv))
    report = work / f"{out}.report"
    me = [str(Path(__file__).resolve()), "--child", str(root), trainer, str(work / f"{out}.argv.json"), str(report)]
    if processes == 1:
        command, env = [sys.executable, *me], {}
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *me]
        env = {"ACCELERATE_USE_CPU": "true"}
    # SDTRAIN_STOP_AFTER_STEPS: the loop's stop-after-N-steps test aid skips the final save (not what is measured).
    figures = run_child(command, work / f"{out}.log", threads=threads, wait=args.wait,
                        SDTRAIN_STOP_AFTER_STEPS=str(args.steps), **env)
    steps = json.loads(report.with_name(f"{report.name}.0.json").read_text())[2:]  # steps 3..N
    columns = {"step": [s["step"] for s in steps],
               "backward_local": [s["backward"][0] for s in steps],  # micro-batch 1: never communicates
               "backward_last": [s["backward"][-1] for s in steps],  # micro-batch 2: DDP's averaging
               "average": [s["average"] for s in steps]}
    # The median, and the fastest step: on a shared CPU the least disturbed one comes closest to an idle machine.
    return {"median": {k: statistics.median(v) for k, v in columns.items()},
            "min": {k: min(v) for k, v in columns.items()}, "others": figures["others"]}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        child(Path(argv[1]), argv[2], json.loads(Path(argv[3]).read_text()), Path(argv[4]))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run (statistics over steps 3..N)")
    p.add_argument("--rounds", type=int, default=1, help="runs per layout; the one with the fastest median is shown")
    p.add_argument("--only", action="append", choices=list(TRAINERS), help="run only this trainer (repeatable)")
    p.add_argument("--old-ref", default=None, help="the commit with the hand-written averaging (default: found)")
    p.add_argument("--wait", type=float, default=0.0, help="seconds to wait for an idle CPU before each run")
    p.add_argument("--workdir", type=Path, default=None, help="where the model, data and logs go (default: temp)")
    args = p.parse_args(argv)
    if args.steps < 4:
        p.error("--steps must be at least 4 (steps 1-2 are the warm-up)")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_ddp_"))
    work.mkdir(parents=True, exist_ok=True)
    print(machine_line(), flush=True)
    sys.path.insert(0, str(ROOT))
    from tools.make_synthetic_dataset import write_dataset
    from tools.make_tiny_model import main as make_model

    write_dataset(work / "data", images=8, size=128, seed=0, folder="4_sks shape")
    assert make_model(["--family", "sd1", str(work / "sd1.safetensors")]) == 0
    old_root, commit = old_worktree(args.old_ref, work / "old_code")
    roots = {"new": ROOT, "old": old_root}
    print(f"old code: {commit}; work dir {work}", flush=True)
    try:
        for trainer in [t for t in TRAINERS if not args.only or t in args.only]:
            print(f"\n{trainer}, {args.steps} steps, global batch 2 x 2 micro-batches, 128 px; median and min of "
                  f"steps 3..{args.steps}, ms", flush=True)
            print(f"{'layout':9} {'':6} {'step':>7} {'bwd 1':>7} {'bwd 2':>7} {'bwd 2-1':>8} {'avg':>6} "
                  f"{'others':>7}", flush=True)
            best = {}
            for _ in range(args.rounds):  # layouts interleaved, so a change in the machine's load hits them all
                for layout in LAYOUTS:
                    r = run_layout(args, work, roots, trainer, layout)
                    if layout not in best or r["median"]["step"] < best[layout]["median"]["step"]:
                        best[layout] = r
            for layout, r in best.items():
                for kind in ("median", "min"):
                    m = r[kind]
                    others = f"{100 * r['others']:6.0f}%" if kind == "median" else ""
                    print(f"{layout:9} {kind:6} {1000 * m['step']:7.1f} {1000 * m['backward_local']:7.1f} "
                          f"{1000 * m['backward_last']:7.1f} {1000 * (m['backward_last'] - m['backward_local']):8.1f} "
                          f"{1000 * m['average']:6.1f} {others}", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(old_root)], cwd=ROOT, capture_output=True)
    print("\nstep: one optimizer step (2 micro-batches); bwd 1 / bwd 2: the backward pass of micro-batch 1 (no "
          "communication) / 2 (DDP averages in it); avg: the old code's all_reduce after backward; others: the CPU "
          "share other processes used during the run", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
