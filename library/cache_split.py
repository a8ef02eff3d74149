"""The latent and text-encoder caches filled by all the processes of a launch together (`accelerate launch
--num_processes N`, on one machine or several), as kohya's tools/cache_latents.py does on several GPUs: each
process encodes its share and then holds the whole cache.

What is shared out are the *batches* one process would encode (the VAE's --vae_batch_size images of one bucket, the
text encoders' chunk of captions), batch k to process k mod N. A model's output can differ in the last bits with
the batch it is computed in, so keeping every entry in the batch it has in a 1-process run makes the cache the same
bytes whatever the process count.

Before anything is encoded the processes agree on what is missing (the union of what each found missing or stale):
they may see different disks (a copy of the dataset per machine), and they must share out the same list and run
the same number of collective calls, or a share is lost or a process waits forever. The agreement is also the
point after which writing starts, so no process checks an entry while another is rewriting it.

Then the shares meet: a disk cache through the dataset folder (each process writes its own entries atomically,
then, after a barrier, reads the others'; kohya's way), an in-memory cache through the process group (the entries
gathered a round at a time, one batch per process per round, so the memory in flight stays at N batches).

A process whose share fails (a NaN from the VAE, an unwritable folder) must not leave the others waiting in the
next collective until the timeout: `run_together` tells every process, and each stops with the error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, Sequence, TypeVar

T = TypeVar("T")

# What a share of the caching may raise and a training script reports as an error (not a crash).
CACHING_ERRORS = (ValueError, OSError, FloatingPointError)


class CacheShareError(ValueError):
    """Another process failed its share of the caching (its own error is reported by that process)."""


@dataclass(frozen=True)
class ProcessShare:
    """This process's place among the processes that fill a cache together (count 1: alone, no communication).
    The collectives use torch.distributed's default group, which accelerate has set up when count > 1."""

    count: int = 1
    index: int = 0

    @classmethod
    def of(cls, accelerator) -> "ProcessShare":
        return cls(count=accelerator.num_processes, index=accelerator.process_index)

    def owns(self, batch_number: int) -> bool:
        return batch_number % self.count == self.index

    def mine(self, batches: Sequence[T]) -> list[T]:
        return [b for k, b in enumerate(batches) if self.owns(k)]

    def others(self, batches: Sequence[T]) -> list[T]:
        return [b for k, b in enumerate(batches) if not self.owns(k)]

    def gather(self, value: T) -> list[T]:
        """Every process's `value`, in process order (picklable values)."""
        if self.count == 1:
            return [value]
        import torch.distributed as dist

        values: list = [None] * self.count
        dist.all_gather_object(values, value)
        return values

    def agreed(self, names: Iterable[Hashable], order: Sequence[Hashable]) -> list:
        """The union of every process's `names`, in the order of `order` (the same sequence on every process)."""
        union = set().union(*self.gather(set(names)))
        return [name for name in order if name in union]

    def barrier(self) -> None:
        if self.count > 1:
            import torch.distributed as dist

            dist.barrier()

    def run_together(self, work: Callable[[], T]) -> T:
        """`work()` (this process's share); if it raised on any process, every process raises: the failing one its
        own error, the others a CacheShareError naming that process and its error."""
        if self.count == 1:
            return work()
        error, result = None, None
        try:
            result = work()
        except CACHING_ERRORS as e:
            error = e
        reports = self.gather(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        failed = [(i, report) for i, report in enumerate(reports) if report is not None]
        if failed:
            i, report = failed[0]
            raise CacheShareError(f"process {i} of {self.count} failed while filling the cache, so this one stops "
                                  f"too: {report}")
        return result

    def exchange_rounds(self, my_batches: Sequence[T], entries_of: Callable[[T], dict]) -> Iterable[dict]:
        """The entries of every other process, a batch's worth at a time: round r gathers `entries_of` each
        process's r-th batch (`my_batches`: this process's share, `mine`, of the same batch list on every process,
        so all run the same number of rounds)."""
        rounds = max(self.gather(len(my_batches)))
        for r in range(rounds):
            gathered = self.gather(entries_of(my_batches[r]) if r < len(my_batches) else {})
            for i, entries in enumerate(gathered):
                if i != self.index:
                    yield entries


SINGLE_PROCESS = ProcessShare()
