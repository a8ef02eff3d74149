"""Does widening a U-Net's input keep its output bit for bit on a GPU? (tools/add_input_channels.py, library/
input_channels.py.) A torch-only check, for a lent GPU machine (no diffusers needed there):

    run(command="python3 benchmarks/gpu_check_widening.py", timeout_s=300)

The widened model differs from the original in its first convolution only: [320, 4, 3, 3] becomes [320, 4 + k, 3, 3]
with zero weights for the new channels. Everything after it sees the same tensor if that convolution's output is the
same, so the question is whether cuDNN (or whichever kernel torch picks) sums the original channels' terms in the
same order when the input is wider. On the CPU it does (tests/test_add_input_channels.py); a GPU kernel may pick
another algorithm, tiling or split-K for another input width, and then the sums round differently.

For each case (the full-size conv_in widths of SD 1.x / 2.x / SDXL: 320 output channels, 4 -> 5 / 7 / 9 inputs; the
latent sizes of 512 and 1024 px; fp32 with and without TF32, fp16, bf16; cudnn.benchmark off and on; NCHW and
channels-last) it prints whether widened == original bit for bit, the largest difference, and, as the yardstick,
whether the original convolution run twice agrees with itself. Output: stdout, and one JSON record per case in
$OUT/widening.jsonl when OUT is set. Results: docs/benchmarks.md (a lent machine runs the session's own checkout; this
script was run there inline, the same code).
"""

from __future__ import annotations

import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F


def case(dtype: torch.dtype, tf32: bool, benchmark: bool, channels_last: bool, extra: int, size: int) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = benchmark
    generator = torch.Generator(device="cuda").manual_seed(extra * 1000 + size)
    weight = torch.randn(320, 4, 3, 3, device="cuda", generator=generator).mul_(0.05).to(dtype)
    bias = torch.randn(320, device="cuda", generator=generator).to(dtype)
    latents = torch.randn(2, 4, size, size, device="cuda", generator=generator).to(dtype)
    conditions = torch.randn(2, extra, size, size, device="cuda", generator=generator).mul_(3).to(dtype)
    wide_weight = torch.cat([weight, torch.zeros(320, extra, 3, 3, device="cuda", dtype=dtype)], dim=1)
    wide_input = torch.cat([latents, conditions], dim=1)
    if channels_last:
        weight, wide_weight = (w.contiguous(memory_format=torch.channels_last) for w in (weight, wide_weight))
        latents, wide_input = (x.contiguous(memory_format=torch.channels_last) for x in (latents, wide_input))
    with torch.no_grad():
        original = F.conv2d(latents, weight, bias, padding=1)
        again = F.conv2d(latents, weight, bias, padding=1)
        widened = F.conv2d(wide_input, wide_weight, bias, padding=1)
    torch.cuda.synchronize()
    return {"dtype": str(dtype).removeprefix("torch."), "tf32": tf32, "cudnn_benchmark": benchmark,
            "channels_last": channels_last, "in_channels": 4 + extra, "latent_size": size,
            "widened_equal": bool(torch.equal(widened, original)),
            "max_abs_diff": float((widened.float() - original.float()).abs().max()),
            "relative_to_largest": float((widened.float() - original.float()).abs().max() / original.float().abs().max()),
            "original_repeatable": bool(torch.equal(again, original))}


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name()}")
    out_dir = os.environ.get("OUT")
    records = []
    settings = [(torch.float32, False), (torch.float32, True), (torch.float16, False), (torch.bfloat16, False)]
    for (dtype, tf32), benchmark, channels_last, extra, size in itertools.product(
            settings, (False, True), (False, True), (1, 3, 5), (64, 128)):
        record = case(dtype, tf32, benchmark, channels_last, extra, size)
        records.append(record)
        print(json.dumps(record))
    if out_dir:
        with open(os.path.join(out_dir, "widening.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    unequal = [r for r in records if not r["widened_equal"]]
    print(f"{len(records) - len(unequal)} of {len(records)} cases bit for bit; "
          f"{sum(not r['original_repeatable'] for r in records)} cases where the original alone is not repeatable")
    for r in unequal:
        print("differs:", json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
