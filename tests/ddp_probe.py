"""Run training scripts in the processes of one `accelerate launch`, watching the gradient communication.

    accelerate launch --num_processes 2 tests/ddp_probe.py RUNS.json REPORT_PREFIX

RUNS.json: a list of {"script": "train_network", "argv": [...], "stop_after": null, "fault": "none"}, run one after
the other in the same processes (one launch pays the imports once). Every DistributedDataParallel built gets a communication hook that
counts the gradient values it averages (and those it was handed outside a backward pass, where no overlap is
possible) and records its options (find_unused_parameters, static_graph, gradient_as_bucket_view), and every Python-level `torch.distributed.all_reduce` is counted too (the loop's loss logging; a
hand-written gradient averaging would show up here). Each process writes REPORT_PREFIX.<rank>.json: per run, those
counts and the number of trained values DDP holds.

Every latent and text-encoder cache built is reported too (`caches`, a list per run in build order, each entry a
list by process, gathered so that both reports are the same): how many entries that process encoded, and a digest
of every entry it holds afterwards (`entry_digest`, by cache file name for latents, by caption for text). And
`seeds`: the seed each process orders the epochs' batches by (training_setup.epoch_batches), by process.

A run's "fault" plants a defect in the averaging, so a test can show that its tolerance catches it:
  sum    the gradients are summed across processes, not averaged (x N)
  twice  divided by the process count twice (/ N after the mean)
  local  no communication: each process steps with its own gradient
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402


def entry_digest(tensors: dict[str, torch.Tensor]) -> str:
    """The exact bytes, dtype and shape of a cache entry's tensors (by name)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def watch_caches(caches: list) -> None:
    """Report each cache build (see the module docstring) into `caches`."""
    from library.latent_cache import LatentCache
    from library.text_encoder_cache import TextEncoderOutputCache

    def latent_digests(cache, dataset):
        digests = {}
        for item in {item.cache_id: item for item in dataset.items}.values():
            entry = {"latents": cache.get(item, False)}
            if item.record.subset.flip_aug:
                entry["latents_flipped"] = cache.get(item, True)
            digests[cache.disk_path(item).name] = entry_digest(entry)
        return digests

    def text_digests(cache, dataset):
        return {caption: entry_digest(entry) for caption, entry in cache.entries.items()}

    for cls, kind, digests in ((LatentCache, "latents", latent_digests), (TextEncoderOutputCache, "text", text_digests)):
        original = cls.build

        def build(self, dataset, *args, _original=original, _kind=kind, _digests=digests, **kwargs):
            _original(self, dataset, *args, **kwargs)
            mine = {"kind": _kind, "encoded": self.encoded, "digests": _digests(self, dataset)}
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, mine)
            caches.append({"kind": _kind, "encoded": [g["encoded"] for g in gathered],
                           "digests": [g["digests"] for g in gathered]})

        cls.build = build


def watch_seeds(seeds: list) -> None:
    """Record into `seeds` the seed each process's batches come from, gathered (see the module docstring)."""
    from library import training_setup

    original = training_setup.epoch_batches

    def epoch_batches(dataset, seed, accelerator):
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, seed)
        seeds[:] = gathered
        return original(dataset, seed, accelerator)

    training_setup.epoch_batches = epoch_batches


def main() -> int:
    runs = json.loads(Path(sys.argv[1]).read_text())
    prefix = sys.argv[2]
    fault = "none"  # each run's (set in the loop below; the hook reads it)
    counts = dict.fromkeys(("ddp_reduced", "ddp_reduced_after_backward", "ddp_held", "other_all_reduce"), 0)
    original_all_reduce, original_init = dist.all_reduce, DistributedDataParallel.__init__

    def all_reduce(tensor, *args, **kwargs):
        counts["other_all_reduce"] += tensor.numel()
        return original_all_reduce(tensor, *args, **kwargs)

    def hook(process_group, bucket):
        """torch's default allreduce hook (the mean over processes), counted, or with the planted fault."""
        tensor = bucket.buffer()
        counts["ddp_reduced"] += tensor.numel()
        if torch._C._current_graph_task_id() == -1:  # launched outside the autograd engine: no overlap possible
            counts["ddp_reduced_after_backward"] += tensor.numel()
        if fault == "local":
            future = torch.futures.Future()
            future.set_result(tensor)
            return future
        world = dist.get_world_size(process_group)
        divisor = {"none": world, "sum": 1, "twice": world * world}[fault]
        future = original_all_reduce(tensor, group=process_group, async_op=True).get_future()
        return future.then(lambda f: f.value()[0].div_(divisor))

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        counts["ddp_held"] = sum(p.numel() for p in self.module.parameters() if p.requires_grad)
        counts["ddp_options"] = {"find_unused_parameters": self.find_unused_parameters,
                                 "static_graph": self.static_graph,
                                 "gradient_as_bucket_view": self.gradient_as_bucket_view}
        self.register_comm_hook(None, hook)

    DistributedDataParallel.__init__ = init
    dist.all_reduce = all_reduce
    caches, seeds = [], []
    watch_caches(caches)
    watch_seeds(seeds)

    from accelerate.state import AcceleratorState

    reports = []
    for run in runs:
        fault = run.get("fault", "none")
        counts.update(dict.fromkeys(counts, 0), ddp_options=None)
        caches.clear()
        seeds.clear()
        AcceleratorState._reset_state(reset_partial_state=True)  # a new Accelerator per run, as in recipe_helpers
        if run.get("stop_after"):
            os.environ["SDTRAIN_STOP_AFTER_STEPS"] = str(run["stop_after"])
        try:
            assert importlib.import_module(run["script"]).main(run["argv"]) == 0
        finally:
            os.environ.pop("SDTRAIN_STOP_AFTER_STEPS", None)
        reports.append(dict(counts, caches=list(caches), seeds=list(seeds)))
    Path(f"{prefix}.{dist.get_rank()}.json").write_text(json.dumps(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
