"""--fp8_base and --torch_compile on a CUDA GPU: what the CPU tests cannot show (a lent H200, one run).

    python3 benchmarks/bench_fp8_compile.py --out DIR [--budget-s 480]      # CUDA: every stage
    .venv/bin/python benchmarks/bench_fp8_compile.py --out /tmp/x --smoke    # CPU: tiny sizes, eager only

Stages (each reported, a failing one does not stop the next; no stage starts after --budget-s):
  parity   tiny SD 1.x U-Net with a rank-4 LoRA under bf16 autocast on CUDA: loss and LoRA gradients with the
           U-Net stored in float8 against the same U-Net with its weights rounded to float8 (bit-equal expected,
           as on CPU).
  memory   full-size SD 1.5 U-Net (random weights, bf16) with a rank-16 LoRA, 512 px (64x64 latents), batch 1:
           parameter bytes of the U-Net, the CUDA allocator's peak during forward + backward, and s/step (median
           of 5 after 2 warm-ups), for a bf16 base, the float8 base, and a float8 base that upcasts with a plain
           weight.to() in the forward (autograd then keeps the upcast copies until backward: what
           library/fp8_weights.py avoids); with and without gradient checkpointing.
  compile  the LoRA U-Net step eager and compiled by inductor (torch.compile via library.compilation): compile
           time, s/step, loss and gradient differences; tiny, then full size.
  scripts  train_network.py on a tiny model, bf16, 4 steps: plain; --fp8_base; --fp8_base against a run on the
           model file rounded to float8 (bit-equal expected); --fp8_base --torch_compile (inductor) against
           --fp8_base (losses within float tolerance expected).
Writes DIR/records.jsonl (one JSON object per measurement) and DIR/summary.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

STARTED = time.perf_counter()


class Report:
    def __init__(self, out: Path):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.lines: list[str] = []

    def record(self, stage: str, **values) -> None:
        values = {"stage": stage, **values}
        with open(self.out / "records.jsonl", "a") as f:
            f.write(json.dumps(values) + "\n")
        line = f"{stage}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in values.items() if k != "stage")
        print(line, flush=True)
        self.lines.append(line)
        (self.out / "summary.txt").write_text("\n".join(self.lines) + "\n")


def unet_with_lora(size: str, device, *, rank: int, seed: int = 0):
    """An SD 1.x U-Net (random weights) in bf16 with a LoRA (fp32) on its attention and feed-forward layers."""
    from diffusers import UNet2DConditionModel

    import networks.lora as lora
    from library.families import FAMILIES, ModelSize

    torch.manual_seed(seed)
    config = FAMILIES["sd1"].configs(ModelSize.FULL if size == "full" else ModelSize.TINY).unet
    with torch.device(device):  # initialised where it runs: a full-size U-Net in seconds
        unet = UNet2DConditionModel.from_config(config).to(torch.bfloat16).requires_grad_(False)
    return unet, (lambda: _apply_lora(lora, unet, rank, device))


def _apply_lora(lora, unet, rank, device):
    torch.manual_seed(1)
    network = lora.create_network(1.0, rank, rank / 2, None, None, unet)
    network.apply_to(None, unet, apply_text_encoder=False)
    network.to(device)
    with torch.no_grad():  # a trained-looking LoRA (a fresh one has zero up matrices: no gradient reaches down)
        for p in network.parameters():
            p.normal_(0, 0.01)
    return network


def inputs(unet, latent: int, device, seed: int = 2):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(1, 4, latent, latent, generator=g).to(device)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g).to(device)
    return x, torch.tensor([500], device=device), context


def step(unet, network, batch, device_type: str) -> torch.Tensor:
    x, t, context = batch
    with torch.autocast(device_type, dtype=torch.bfloat16):
        out = unet(x, t, context).sample
    loss = out.float().square().mean()
    loss.backward()
    return loss.detach()


def lora_grads(network) -> list[torch.Tensor]:
    grads = [p.grad.detach().clone() for p in network.parameters()]
    network.zero_grad(set_to_none=True)
    return grads


def rounded_copy_of_weights(unet) -> None:
    with torch.no_grad():
        for module in unet.modules():
            if type(module) in (nn.Linear, nn.Conv2d) and module is not unet.conv_in:
                module.weight.copy_(module.weight.to(torch.float8_e4m3fn).to(module.weight.dtype))


def stage_parity(report: Report, device) -> None:
    from library.fp8_weights import store_in_float8

    results = []
    for variant in ("rounded", "float8"):
        unet, add_lora = unet_with_lora("tiny", device, rank=4)
        if variant == "rounded":
            rounded_copy_of_weights(unet)
        else:
            store_in_float8(unet, torch.bfloat16, what="U-Net")
        network = add_lora()
        loss = step(unet, network, inputs(unet, 8, device), device.type)
        results.append((loss, lora_grads(network)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    report.record("parity", device=str(device), loss_equal=bool(torch.equal(loss_a, loss_b)),
                  grads_equal=all(torch.equal(a, b) for a, b in zip(grads_a, grads_b)),
                  max_grad_diff=max((a - b).abs().max().item() for a, b in zip(grads_a, grads_b)))


def _naive_upcast_forward():
    """Float8 layers whose forward upcasts with a plain weight.to(): autograd keeps the copy for backward."""
    from torch.nn import functional as F

    from library import fp8_weights

    def linear(self, x):
        return F.linear(x, self.weight.to(self.compute_dtype), self.bias)

    def conv(self, x):
        return self._conv_forward(x, self.weight.to(self.compute_dtype), self.bias)

    return [(fp8_weights.Float8Linear, linear), (fp8_weights.Float8Conv2d, conv)]


def stage_memory(report: Report, device, size: str, latent: int) -> None:
    from library.fp8_weights import store_in_float8

    for checkpointing in (False, True):
        for variant in ("bf16", "float8", "float8_naive_upcast"):
            torch.cuda.empty_cache() if device.type == "cuda" else None
            unet, add_lora = unet_with_lora(size, device, rank=16)
            if checkpointing:
                unet.enable_gradient_checkpointing()
                unet.train()
            saved = []
            if variant != "bf16":
                store_in_float8(unet, torch.bfloat16, what="U-Net")
            if variant == "float8_naive_upcast":
                for cls, forward in _naive_upcast_forward():
                    saved.append((cls, cls.forward))
                    cls.forward = forward
            try:
                network = add_lora()
                batch = inputs(unet, latent, device)
                weight_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
                times = []
                for i in range(7):
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                        if i == 2:
                            torch.cuda.reset_peak_memory_stats()
                    start = time.perf_counter()
                    step(unet, network, batch, device.type)
                    network.zero_grad(set_to_none=True)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    if i >= 2:
                        times.append(time.perf_counter() - start)
                peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
                report.record("memory", size=size, latent=latent, checkpointing=checkpointing, variant=variant,
                              unet_param_gib=weight_bytes / 2 ** 30, peak_allocated_gib=peak,
                              s_per_step=statistics.median(times))
            finally:
                for cls, forward in saved:
                    cls.forward = forward
            del unet, network
    if device.type == "cuda":
        torch.cuda.empty_cache()


def stage_compile(report: Report, device, size: str, latent: int, backend: str) -> None:
    from library.compilation import CompileSettings

    runs = {}
    for variant in ("eager", "compiled"):
        unet, add_lora = unet_with_lora(size, device, rank=16 if size == "full" else 4)
        network = add_lora()
        if variant == "compiled":
            CompileSettings(backend=backend).apply(unet, what="U-Net")
        batch = inputs(unet, latent, device)
        start = time.perf_counter()
        loss = step(unet, network, batch, device.type)
        grads = lora_grads(network)
        if device.type == "cuda":
            torch.cuda.synchronize()
        first = time.perf_counter() - start
        times = []
        for _ in range(5):
            start = time.perf_counter()
            step(unet, network, batch, device.type)
            network.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        runs[variant] = (loss, grads, first, statistics.median(times))
        del unet, network
    (loss_e, grads_e, first_e, step_e), (loss_c, grads_c, first_c, step_c) = runs["eager"], runs["compiled"]
    grad_rel = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(grads_c, grads_e))
    report.record("compile", size=size, backend=backend, first_step_s_eager=first_e, first_step_s_compiled=first_c,
                  s_per_step_eager=step_e, s_per_step_compiled=step_c,
                  loss_rel_diff=abs(loss_c.item() - loss_e.item()) / abs(loss_e.item()), max_grad_rel_diff=grad_rel)


def stage_scripts(report: Report, root: Path, compile_backend: str) -> None:
    from tests.recipe_helpers import logged_losses, run_script, tiny_workspace
    from tests.test_fp8_base import write_rounded_model

    tiny_workspace(root, images=4, folder="2_zwxq shape", prefix="zwxq shape, ")
    write_rounded_model(root / "sd1.safetensors", root / "sd1_rounded.safetensors", text_encoders=True,
                        through=torch.bfloat16)  # the runs load the model in bf16 and round from there

    def args(out, model="sd1.safetensors"):
        return ["--pretrained_model_name_or_path", str(root / model), "--train_data_dir", str(root / "data"),
                "--output_dir", str(root / out), "--output_name", "lora", "--resolution", "64", "--seed", "3",
                "--train_batch_size", "2", "--max_data_loader_n_workers", "0", "--max_train_steps", "4",
                "--network_dim", "4", "--learning_rate", "1e-2", "--mixed_precision", "bf16",
                "--logging_dir", str(root / out / "logs")]

    runs = {"plain": args("plain"), "fp8": args("fp8") + ["--fp8_base"],
            "rounded": args("rounded", "sd1_rounded.safetensors"),
            "fp8_compiled": args("fp8_compiled") + ["--fp8_base", "--torch_compile", "--dynamo_backend",
                                                    compile_backend]}
    losses = {}
    for name, argv in runs.items():
        start = time.perf_counter()
        run_script("train_network", argv)
        losses[name] = logged_losses(root / name / "logs")
        report.record("scripts", run=name, seconds=time.perf_counter() - start, losses=losses[name])
    report.record("scripts", fp8_equals_rounded=losses["fp8"] == losses["rounded"],
                  compiled_max_rel_diff=max(abs(a - b) / abs(b) for a, b in zip(losses["fp8_compiled"],
                                                                                  losses["fp8"])))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budget-s", type=float, default=480.0, help="no stage starts after this many seconds")
    p.add_argument("--smoke", action="store_true", help="tiny sizes only, eager 'compile' backend (a CPU check)")
    args = p.parse_args()
    report = Report(args.out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size, latent, backend = ("tiny", 8, "eager") if args.smoke else ("full", 64, "inductor")
    report.record("start", device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  torch=torch.__version__)
    stages = [("parity", lambda: stage_parity(report, device)),
              ("memory", lambda: stage_memory(report, device, size, latent)),
              ("scripts", lambda: stage_scripts(report, Path(tempfile.mkdtemp(prefix="fp8_scripts_")), backend)),
              ("compile tiny", lambda: stage_compile(report, device, "tiny", 8, backend)),
              ("compile full", lambda: stage_compile(report, device, size, latent, backend))]
    for name, run in stages:
        if time.perf_counter() - STARTED > args.budget_s:
            report.record("skipped", what=name, reason="over --budget-s")
            continue
        try:
            run()
        except Exception as e:  # a stage's failure is a finding; the next stage still runs
            traceback.print_exc()
            report.record("failed", what=name, error=f"{type(e).__name__}: {e}"[:500])
    report.record("end", seconds=time.perf_counter() - STARTED)
    return 0


if __name__ == "__main__":
    sys.exit(main())
