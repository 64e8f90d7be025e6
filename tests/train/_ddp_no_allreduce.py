"""``python -m pcbench.train`` with DDP's gradient all-reduce removed: the negative control of test_ddp.py.

Run as a script under torchrun. Every ``DistributedDataParallel`` the trainer builds gets a communication hook
that hands each rank its own gradients back unreduced, so each rank steps on its half of the batch alone.
"""

from __future__ import annotations

import runpy
from typing import Any

import torch
import torch.nn.parallel
from torch.nn.parallel import DistributedDataParallel


def _keep_local_gradients(state: Any, bucket: Any) -> torch.futures.Future[torch.Tensor]:
    """A DDP comm hook that communicates nothing: the bucket's local gradients are the result."""
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


class _NoAllReduce(DistributedDataParallel):
    """DDP whose gradients are never averaged across ranks (parameters and buffers are still broadcast)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_comm_hook(None, _keep_local_gradients)


if __name__ == "__main__":
    # patched before pcbench is imported, so a module-level ``from torch.nn.parallel import ...`` gets it too
    torch.nn.parallel.DistributedDataParallel = _NoAllReduce  # type: ignore[misc]
    torch.nn.parallel.distributed.DistributedDataParallel = _NoAllReduce  # type: ignore[misc]
    runpy.run_module("pcbench.train", run_name="__main__", alter_sys=True)
