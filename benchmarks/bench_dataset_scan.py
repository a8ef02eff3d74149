"""Scanning and bucketing a large DreamBooth folder: the time from the folder to the training dataset
(`build_groups` + `TrainingDataset`, what every trainer does before loading anything else), per image.

    . .venv/bin/activate
    python benchmarks/bench_dataset_scan.py                      # 10k and 100k small images + 10k 768x512 PNGs
    python benchmarks/bench_dataset_scan.py --images 2000 --photo-pngs 0   # smoke check

Three ways, each in a fresh child process (so the page cache holds the files for all alike, and the child's
start-up is not counted: it times itself):
- "before": as the scan was before --cache_info and the parallel first scan: one process, and PIL's getexif(),
  which decodes a whole PNG to look for EXIF after the pixels (library/images.py `_png_without_exif` patched off);
- "first scan": both cores, PNG chunk headers walked instead of decoding (the default now; it also writes
  metadata_cache.json with --cache_info);
- "repeated, --cache_info": the folder's metadata_cache.json read and every file stat'ed.
Datasets: small images (64-128 px, half PNG, half JPEG, each with a caption file: the header reads and the file
system dominate) and, with --photo-pngs, photo-sized PNGs (768 x 512), where decoding for EXIF dominated.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, machine_line, work_dir  # noqa: E402

CHILD = """
import json, sys, time
mode, folder = sys.argv[1], sys.argv[2]
from library import image_scan, images
if mode == "before":
    image_scan.WORKERS = 1
    images._png_without_exif = lambda image: False
from library.dataset_config import build_groups, specs_from_flags
from library.train_dataset import TrainingDataset
cli = {"train_data_dir": folder, "batch_size": 1, "resolution": (512, 512), "enable_bucket": True,
       "min_bucket_reso": 64, "max_bucket_reso": 1024, "bucket_reso_steps": 64, "caption_extension": ".txt",
       "cache_info": mode != "before"}
start = time.perf_counter()
groups, _ = build_groups(specs_from_flags(cli), family_step=64)
dataset = TrainingDataset(groups, seed=0)
print(json.dumps({"seconds": time.perf_counter() - start, "items": len(dataset)}))
"""


def write_folder(root: Path, n: int, *, photo: bool, seed: int = 0) -> Path:
    """`n` images with captions under root/1_sks; files are copies of a few prototypes (the scan reads headers,
    so their content does not matter, only their formats and sizes)."""
    from PIL import Image

    folder = root / "1_sks"
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sizes = [(768, 512), (512, 768), (640, 640)] if photo else [(96, 64), (64, 96), (80, 80), (128, 96)]
    protos = {}
    for i in range(n):
        size, ext = rng.choice(sizes), ".png" if photo or i % 2 else ".jpg"
        if (size, ext) not in protos:
            gradient = Image.linear_gradient("L").resize(size).convert("RGB")
            path = root / f"proto{ext}"
            gradient.save(path)
            protos[size, ext] = path.read_bytes()
            path.unlink()
        (folder / f"{i:06d}{ext}").write_bytes(protos[size, ext])
        (folder / f"{i:06d}.txt").write_text(f"sks, picture {i}\n", encoding="utf-8")
    return root


def run(mode: str, folder: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(folder)], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, nargs="+", default=[10_000, 100_000], help="small-image dataset sizes")
    p.add_argument("--photo-pngs", type=int, default=10_000, help="photo-sized PNG dataset size (0: none)")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()
    work = work_dir(args.workdir, "bench_scan_")
    print(f"{machine_line()}; load average before: {os.getloadavg()[0]:.2f}; work dir {work}")
    cases = [(f"{n:,} small images (PNG + JPEG)", n, False) for n in args.images]
    if args.photo_pngs:
        cases.append((f"{args.photo_pngs:,} 768x512 PNGs", args.photo_pngs, True))
    print("\n| dataset | before: s (ms/image) | first scan: s (ms/image) | repeated, --cache_info: s (ms/image) |")
    print("|---|---:|---:|---:|")
    for label, n, photo in cases:
        root = work / f"{'photo' if photo else 'small'}_{n}"
        start = time.perf_counter()
        write_folder(root, n, photo=photo)
        print(f"  (wrote {label} in {time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
        row = []
        for mode in ("before", "first", "repeated"):
            result = run(mode, root)
            assert result["items"] == n, result
            row.append(f"{result['seconds']:.2f} ({1000 * result['seconds'] / n:.3f})")
        (root / "1_sks" / "metadata_cache.json").unlink()
        print(f"| {label} | {' | '.join(row)} |", flush=True)
    print(f"\nload average after: {os.getloadavg()[0]:.2f} (other processes share the 2 cores when it is above ~0.5)")
    import shutil

    shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
