"""gen_img.py against diffusers' own pipeline on a full-size SD 1.5 or SDXL model: wall time of a whole run and
the time of one denoising step, same prompt, size, sampler, steps, CFG scale and seed.

    . .venv/bin/activate && export HF_HUB_OFFLINE=1
    python benchmarks/bench_gen_img.py --family sdxl    # ~14 GB file + ~14 GB diffusers folder; ~20 minutes
    python benchmarks/bench_gen_img.py --size tiny      # smoke check

A model with random weights is written once as an original-layout fp32 `.safetensors` (what gen_img reads) and
converted to a diffusers folder (what `StableDiffusionXLPipeline.from_pretrained` reads component by component;
`from_single_file` would hold the whole fp32 state dict and the models at once, more than this machine's RAM for
SDXL). Each run is a fresh child process: gen_img.py's CLI, or a short script that calls the diffusers pipeline the
way its documentation does. Each side runs twice, with --steps FEW and MANY; the step time is the difference of the
two walls over the difference of the steps, so loading, text encoding and VAE decoding cancel out. Every U-Net
call is also timed inside both processes by the same wrapper (unet_call_timer.py), which leaves the noise of whole
runs out of the comparison; `--rounds N` alternates the sides N times.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (ROOT, build_model, finish_work, machine_line, model_file_parser, run_child,  # noqa: E402
                          work_dir)

PROMPT = "a lighthouse on a cliff at dawn, oil painting"
NEGATIVE = "blurry"
DIFFUSERS_RUN = """
import sys, time, torch, diffusers
from library.families import FAMILIES
from library.samplers import make_scheduler
folder, family, size, steps = sys.argv[1], FAMILIES[sys.argv[2]], int(sys.argv[3]), int(sys.argv[4])
pipe = getattr(diffusers, family.pipeline_class).from_pretrained(folder, local_files_only=True)
pipe.scheduler = make_scheduler("euler", family.prediction_type.value)  # gen_img's --sampler euler
pipe.set_progress_bar_config(disable=True)
pipe(%r, negative_prompt=%r, width=size, height=size, num_inference_steps=steps, guidance_scale=7.0,
     generator=torch.Generator().manual_seed(1)).images[0].save(sys.argv[5])
""" % (PROMPT, NEGATIVE)


def main() -> int:
    p = model_file_parser(__doc__)
    p.add_argument("--resolution", type=int, default=None,
                   help="image side in px (default: 512 for full size, 64 for tiny; 1024 px SDXL steps take minutes "
                        "on a 2-core CPU)")
    p.add_argument("--steps", type=int, nargs=2, default=[1, 4], metavar=("FEW", "MANY"))
    p.add_argument("--rounds", type=int, default=1, help="runs of each side and step count, alternating")
    p.add_argument("--reuse_model", action="store_true",
                   help="with --workdir of an earlier --keep run: use its model file and folder instead of building "
                        "them again")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.build_into:
        build_model(args.size, args.build_into, args.family)
        return 0
    resolution = args.resolution or (512 if args.size == "full" else 64)
    few, many = args.steps

    work = work_dir(args.workdir, "bench_gen_img_")
    log = work / "bench.log"
    py = sys.executable
    single, folder = work / "model.safetensors", work / "diffusers"
    print(f"{machine_line()}; work dir {work}")
    print(f"benchmark process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if args.reuse_model and single.is_file() and (folder / "model_index.json").is_file():
        print(f"reusing {single} and its diffusers folder (--reuse_model)", flush=True)
        log.write_text("")
    else:
        run_child([py, __file__, "--size", args.size, "--family", args.family, "--build-into", str(single)], log)
        run_child([py, str(ROOT / "tools" / "convert_diffusers20_original_sd.py"), str(single), str(folder),
                   "--use_safetensors"], log, append=True)
        print(f"built {args.size} {args.family}: {single.stat().st_size / 2**20:.0f} MiB fp32, and its diffusers "
              "folder", flush=True)

    timer = str(Path(__file__).resolve().parent / "unet_call_timer.py")

    def calls_file(side: str, steps: int) -> Path:
        return work / f"unet_calls_{side.split()[0]}_{steps}.json"

    def ours(steps: int) -> list[str]:
        return [py, timer, str(calls_file("gen_img.py", steps)), str(ROOT / "gen_img.py"), "--ckpt", str(single), "--outdir", str(work / f"ours_{steps}"),
                "--W", str(resolution), "--H", str(resolution), "--sampler", "euler", "--steps", str(steps),
                "--scale", "7", "--seed", "1", "--prompt", f"{PROMPT} --n {NEGATIVE}"]

    def theirs(steps: int) -> list[str]:
        return [py, timer, str(calls_file("diffusers pipeline", steps)), "-c", DIFFUSERS_RUN, str(folder), args.family, str(resolution), str(steps),
                str(work / f"theirs_{steps}.png")]

    sides = ("gen_img.py", "diffusers pipeline")
    argvs = {"gen_img.py": ours, "diffusers pipeline": theirs}
    walls, rss, calls = {}, {}, {side: [] for side in sides}
    for round_ in range(args.rounds):  # the sides alternate, so a slow spell of the machine hits both
        for steps in (few, many):
            for side in sides:
                run = run_child(argvs[side](steps), log, append=True)
                walls.setdefault((side, steps), []).append(run["wall"])
                rss[side] = max(rss.get(side, 0.0), run["rss"])
                # Each run's first U-Net call warms up (allocations, oneDNN primitives): left out.
                calls[side] += json.loads(calls_file(side, steps).read_text())["unet_call_s"][1:]
                print(f"  round {round_ + 1}, {side}, {steps} step(s): {run['wall']:.1f} s, "
                      f"peak RSS {run['rss']:.0f} MiB", flush=True)

    print(f"\n{args.size} {args.family}, {resolution}x{resolution} px, euler, CFG 7, fp32, {args.rounds} round(s)\n")
    print(f"| run | wall s, {few} step(s) | wall s, {many} steps | s per step (walls) | U-Net call s, median "
          "(min-max) | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    per_step, per_call = {}, {}
    for side in sides:
        a, b = statistics.mean(walls[side, few]), statistics.mean(walls[side, many])
        per_step[side] = (b - a) / (many - few)
        per_call[side] = statistics.median(calls[side])
        print(f"| {side} | {a:.1f} | {b:.1f} | {per_step[side]:.2f} | {per_call[side]:.2f} "
              f"({min(calls[side]):.2f}-{max(calls[side]):.2f}, {len(calls[side])} calls) | {rss[side]:.0f} |")
    print(f"\nstep time gen_img / diffusers: {per_step['gen_img.py'] / per_step['diffusers pipeline']:.2f} from the "
          f"walls, {per_call['gen_img.py'] / per_call['diffusers pipeline']:.2f} from the U-Net calls' medians")
    finish_work(work, log, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
