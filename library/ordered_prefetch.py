"""Image preparation in worker processes for the dataset tools (kohya's --max_data_loader_n_workers of the taggers
and captioners): results come back in input order, and only a bounded number are prepared ahead of the consumer,
so a folder of 100k images never piles up decoded pixels in memory while the model is the slow part.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[..., R], items: Iterable[T], *args, workers: int | None,
                ahead_per_worker: int = 4) -> Iterator[R]:
    """`fn(item, *args)` for each item, in order. `workers` 0 / None: in this process. Otherwise `fn` must be a
    module-level function (it is sent to the workers by name) and raise nothing it wants to survive: return the
    error instead. Workers are spawned, not forked: forking a process that already runs threaded libraries
    (onnxruntime, torch) can deadlock the child."""
    if not workers:
        for item in items:
            yield fn(item, *args)
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        source = iter(items)
        pending: deque = deque()

        def submit_next() -> None:
            for item in source:
                pending.append(pool.submit(fn, item, *args))
                return

        for _ in range(workers * ahead_per_worker):
            submit_next()
        while pending:
            future = pending.popleft()
            submit_next()
            yield future.result()
