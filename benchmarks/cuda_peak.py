"""Run a Python script as `python3 script.py args...` would (runpy.run_path with sys.argv set) and, when it ends --
normally, with an error or with SystemExit -- print its wall time and the CUDA allocator's peaks
(torch.cuda.max_memory_allocated / max_memory_reserved, in GiB; "no CUDA" on a machine without one):

    python3 benchmarks/cuda_peak.py [options] -- script.py args...

    CUDA_PEAK tag=lora-gc rc=0 wall_s=71.2 cuda=NVIDIA H200 peak_allocated_gib=11.42 peak_reserved_gib=12.50 ...

The peaks are those of the whole process (model loading and latent / text-encoder caching included). With
--logging-dir the wrapper also gives the peaks of the training steps alone ("steps 2..N": from the end of step 1 to
the end of the last step, by the wall times of the trainer's `loss/current` TensorBoard scalars): a daemon thread
reads the allocator's peak every 20 ms and resets it (torch.cuda.reset_peak_memory_stats; the trainers never read
these statistics), so each 20 ms interval's exact peak is known with its time. The whole-process peak is the
maximum over all intervals; the steps' peak that over the intervals starting after step 1's scalar was written (the
one interval straddling it is left out, so nothing of the loading / caching phase can count).

Options (all optional; used by benchmarks/gpu_check_sdxl.sh):
  --tag NAME            the name on the CUDA_PEAK line and in the JSON record
  --json FILE           append the record (one JSON object per line) to FILE
  --logging-dir DIR     after the run, read the step times from the trainer's TensorBoard log in DIR
                        (benchmarks/bench_common.step_times) and report the median s/step over steps
                        --first-step..N
  --first-step N        first step counted in the median (default 3: steps 1 and 2 are warm-up)
  --check PATH          after a successful run, check the saved safetensors file PATH (repeatable): every floating
                        tensor finite; a LoRA file is also read by diffusers' lora_state_dict (kohya -> diffusers
                        names) and its lora_up / lora_B weights that moved off zero are counted; a model file is read
                        with library.sd_checkpoint.read_checkpoint (the loader the trainers and tools use)
  --base PATH           with --check on a model file: also count the tensors that differ from this base model
  --time-limit S        stop the run after S seconds: the record (peaks, step times so far) is still printed and
                        written, then the process exits at once with status 124, as `timeout` would

The checks run in this process after the script, so no second Python start is paid for them. A failed check makes
the exit status 3 (the script's own failure keeps its status). The wrapper changes nothing the script does: it only
reads (and, for the per-interval peaks, resets) the CUDA allocator's statistics.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cuda_peaks() -> dict:
    """The CUDA allocator's peaks of this process in GiB (zeros and cuda=None without CUDA)."""
    try:
        import torch
    except Exception as e:  # noqa: BLE001 -- no torch: report, never crash
        return {"cuda": None, "peak_allocated_gib": 0.0, "peak_reserved_gib": 0.0, "note": f"no torch: {e}"}
    if not torch.cuda.is_available():
        return {"cuda": None, "peak_allocated_gib": 0.0, "peak_reserved_gib": 0.0}
    try:
        return {"cuda": torch.cuda.get_device_name(),
                "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
    except Exception as e:  # noqa: BLE001 -- a broken CUDA context after a crash: report it
        return {"cuda": "error", "peak_allocated_gib": 0.0, "peak_reserved_gib": 0.0, "note": repr(e)}


class PeakSampler:
    """Exact CUDA allocator peaks per ~20 ms interval, with the interval's end time (time.time(), the clock
    TensorBoard stamps events with). Reads nothing before CUDA is initialised (never initialises it itself)."""

    def __init__(self, period: float = 0.02):
        self.period = period
        self.samples: list[tuple[float, int, int]] = []  # (end time, peak allocated, peak reserved) per interval
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cuda-peak-sampler", daemon=True)
        try:
            import torch

            self._cuda = torch.cuda if torch.cuda.is_available() else None
        except Exception:  # noqa: BLE001
            self._cuda = None

    def start(self) -> "PeakSampler":
        if self._cuda is not None:
            self._thread.start()
        return self

    def _sample(self) -> None:
        if not self._cuda.is_initialized():
            return
        alloc, reserved = self._cuda.max_memory_allocated(), self._cuda.max_memory_reserved()
        self._cuda.reset_peak_memory_stats()
        self.samples.append((time.time(), alloc, reserved))

    def _loop(self) -> None:
        try:
            while not self._stop.wait(self.period):
                self._sample()
        except Exception as e:  # noqa: BLE001 -- sampling must never break the run
            self.error = f"{type(e).__name__}: {e}"

    def stop(self) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join(5)
        if self._cuda is not None and self.error is None:
            try:
                self._sample()  # the last interval
            except Exception as e:  # noqa: BLE001
                self.error = f"{type(e).__name__}: {e}"

    def peaks(self, after: float = float("-inf"), until: float = float("inf")) -> tuple[float, float] | None:
        """(allocated, reserved) GiB peaks over the intervals that start in [after, until); None if none do. (The
        interval that straddles `after` is left out, so what ran before `after` cannot count; the one that
        straddles `until` is in.)"""
        chosen, previous_end = [], float("-inf")
        for end, alloc, reserved in self.samples:
            if after <= previous_end < until:
                chosen.append((alloc, reserved))
            previous_end = end
        if not chosen:
            return None
        return max(a for a, _ in chosen) / 2**30, max(r for _, r in chosen) / 2**30


def loss_stamps(logging_dir: Path) -> dict[int, float]:
    """step -> wall time of the trainer's `loss/current` scalar (written right after the step ends)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    stamps = {}
    for path in sorted(logging_dir.glob("**/events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            if any(v.tag == "loss/current" for v in event.summary.value):
                stamps[event.step] = event.wall_time
    return stamps


def step_stats(logging_dir: Path, first_step: int) -> dict:
    """Median / min / max s/step over steps first_step..N from the trainer's TensorBoard log."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_common import step_times

    durations = step_times(logging_dir)  # durations of steps 2..N
    counted = durations[max(first_step - 2, 0):]
    if not counted:
        raise ValueError(f"{logging_dir}: only {len(durations) + 1} steps logged, none from step {first_step} on")
    return {"steps_logged": len(durations) + 1, "s_per_step": statistics.median(counted),
            "s_per_step_min": min(counted), "s_per_step_max": max(counted),
            "step_times": [round(t, 4) for t in durations]}


UP_MARKERS = ("lora_up", "lora_B", ".lora.up.")  # kohya, peft / diffusers, diffusers' old names


def _looks_sdxl(keys: list[str], metadata: dict[str, str]) -> bool:
    if metadata.get("ss_base_model_version", "").startswith("sdxl"):
        return True
    return any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) or "input_blocks" in k or "output_blocks" in k
               or "middle_block" in k for k in keys)


