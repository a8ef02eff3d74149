"""Peak memory and time of the full-size SD 1.5 VAE (random weights) decoding a 1024x1024 image (128x128 latents)
and encoding one, plainly and with gen_img's --vae_slices N (library/vae_row_slicing.py), each in a fresh child
process; then how far the sliced outputs are from the plain ones.

Peak RSS is the child's own ru_maxrss (os.wait4). Every child first builds the VAE and its input and reports its
RSS then (the floor: python, torch, diffusers, the 319 MiB of weights); "decode peak over floor" is the peak minus
that, the memory the decode or encode itself took. This process imports no torch (a child's ru_maxrss starts at its
parent's peak).

    python benchmarks/bench_vae_slices.py                    # ~5-8 min on 2 cores
    python benchmarks/bench_vae_slices.py --size 256 --slices 4   # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_common import machine_line, mem_available_gib, run_child, work_dir  # noqa: E402


def child(args: argparse.Namespace) -> None:
    """Build the VAE and the input, report the RSS, run one encode or decode, save the output."""
    import resource

    import torch
    from diffusers import AutoencoderKL

    from library import vae_row_slicing
    from library.families import FAMILIES, ModelSize

    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(FAMILIES["sd1"].configs(ModelSize.FULL).vae).eval()
    generator = torch.Generator().manual_seed(1)
    if args.op == "decode":
        data = torch.randn(1, 4, args.size // 8, args.size // 8, generator=generator)
    else:
        data = torch.rand(1, 3, args.size, args.size, generator=generator) * 2 - 1
    if args.child_slices:
        vae_row_slicing.enable(vae, args.child_slices)
    floor = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    with torch.no_grad():
        out = vae.decode(data).sample if args.op == "decode" else vae.encode(data).latent_dist.parameters
    seconds = time.perf_counter() - start
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.save(out, args.child_out)
    # ru_maxrss only grows: if building the VAE peaked higher than the decode, the decode's own peak is unknown
    print("RESULT " + json.dumps({"floor": floor, "peak_before": peak_before, "peak_after": peak_after,
                                  "seconds": seconds}), flush=True)


def compare(args: argparse.Namespace) -> None:
    """Child: each sliced output against the plain one (relative to its largest magnitude; decodes also in 8-bit
    levels, as an image is saved)."""
    import torch

    for op, plain_file, others in json.loads(args.compare):
        plain = torch.load(plain_file)
        for n, file in others:
            got = torch.load(file)
            rel = ((got - plain).abs().max() / plain.abs().max()).item()
            line = {"op": op, "slices": n, "rel": rel, "bit_equal": torch.equal(got, plain)}
            if op == "decode":
                to8 = lambda t: ((t / 2 + 0.5).clamp(0, 1) * 255).round()  # noqa: E731  (the image processor's)
                line["levels"] = (to8(got) - to8(plain)).abs().max().item()
            print("RESULT " + json.dumps(line), flush=True)


def result(log: Path) -> dict:
    return [json.loads(line[7:]) for line in log.read_text().splitlines() if line.startswith("RESULT ")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1024, help="image side in px")
    p.add_argument("--slices", type=int, nargs="*", default=[4, 16], help="--vae_slices values to measure")
    p.add_argument("--ops", nargs="*", default=["decode", "encode"], choices=["decode", "encode"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for an idle CPU before each child")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--op", help=argparse.SUPPRESS)  # internal: the measuring child
    p.add_argument("--child-slices", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument("--compare", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.op:
        return child(args)
    if args.compare:
        return compare(args)

    work = work_dir(args.workdir, "bench_vae_slices_")
    print(machine_line())
    print(f"load average before: {open('/proc/loadavg').read().split()[:3]}, {mem_available_gib():.1f} GiB "
          "available", flush=True)
    rows, outputs = [], []
    for op in args.ops:
        files = []
        for n in [0, *args.slices]:
            out = work / f"{op}_{n}.pt"
            log = work / f"{op}_{n}.log"
            measured = run_child([sys.executable, __file__, "--op", op, "--size", str(args.size), "--child-slices",
                                  str(n), "--child-out", str(out)], log, args.threads, args.wait)
            (r,) = result(log)
            rows.append((op, n, measured, r))
            files.append((n, str(out)))
            print(f"{op} {'plain' if not n else f'--vae_slices {n}'}: {r['seconds']:.1f} s, peak RSS "
                  f"{r['peak_after']:.0f} MiB (before the {op}: {r['peak_before']:.0f}), floor {r['floor']:.0f} MiB, "
                  f"others' CPU share {measured['others']:.0%}", flush=True)
        outputs.append((op, files[0][1], files[1:]))
    log = work / "compare.log"
    run_child([sys.executable, __file__, "--compare", json.dumps(outputs)], log, args.threads)
    print(f"\n{args.size}x{args.size}, {args.threads} threads, fp32\n")
    print("| op | --vae_slices | time s | peak RSS MiB | floor MiB | peak over floor MiB | vs plain | others' CPU |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    plain = {}
    for op, n, measured, r in rows:
        over = r["peak_after"] - r["floor"]
        plain.setdefault(op, over)
        note = " (build's peak)" if r["peak_after"] <= r["peak_before"] else ""
        print(f"| {op} | {n or '-'} | {r['seconds']:.1f} | {r['peak_after']:.0f}{note} | {r['floor']:.0f} | {over:.0f} | "
              f"{over / plain[op]:.2f} | {measured['others']:.0%} |")
    print()
    for line in result(log):
        print(f"{line['op']} --vae_slices {line['slices']} vs plain: max relative difference {line['rel']:.2e}, "
              f"bit-equal {line['bit_equal']}" + (f", 8-bit levels {line['levels']:.0f}" if "levels" in line else ""))
    print(f"load average after: {open('/proc/loadavg').read().split()[:3]}")
    for f in work.glob("*.pt"):
        f.unlink()


if __name__ == "__main__":
    main()
