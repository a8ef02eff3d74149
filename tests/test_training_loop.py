"""Unit tests of the shared loop's pieces that the recipe tests cannot reach on tiny models."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

import library.training_loop as training_loop


@pytest.fixture
def one_process_group():
    """A real (gloo) process group of one process: all_reduce(SUM) is then the identity."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("bucket", [1, 7, 10 ** 9])
def test_gradient_averaging_in_buckets_puts_every_value_back(one_process_group, monkeypatch, bucket):
    """Whatever the bucket size (one tensor per bucket, buckets splitting the list unevenly, everything in one),
    each gradient comes back in place, divided by the process count; parameters without gradients are skipped."""
    monkeypatch.setattr(training_loop, "ALL_REDUCE_BUCKET", bucket)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in [(3, 2), (5,), (1,), (2, 2, 2), (4,)]]
    for p in params:
        p.grad = torch.randn(p.shape)
    params[1].grad = None
    expected = [None if p.grad is None else p.grad / 2 for p in params]
    trainer = SimpleNamespace(trainable_parameters=params, accelerator=SimpleNamespace(num_processes=2))
    training_loop.Trainer._average_gradients(trainer)
    for p, e in zip(params, expected):
        assert (p.grad is None and e is None) or torch.equal(p.grad, e)
