"""Run a Python script (or `-c CODE`) with every diffusers U-Net forward timed, the same instrument for every side
of a benchmark: `python benchmarks/unet_call_timer.py OUT.json gen_img.py --ckpt ...` runs gen_img.py as
`__main__` and writes the seconds of each `UNet2DConditionModel.forward` call to OUT.json at exit.

Timing the calls themselves, rather than the difference of two whole runs' walls, keeps loading, text encoding,
VAE decoding and the noise of minutes-long walls out of a step-time comparison (bench_gen_img.py)."""

import atexit
import json
import os
import runpy
import sys
import time


def main() -> None:
    out, target, *rest = sys.argv[1:]
    from diffusers import UNet2DConditionModel

    times: list[float] = []
    forward = UNet2DConditionModel.forward

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return forward(self, *args, **kwargs)
        finally:
            times.append(time.perf_counter() - start)

    UNet2DConditionModel.forward = timed
    atexit.register(lambda: open(out, "w").write(json.dumps({"unet_call_s": times})))
    if target == "-c":
        sys.argv = ["-c", *rest[1:]]
        sys.path[0] = ""  # as `python -c` has it: the working directory
        exec(compile(rest[0], "<bench child>", "exec"), {"__name__": "__main__"})
    else:
        sys.argv = [target, *rest]
        sys.path[0] = os.path.dirname(os.path.abspath(target))  # as `python script.py` has it
        runpy.run_path(target, run_name="__main__")


if __name__ == "__main__":
    main()