def check_file(path: Path, base: Path | None) -> dict:
    """Finite-ness of every floating tensor of the safetensors file `path`, then: a LoRA is read by diffusers'
    lora_state_dict (kohya -> diffusers key conversion) and its moved lora_up / lora_B weights counted; a model is
    read by library.sd_checkpoint.read_checkpoint and, given `base`, its tensors that differ from it counted."""
    import torch
    from safetensors import safe_open

    result: dict = {"file": str(path)}
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        keys = list(f.keys())
        bad, floating = [], 0
        up_total = up_moved = 0
        for key in keys:
            t = f.get_tensor(key)
            if not t.dtype.is_floating_point:
                continue
            floating += 1
            if not torch.isfinite(t).all():
                bad.append(key)
            if any(m in key for m in UP_MARKERS):
                up_total += 1
                up_moved += int(bool(t.abs().max() > 0))
    result.update(tensors=len(keys), floating=floating, non_finite=len(bad), non_finite_keys=bad[:5])
    if any("lora" in k for k in keys):
        from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

        sdxl = _looks_sdxl(keys, metadata)
        loader = StableDiffusionXLLoraLoaderMixin if sdxl else StableDiffusionLoraLoaderMixin
        state = loader.lora_state_dict(str(path))[0]
        result.update(kind=f"lora ({'sdxl' if sdxl else 'sd'})", lora_up_moved=f"{up_moved}/{up_total}",
                      diffusers_lora_state_dict_keys=len(state))
    else:
        from library.sd_checkpoint import read_checkpoint

        checkpoint = read_checkpoint(path)
        result.update(kind=f"model ({checkpoint.family.name})")
        if base is not None:
            base_checkpoint = read_checkpoint(base)
            changed = {}
            for component, tensors in checkpoint.tensors.items():
                n = 0
                for name, lazy in tensors.items():
                    other = base_checkpoint.tensors.get(component, {}).get(name)
                    if other is not None and not torch.equal(lazy.load().float(), other.load().float()):
                        n += 1
                changed[component] = f"{n}/{len(tensors)}"
            result["changed_vs_base"] = changed
    result["ok"] = not bad
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tag", default=None)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--logging-dir", type=Path, default=None)
    p.add_argument("--first-step", type=int, default=3)
    p.add_argument("--check", type=Path, action="append", default=[])
    p.add_argument("--base", type=Path, default=None)
    p.add_argument("--time-limit", type=float, default=None)
    p.add_argument("script")
    p.add_argument("args", nargs=argparse.REMAINDER)
    opts = p.parse_args()
    script = Path(opts.script)
    tag = opts.tag or script.stem

    sys.argv = [str(script), *opts.args]
    sys.path.insert(0, str(script.resolve().parent))  # what `python3 script.py` puts first
    sampler = PeakSampler().start()
    start = time.perf_counter()
    reported = threading.Lock()

    if opts.time_limit:
        def on_time_limit() -> None:
            if not reported.acquire(blocking=False):
                return  # the run ended meanwhile: its own report is under way
            print(f"\nCUDA_PEAK: time limit of {opts.time_limit:g} s reached: stopping {script.name}", flush=True)
            try:
                report(opts, tag, 124, time.perf_counter() - start, sampler, checks=False)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(124)

        timer = threading.Timer(opts.time_limit, on_time_limit)
        timer.daemon = True
        timer.start()

    rc = 0
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 -- report, then still print the peaks
        traceback.print_exc()
        rc = 1
    wall = time.perf_counter() - start
    if not reported.acquire(blocking=False):
        time.sleep(3600)  # the time-limit report is being written; it ends the process
    sys.argv = [sys.argv[0]]
    return report(opts, tag, rc, wall, sampler, checks=True)


