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
two walls over the difference of the steps, so loading, text encoding and VAE decoding cancel out.
"""

from __future__ import annotations

import os
import resource
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
from library.sampling import make_scheduler
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
    run_child([py, __file__, "--size", args.size, "--family", args.family, "--build-into", str(single)], log)
    run_child([py, str(ROOT / "tools" / "convert_diffusers20_original_sd.py"), str(single), str(folder),
               "--use_safetensors"], log, append=True)
    print(f"built {args.size} {args.family}: {single.stat().st_size / 2**20:.0f} MiB fp32, and its diffusers folder",
          flush=True)

    def ours(steps: int) -> list[str]:
        return [py, str(ROOT / "gen_img.py"), "--ckpt", str(single), "--outdir", str(work / f"ours_{steps}"),
                "--W", str(resolution), "--H", str(resolution), "--sampler", "euler", "--steps", str(steps),
                "--scale", "7", "--seed", "1", "--prompt", f"{PROMPT} --n {NEGATIVE}"]

    def theirs(steps: int) -> list[str]:
        return [py, "-c", DIFFUSERS_RUN, str(folder), args.family, str(resolution), str(steps),
                str(work / f"theirs_{steps}.png")]

    results = {}
    for side, argv in (("gen_img.py", ours), ("diffusers pipeline", theirs)):
        for steps in (few, many):
            run = run_child(argv(steps), log, append=True)
            results[side, steps] = run
            print(f"  {side}, {steps} step(s): {run['wall']:.1f} s, peak RSS {run['rss']:.0f} MiB", flush=True)

    print(f"\n{args.size} {args.family}, {resolution}x{resolution} px, euler, CFG 7, fp32\n")
    print(f"| run | wall s, {few} step(s) | wall s, {many} steps | s per step | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|")
    per_step = {}
    for side in ("gen_img.py", "diffusers pipeline"):
        a, b = results[side, few], results[side, many]
        per_step[side] = (b["wall"] - a["wall"]) / (many - few)
        print(f"| {side} | {a['wall']:.1f} | {b['wall']:.1f} | {per_step[side]:.2f} | {max(a['rss'], b['rss']):.0f} |")
    print(f"\nstep time gen_img / diffusers: {per_step['gen_img.py'] / per_step['diffusers pipeline']:.2f}")
    finish_work(work, log, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
