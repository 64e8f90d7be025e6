"""Data parallelism under ``torchrun``: process group, rank helpers, the batch sampler and BatchNorm sync.

``trainer.batch_size`` is the global batch: :class:`GlobalBatchSampler` cuts the same seeded epoch order
as a single process would into global batches and hands rank ``r`` of ``W`` the ``r``-th slice of each,
so a W-rank run sees exactly the samples of the single-process run, step for step.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import ConfigError

__all__ = [
    "DistInfo",
    "GlobalBatchSampler",
    "all_reduce_sum",
    "broadcast_object",
    "convert_sync_batchnorm",
    "dist_info",
    "init_distributed",
    "launched_by_torchrun",
]


@dataclass(frozen=True)
class DistInfo:
    """Rank, world size and local rank of this process (0, 1, 0 without a process group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on the rank that writes files and logs."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when the torchrun/torch.distributed environment variables describe more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ and "MASTER_ADDR" in os.environ


def dist_info() -> DistInfo:
    """The current process's place in the process group."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def init_distributed(backend: str | None = None) -> bool:
    """Initialise the default process group from torchrun's environment; True if this call created it.

    ``backend=None`` takes nccl when CUDA is available, gloo otherwise.
    """
    if not dist.is_available():
        raise ConfigError("torch.distributed is not available in this torch build; use trainer=cpu or trainer=gpu")
    if dist.is_initialized():
        return False
    if not launched_by_torchrun():
        raise ConfigError("trainer.strategy=ddp needs several processes: launch with "
                         "`torchrun --nproc_per_node=N -m pcbench.train trainer=ddp ...` (or use trainer=cpu/gpu)")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return True


def broadcast_object(obj: object, src: int = 0) -> object:
    """``obj`` of rank ``src`` on every rank (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of ``x`` over ranks (a copy; ``x`` itself without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    y = x.detach().to(_collective_device()).clone()
    dist.all_reduce(y)
    return y.to(x.device)


class GlobalBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Micro-batches of dataset indices: a seeded permutation per epoch cut into global batches of
    ``batch_size``; rank r takes the r-th of ``world_size`` equal slices of each and yields it as
    ``micro_batches`` consecutive micro-batches; ``start_batch`` skips micro-batches (exact resume).

    Micro-batch m of rank r holds positions ``(r * micro_batches + m) * d ... + d`` of its global batch
    (``d = batch_size / (world_size * micro_batches)``), so W ranks x A micro-batches and 1 rank x W*A
    micro-batches see the same groups of samples. ``shuffle=False`` keeps the dataset order. The incomplete
    last global batch is dropped (``drop_last``) so every rank runs the same number of equal steps;
    ``limit_batches`` caps the global batches (optimizer steps) per epoch.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True, limit_batches: int | None = None,
                 micro_batches: int = 1) -> None:
        if batch_size % world_size:
            raise ConfigError(f"trainer.batch_size={batch_size} (the global batch) is not divisible by the "
                             f"{world_size} ranks; use a multiple of {world_size}")
        if micro_batches < 1 or (batch_size // world_size) % micro_batches:
            raise ValueError(f"micro_batches={micro_batches} must divide the {batch_size // world_size} samples "
                             "a rank takes of each global batch")
        self.num_samples, self.batch_size, self.seed, self.shuffle = num_samples, batch_size, seed, shuffle
        self.rank, self.world_size, self.drop_last, self.limit = rank, world_size, drop_last, limit_batches
        self.micro_batches = micro_batches
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the order of ``epoch`` and skip its first ``start_batch`` micro-batches."""
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def num_steps(self) -> int:
        """Global batches (optimizer steps) in a full epoch."""
        n = self.num_samples // self.batch_size if self.drop_last else -(-self.num_samples // self.batch_size)
        return min(n, self.limit) if self.limit else n

    def num_batches(self) -> int:
        """Micro-batches this rank yields in a full epoch (before skipping)."""
        return self.num_steps() * self.micro_batches

    def __len__(self) -> int:
        return max(0, self.num_batches() - self.start_batch)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(int(self.seed) * 100003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        d = self.batch_size // (self.world_size * self.micro_batches)
        for b in range(self.start_batch, self.num_batches()):
            step, micro = divmod(b, self.micro_batches)
            start = step * self.batch_size + (self.rank * self.micro_batches + micro) * d
            yield order[start:start + d]


# ------------------------------------------------------------------------------------------ BatchNorm sync
class _SyncStats(_BatchNorm):
    """BatchNorm forward for [N, C] / [N, C, *] inputs with statistics summed over every rank.

    Works on any backend (gloo included), unlike ``nn.SyncBatchNorm`` (CUDA only): the per-rank sums
    go through ``torch.distributed.nn.functional.all_reduce``, whose backward sums the gradients too, so
    the result equals one BatchNorm over the global batch.
    """

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce  # noqa: PLC0415

        c = x.shape[1]
        xf = x.transpose(0, 1).reshape(c, -1).float()  # [C, N*...]
        n_local = torch.tensor([float(xf.shape[1])], device=x.device)
        stats = torch.cat([xf.sum(1), (xf * xf).sum(1), n_local])
        dev = _collective_device()
        stats = all_reduce(stats.to(dev)).to(x.device)
        count = stats[-1]
        mean = stats[:c] / count
        var = (stats[c:2 * c] / count - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (count / (count - 1).clamp_min(1))
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), m)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x.float() - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


_SYNC_CLASSES: dict[type, type] = {}


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Make every BatchNorm of ``model`` synchronise its statistics across ranks (in place; returns ``model``).

    A layer is converted when its class uses torch's BatchNorm forward, directly or through ``super()``
    after reshaping to [rows, C] (pcbench's point and sparse BatchNorm layers). A layer that computes its
    own statistics (e.g. the fused BatchNorm + ReLU + max of PointNet++ / PTv1) cannot be synchronised
    from outside: ValueError naming it, with the fix.
    """
    from pcbench.models.layers.norm import PointBatchNorm  # noqa: PLC0415

    delegating = {_BatchNorm.forward, PointBatchNorm.forward}
    for name, m in model.named_modules():
        if not isinstance(m, _BatchNorm) or isinstance(m, _SyncStats):
            continue
        cls = type(m)
        own = next(k.__dict__["forward"] for k in cls.__mro__ if "forward" in k.__dict__)
        if own not in delegating:
            raise ConfigError(f"trainer.sync_batchnorm=true cannot synchronise {name} ({cls.__name__}): it computes "
                             "its batch statistics itself; set trainer.sync_batchnorm=false for this model")
        if cls not in _SYNC_CLASSES:
            # MRO: cls, ..., BatchNorm1d, _SyncStats, _BatchNorm: a super().forward() inside cls reaches _SyncStats
            _SYNC_CLASSES[cls] = type(f"Sync{cls.__name__}", (cls, _SyncStats), {"__module__": __name__})
        m.__class__ = _SYNC_CLASSES[cls]
    return model


@contextlib.contextmanager
def maybe_no_sync(model: nn.Module, skip_sync: bool) -> Iterator[None]:
    """DDP's ``no_sync()`` while accumulating gradients; a no-op for other modules."""
    if skip_sync and hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield
