"""DDP without its gradient all-reduce, in every process started with this folder on PYTHONPATH: the negative
control of tests/train/test_ddp.py.

Python imports ``sitecustomize`` at start-up, so the patch reaches the trainer even though ``pcbench-train``
re-executes itself (pcbench/cli/train.py, for the allocator settings). Every ``DistributedDataParallel`` built
afterwards gets a communication hook that hands each rank its own gradients back unreduced, so each rank steps
on its part of the batch alone; parameters and buffers are still broadcast as usual.
"""

# No ``from __future__ import annotations``: DDP checks the hook's annotations as objects (dist.GradBucket).
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.parallel
import torch.nn.parallel.distributed


def _keep_local_gradients(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """A DDP comm hook that communicates nothing: the bucket's local gradients are the result."""
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


class _NoAllReduce(torch.nn.parallel.DistributedDataParallel):
    """DDP whose gradients are never combined across ranks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_comm_hook(None, _keep_local_gradients)


# both names, so that ``nn.parallel.DistributedDataParallel`` and a ``from ... import`` each get the patch
torch.nn.parallel.DistributedDataParallel = _NoAllReduce  # type: ignore[misc]
torch.nn.parallel.distributed.DistributedDataParallel = _NoAllReduce  # type: ignore[misc]
