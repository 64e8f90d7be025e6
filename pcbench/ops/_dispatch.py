"""Which code path an op takes: the tensor's device, or a forced one (``dispatch_as``, ``PCBENCH_DISPATCH``).

Ops choose between engines by device (dense kNN on GPUs, cell/leaf engines on CPUs, larger blocks on
GPUs). Routing every such choice through ``on_gpu_path`` lets the GPU branches run - and be tested and
counted - on CPU tensors, and lets a GPU run the CPU branches for comparison. Only algorithmic branches
follow the switch; resource settings (CPU intra-op threads) still follow the real device.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["ENV_VAR", "KINDS", "dispatch_as", "dispatch_kind", "on_gpu_path"]

ENV_VAR = "PCBENCH_DISPATCH"
# "device": each op follows its tensors' device (the default).
KINDS = ("cuda", "cpu", "device")

# Process-wide rather than per-thread on purpose: a benchmark or test that sets it expects every op of
# the process to follow, including ops run from helper threads.
_forced: str | None = None


def _check_kind(kind: object, source: str) -> str:
    if kind not in KINDS:
        raise ValueError(
            f"{source} must be one of {', '.join(map(repr, KINDS))}, got {kind!r}; use 'cuda' to run the GPU code "
            f"paths on any tensors, 'cpu' to force the CPU paths, 'device' to follow each tensor's device"
        )
    return str(kind)


def dispatch_kind() -> str:
    """The active choice: the innermost ``dispatch_as``, else ``$PCBENCH_DISPATCH``, else ``"device"``."""
    if _forced is not None:
        return _forced
    env = os.environ.get(ENV_VAR, "").strip().lower()
    return _check_kind(env, f"environment variable {ENV_VAR}") if env else "device"


@contextlib.contextmanager
def dispatch_as(kind: str) -> Iterator[None]:
    """Make every op take the branches it takes on ``kind`` ("cuda" / "cpu"), whatever its tensors' device.

    Results are computed on the tensors' own device; only the choice of engine and block sizes changes,
    so ``with dispatch_as("cuda"):`` runs the GPU code paths on CPU tensors. ``"device"`` restores the
    default inside an outer override. Nests; the previous choice is restored on exit (also on error).
    """
    global _forced
    new = _check_kind(kind, "dispatch_as(kind)")
    old = _forced
    _forced = new
    try:
        yield
    finally:
        _forced = old


def on_gpu_path(t: Tensor | torch.device) -> bool:
    """Whether an op on ``t`` (a tensor or a device) takes its GPU branch under the active dispatch."""
    kind = dispatch_kind()
    if kind != "device":
        return kind == "cuda"
    dev = t.device if isinstance(t, Tensor) else t
    return dev.type != "cpu"
