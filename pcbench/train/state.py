"""The training loop's state: what a checkpoint saves and a resume restores, and the per-step tallies that
stay on the device between reads.

Per step the loop only adds to device tensors (loss sum, finite count); :meth:`DeviceTally.drain` reads them
once (at the logging interval, at a checkpoint and at the end of an epoch) into the host-side
:class:`TrainState`, which is what ``last.pt`` stores.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

__all__ = ["DeviceTally", "TrainState"]


@dataclass
class TrainState:
    """Progress of a run: position, counters, selection and history; ``state_dict`` round-trips through a checkpoint."""

    epoch: int = 0                 #: current epoch (0-based)
    batch: int = 0                 #: micro-batches consumed in the current epoch
    step: int = 0                  #: optimizer steps so far (skipped ones included)
    skipped: int = 0               #: steps skipped for a non-finite loss or gradient (divergence)
    scaler_skipped: int = 0        #: fp16 steps the loss scaler skipped (overflow at the current scale)
    best: float | None = None      #: the val value that selected best.pt
    best_epoch: int | None = None
    best_metrics: dict[str, Any] | None = None  #: the val metrics of that selection, as measured then
    history: list[dict[str, Any]] = field(default_factory=list)
    test_selected: dict[str, Any] | None = None
    train_samples: int = 0
    train_seconds: float = 0.0
    acc: dict[str, float] = field(default_factory=lambda: {"loss": 0.0, "n": 0, "samples": 0})

    def state_dict(self) -> dict[str, Any]:
        """Plain containers (a ``weights_only`` checkpoint loads them)."""
        return copy.deepcopy({f.name: getattr(self, f.name) for f in fields(self)})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; fields a older checkpoint lacks keep their defaults."""
        names = {f.name for f in fields(self)}
        unknown = set(state) - names
        if unknown:
            raise ValueError(f"training state has unknown fields {sorted(unknown)}; it was written by another "
                             "pcbench version: start a new run directory")
        fresh = TrainState()
        for name in names:
            setattr(self, name, copy.deepcopy(state[name]) if name in state else getattr(fresh, name))

    def mean_loss(self) -> float:
        """Mean training loss over this epoch's finite steps so far; NaN when none was finite (never 0)."""
        return self.acc["loss"] / self.acc["n"] if self.acc["n"] else math.nan


class DeviceTally:
    """Loss sum and finite-step count on the device: added to per micro-batch, read by :meth:`drain`."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)  # [loss sum, finite micro-batches]
        self.pending = False

    def add(self, loss: Tensor, finite: Tensor) -> None:
        """Add one micro-batch's logged loss (a 0-d tensor) when ``finite`` (a bool tensor) holds; no host read."""
        ok = finite.reshape(())
        vals = torch.stack([torch.where(ok, loss.detach().reshape(()).to(torch.float64), 0.0), ok.to(torch.float64)])
        self.sums.add_(vals)
        self.pending = True

    def drain(self, state: TrainState) -> None:
        """Move the tallies into ``state.acc`` (one host read) and zero them."""
        if not self.pending:
            return
        loss, n = self.sums.tolist()
        state.acc["loss"] += loss
        state.acc["n"] += int(n)
        self.sums.zero_()
        self.pending = False
