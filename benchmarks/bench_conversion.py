"""Wall time and peak memory of `tools/convert_diffusers20_original_sd.py` on an SD 1.5-size (or SDXL) model.

    . .venv/bin/activate && export HF_HUB_OFFLINE=1
    python benchmarks/bench_conversion.py --size tiny   # smoke check, under a minute
    python benchmarks/bench_conversion.py               # full size: ~4.3 GB fp32 file, ~3-4 minutes, ~25 GB disk
    python benchmarks/bench_conversion.py --family sdxl # ~13.9 GB fp32 file, ~15 minutes, ~36 GB disk

With `--family sdxl` the steps run in an order that lets each file be deleted once it is no longer needed (the
round trips are checked against per-tensor digests of the source, taken before it is deleted), and the `.ckpt` row
is left out (torch.save holds the whole model in memory: 14 GB).

A model with the SD 1.5 architecture and random weights (no download) is written once as an original-layout
fp32 `.safetensors` by a child process (so the benchmark process never holds the model). Then every step runs in
a fresh child process: the real CLI tool, so interpreter start-up and imports are included (the "imports" rows
give that fixed cost on its own). Peak RSS is the child's own `ru_maxrss`, from `os.wait4` on that child.

The tool keeps facts about the model classes (tensor shapes, full configs) in a disk cache
(library/meta_model_cache.py) so that it need not import diffusers' model classes; the benchmark gives it a cache
of its own in the work dir, so the first fp32 conversion in each direction runs with a cold cache (it imports
diffusers and fills the cache) and the fp16 ones with a warm cache, as a user's first and later conversions do.

The page cache cannot be dropped without root; the source file was just written, so it is most likely cached
for every row alike. The copy row fsyncs its output, as the tool's atomic writes do. Results are checked at the
end: the fp32 round trip must give the original tensors bit for bit, the fp16 one the original cast to fp16.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (ROOT, build_model, finish_work, machine_line, model_file_parser, run_child,  # noqa: E402
                          work_dir)

TOOL = str(ROOT / "tools" / "convert_diffusers20_original_sd.py")
# What the tool imports at start-up; writing a diffusers folder also imports diffusers and transformers.
TOOL_IMPORTS = "import library.atomic_files, library.checkpoint_writer, library.sd_checkpoint, library.tensor_files"
COPY = ("import os, shutil, sys; shutil.copyfile(sys.argv[1], sys.argv[2]); "
        "fd = os.open(sys.argv[2], os.O_RDONLY); os.fsync(fd)")


def run_step(argv: list[str], log: Path) -> tuple[float, float]:
    """Run one step in a fresh process, its output appended to `log`: (wall seconds, its peak RSS in MiB). The
    tool's meta-model cache is the work dir's own (see main)."""
    run = run_child(argv, log, append=True, SDTRAIN_META_CACHE=str(log.parent / "meta_cache"))
    return run["wall"], run["rss"]


def tree_size(path: Path) -> int:
    """Bytes in a file, or in all the files under a folder."""
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def compare(original: Path, other: Path, cast=None) -> str:
    """PASS if `other` has the same keys as `original` and each tensor equals the original (cast, if given)."""
    import torch

    from library.safetensors_io import SafetensorsReader

    with SafetensorsReader(original) as a, SafetensorsReader(other) as b:
        if set(a.keys()) != set(b.keys()):
            return f"FAIL: key sets differ ({len(set(a.keys()) ^ set(b.keys()))} keys in only one file)"
        for key in a.keys():
            want, got = a.read(key), b.read(key)
            if cast is not None and want.is_floating_point():
                want = want.to(cast)
            if want.dtype != got.dtype or want.shape != got.shape or not torch.equal(
                    want.reshape(-1).view(torch.uint8), got.reshape(-1).view(torch.uint8)):
                return f"FAIL: {key} differs ({want.dtype} {tuple(want.shape)} vs {got.dtype} {tuple(got.shape)})"
        return f"PASS ({len(a)} tensors, byte-identical)"


def tensor_digests(path: Path, dtype: str) -> dict[str, str]:
    """name -> sha256 of each tensor's bytes, cast to `dtype` when floating point (read one tensor at a time)."""
    import hashlib

    import torch

    from library.safetensors_io import SafetensorsReader

    out = {}
    with SafetensorsReader(path) as reader:
        for key in reader.keys():
            tensor = reader.read(key)
            if tensor.is_floating_point():
                tensor = tensor.to(getattr(torch, dtype))
            out[key] = hashlib.sha256(tensor.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    return out


def main() -> int:
    p = model_file_parser(__doc__)
    p.add_argument("--digest", nargs=3, help=argparse.SUPPRESS)  # internal: FILE DTYPE JSON_OUT, in a child
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.build_into:
        build_model(args.size, args.build_into, args.family)
        return 0
    if args.digest:
        import json

        Path(args.digest[2]).write_text(json.dumps(tensor_digests(Path(args.digest[0]), args.digest[1])))
        return 0

    def digests_in_child(path: Path, dtype: str) -> dict[str, str]:
        # torch stays out of this process (see below); a child reads and hashes the file
        import json

        out = work / f"digests_{dtype}.json"
        run_step([py, __file__, "--digest", str(path), dtype, str(out)], log)
        return json.loads(out.read_text())

    work = work_dir(args.workdir, "bench_conversion_")
    log = work / "bench.log"
    py = sys.executable
    src = work / "model.safetensors"
    # No torch in this process until the measurements are done: a child's ru_maxrss starts at this process's
    # peak RSS (subprocess uses vfork, and exec records the parent's high-water mark), so this one stays small.
    print(f"{machine_line()}; work dir {work}")
    print(f"benchmark process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB "
          "(a floor under every row)")
    wall, rss = run_step([py, __file__, "--size", args.size, "--family", args.family, "--build-into", str(src)], log)
    size = src.stat().st_size
    print(f"built {args.size} model: {size / 2**20:.0f} MiB in {wall:.1f} s (build peak RSS {rss:.0f} MiB)")

    # (label, argv, output, delete it once measured). The copy goes first: it also warms the page cache.
    d32, d16 = work / "diffusers32", work / "diffusers16"
    rt32, rt16 = work / "rt32.safetensors", work / "rt16.safetensors"
    steps = [
        ("copy .safetensors (shutil.copyfile + fsync)", [py, "-c", COPY, src, work / "copy.safetensors"],
         work / "copy.safetensors", True),
        ("python + tool imports only", [py, "-c", TOOL_IMPORTS], None, False),
        ("python + tool imports + diffusers, transformers", [py, "-c", TOOL_IMPORTS + ", diffusers, transformers"],
         None, False),
        ("single file -> diffusers fp32 (cache cold)", [py, TOOL, src, d32, "--use_safetensors"], d32, False),
        ("diffusers fp32 -> single file fp32 (cache cold)", [py, TOOL, d32, rt32], rt32, False),
        ("single file fp32 -> diffusers fp16 (cache warm)", [py, TOOL, src, d16, "--use_safetensors", "--fp16"], d16,
         False),
        ("diffusers fp16 -> single file fp16 (cache warm)", [py, TOOL, d16, rt16, "--fp16"], rt16, False),
        ("single file -> .ckpt fp32 (torch.save, not streamed)", [py, TOOL, src, work / "model.ckpt"],
         work / "model.ckpt", True),
    ]
    large = args.family == "sdxl"
    if not large:  # the fp32 conversions again, with the cache warm (to outputs deleted once measured)
        w32, wrt32 = work / "diffusers32_warm", work / "rt32_warm.safetensors"
        steps[5:5] = [("single file -> diffusers fp32 (cache warm)", [py, TOOL, src, w32, "--use_safetensors"], w32,
                       True),
                      ("diffusers fp32 -> single file fp32 (cache warm)", [py, TOOL, d32, wrt32], wrt32, True)]
    if large:
        # Disk order: both directions out of the source, then the source goes (its digests stay), then back.
        steps = steps[:4] + [steps[5], ("(digests; source deleted)", None, None, False), steps[4], steps[6]]
    digests = {}
    rows, copy_time = [], None
    for label, argv, out, delete_after in steps:
        if argv is None:
            digests = {dtype: digests_in_child(src, dtype) for dtype in ("float32", "float16")}
            src.unlink()
            continue
        wall, rss = run_step([str(a) for a in argv], log)
        copy_time = copy_time or wall
        written = tree_size(out) if out is not None else 0
        if delete_after:
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        rows.append((label, wall, rss, written))
        print(f"  {label}: {wall:.1f} s, peak RSS {rss:.0f} MiB", flush=True)
        if large and out in (rt32, rt16):  # checked now, then deleted with its diffusers folder
            dtype, folder = ("float32", d32) if out == rt32 else ("float16", d16)
            digests[out] = "PASS" if digests_in_child(out, dtype) == digests[dtype] else "FAIL: tensors differ"
            out.unlink()
            shutil.rmtree(folder)

    print(f"\nmodel file: {size / 2**20:.0f} MiB ({args.size}, fp32, original layout)\n")
    print("| step | wall s | peak RSS MiB | peak RSS / model file size | time / copy time | output MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, wall, rss, written in rows:
        out_mib = f"{written / 2**20:.0f}" if written else "-"
        print(f"| {label} | {wall:.2f} | {rss:.0f} | {rss * 2**20 / size:.2f} | {wall / copy_time:.1f} | {out_mib} |")

    import torch

    if large:
        checks = [("fp32 round trip (single -> diffusers -> single), per-tensor digests", digests[rt32]),
                  ("fp16 round trip (vs the original cast to fp16), per-tensor digests", digests[rt16])]
    else:
        checks = [("fp32 round trip (single -> diffusers -> single)", compare(src, rt32)),
                  ("fp16 round trip (vs the original cast to fp16)", compare(src, rt16, torch.float16))]
    print()
    for what, verdict in checks:
        print(f"{what}: {verdict}")
    finish_work(work, log, args.keep)
    return 0 if all(v.startswith("PASS") for _, v in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
