"""Time and peak memory to a ready model: an SD 1.5-size or SDXL-size single file loaded as gen_img.py and the
trainers load it (`read_checkpoint` + `instantiate_models`), next to reading the file once.

    . .venv/bin/activate && export HF_HUB_OFFLINE=1
    python benchmarks/bench_loading.py --family sdxl    # ~13.9 GB fp32 file, ~5 minutes, ~14 GB disk
    python benchmarks/bench_loading.py                  # SD 1.5: ~4.3 GB file
    python benchmarks/bench_loading.py --size tiny      # smoke check

A model with the family's architecture and random weights is written once as an original-layout fp32
`.safetensors` by a child process. Each row then runs in a fresh child process, so interpreter start-up and imports
are included (the imports row gives that fixed cost alone); peak RSS is the child's own `ru_maxrss`. The goal the
rows are read against: peak RSS at most about one copy of the weights in the dtype they are loaded in (plus the
imports), i.e. no second copy of the model while loading.

The page cache cannot be dropped without root; the file was just written (and the read row reads it first), so
every row most likely reads it from the cache when it fits in RAM.
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (ROOT, build_model, finish_work, machine_line, model_file_parser, run_child,  # noqa: E402
                          work_dir)

READ_ONCE = ("import sys\n"
             "with open(sys.argv[1], 'rb', buffering=0) as f:\n"
             "    buf = bytearray(64 << 20)\n"
             "    while f.readinto(buf):\n"
             "        pass\n")
IMPORTS = "import torch, diffusers, transformers, library.model_loading, library.sd_checkpoint"
LOAD = ("import sys, torch\n"
        "from library.sd_checkpoint import read_checkpoint\n"
        "from library.model_loading import instantiate_models\n"
        "with read_checkpoint(sys.argv[1]) as checkpoint:\n"
        "    models = instantiate_models(checkpoint, dtype=getattr(torch, sys.argv[2]))\n"
        "n = sum(p.numel() for m in (models.unet, models.vae, *models.text_encoders) for p in m.parameters())\n"
        "print('parameters', n)\n")


def main() -> int:
    p = model_file_parser(__doc__)
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.build_into:
        build_model(args.size, args.build_into, args.family)
        return 0

    work = work_dir(args.workdir, "bench_loading_")
    log = work / "bench.log"
    py = sys.executable
    src = work / "model.safetensors"
    # No torch in this process: a child's ru_maxrss starts at its parent's peak RSS.
    print(f"{machine_line()}; work dir {work}")
    print(f"benchmark process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    build = run_child([py, __file__, "--size", args.size, "--family", args.family, "--build-into", str(src)], log)
    size = src.stat().st_size
    print(f"built {args.size} {args.family} model: {size / 2**20:.0f} MiB fp32 in {build['wall']:.1f} s "
          f"(build peak RSS {build['rss']:.0f} MiB)", flush=True)

    # (label, argv, bytes of the weights in the dtype loaded)
    steps = [("read the file once (64 MiB reads)", [py, "-c", READ_ONCE, src], None),
             ("python + imports (torch, diffusers, transformers, library)", [py, "-c", IMPORTS], None),
             ("load fp32 (read_checkpoint + instantiate_models)", [py, "-c", LOAD, src, "float32"], size),
             ("load bf16 (from the fp32 file)", [py, "-c", LOAD, src, "bfloat16"], size // 2)]
    rows = []
    for label, argv, weights in steps:
        run = run_child([str(a) for a in argv], log, append=True)
        rows.append((label, run["wall"], run["rss"], weights))
        print(f"  {label}: {run['wall']:.1f} s, peak RSS {run['rss']:.0f} MiB", flush=True)

    read_time, imports_rss = rows[0][1], rows[1][2]
    print(f"\nmodel file: {size / 2**20:.0f} MiB ({args.size} {args.family}, fp32, original layout)\n")
    print("| step | wall s | time / read time | peak RSS MiB | weights MiB (loaded dtype) | "
          "(peak RSS - imports) / weights |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, wall, rss, weights in rows:
        ratio = f"{(rss - imports_rss) * 2**20 / weights:.2f}" if weights else "-"
        weights_mib = f"{weights / 2**20:.0f}" if weights else "-"
        print(f"| {label} | {wall:.2f} | {wall / read_time:.1f} | {rss:.0f} | {weights_mib} | {ratio} |")
    finish_work(work, log, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