def report(opts: argparse.Namespace, tag: str, rc: int, wall: float, sampler: PeakSampler, checks: bool) -> int:
    """Print the CUDA_PEAK line (and CHECK lines), append the JSON record; the exit status."""
    sampler.stop()
    record: dict = {"tag": tag, "rc": rc, "wall_s": round(wall, 1), **cuda_peaks()}
    if sampler.samples:  # the sampler reset the allocator's own peaks: the whole run's are the intervals' maximum
        record["peak_allocated_gib"], record["peak_reserved_gib"] = sampler.peaks()
    if sampler.error:
        record["sampler_error"] = sampler.error
    if opts.logging_dir is not None:
        try:
            record.update(step_stats(opts.logging_dir, opts.first_step))
        except Exception as e:  # noqa: BLE001
            record["step_error"] = f"{type(e).__name__}: {e}"
        try:
            stamps = loss_stamps(opts.logging_dir)
            if len(stamps) >= 2 and sampler.samples:
                last = max(stamps)
                steps_peaks = sampler.peaks(after=stamps[1], until=stamps[last])
                if steps_peaks is not None:
                    record["steps_peak_allocated_gib"], record["steps_peak_reserved_gib"] = steps_peaks
                    record["steps_peak_range"] = f"2..{last}"
        except Exception as e:  # noqa: BLE001
            record["steps_peak_error"] = f"{type(e).__name__}: {e}"
    checks_ok = True
    if rc == 0 and checks:
        record["checks"] = []
        for path in opts.check:
            try:
                result = check_file(path, opts.base)
            except Exception as e:  # noqa: BLE001
                result = {"file": str(path), "ok": False, "error": f"{type(e).__name__}: {e}"}
            record["checks"].append(result)
            checks_ok &= result["ok"]
            print(f"CHECK {'ok' if result['ok'] else 'FAILED'} {json.dumps(result)}", flush=True)
    record["ok"] = rc == 0 and checks_ok

    cuda = record["cuda"] or "no CUDA"
    line = (f"CUDA_PEAK tag={tag} rc={rc} wall_s={wall:.1f} cuda={cuda} "
            f"peak_allocated_gib={record['peak_allocated_gib']:.2f} peak_reserved_gib={record['peak_reserved_gib']:.2f}")
    if "steps_peak_allocated_gib" in record:
        line += (f" steps_{record['steps_peak_range']}_peak_allocated_gib={record['steps_peak_allocated_gib']:.2f}"
                 f" steps_peak_reserved_gib={record['steps_peak_reserved_gib']:.2f}")
    if "s_per_step" in record:
        line += (f" s_per_step_median={record['s_per_step']:.3f} (steps {opts.first_step}..{record['steps_logged']}, "
                 f"min {record['s_per_step_min']:.3f}, max {record['s_per_step_max']:.3f})")
    elif "step_error" in record:
        line += f" step_times=unavailable ({record['step_error']})"
    print(line, flush=True)
    if opts.json is not None:
        with open(opts.json, "a") as f:
            f.write(json.dumps(record) + "\n")
    if rc != 0:
        return rc
    return 0 if checks_ok else 3

if __name__ == "__main__":
    sys.exit(main())
