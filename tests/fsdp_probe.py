"""Run by tests/test_fsdp.py under `torch.distributed.run --nproc_per_node 2`: FSDPTrainingEngine on a small model
with a stand-in accelerator. Writes rank<N>.json into $FSDP_PROBE_OUT: whether the shards held gradients after each
micro-batch (the engine reduce-scatters at the last one only) and whether the reduced gradient is the mean of the two
processes' gradients."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from library.fsdp_engine import FSDPSettings, FSDPTrainingEngine


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    accelerator = SimpleNamespace(device=torch.device("cpu"), process_index=rank, is_main_process=rank == 0,
                                  mixed_precision="no", backward=lambda loss: loss.backward(),
                                  wait_for_everyone=dist.barrier)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2))
    reference = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = FSDPTrainingEngine(accelerator, FSDPSettings())
    step = SimpleNamespace(_forward=lambda x: model(x))
    forward, optimizer = engine.prepare(step, optimizer, unused=[], modules={"model": model})
    inputs = [torch.full((1, 4), float(rank * 2 + micro + 1)) for micro in range(2)]
    held = []
    for micro, x in enumerate(inputs):
        last = micro == 1
        with engine.micro_batch(forward, last=last):
            engine.backward(forward(x).square().sum() / 2, last=last)
        held.append([p.grad is not None for p in model.parameters()])
    # The same gradients in one process: the mean over both processes' micro-batches (each divided by 2).
    copy = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2))
    with torch.no_grad():
        for p, r in zip(copy.parameters(), reference):
            p.copy_(r)
    for r in range(2):
        for micro in range(2):
            (copy(torch.full((1, 4), float(r * 2 + micro + 1))).square().sum() / 4).backward()
    mean_ok = all(torch.allclose(p.grad.full_tensor(), q.grad, rtol=1e-5, atol=1e-7)
                  for p, q in zip(model.parameters(), copy.parameters()))
    optimizer_points_at_shards = all(any(p is q for q in model.parameters())
                                     for g in optimizer.param_groups for p in g["params"])
    out = Path(os.environ["FSDP_PROBE_OUT"]) / f"rank{rank}.json"
    out.write_text(json.dumps({"rank": rank, "held": held, "mean": mean_ok, "optimizer": optimizer_points_at_shards}))
    # Both processes done before either tears the group down: a rank leaving while gloo still serves the other
    # aborted it once ("terminate called without an active exception") on a loaded machine.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
