"""Farthest point sampling on packed batches."""

from __future__ import annotations

from torch import Tensor

from ._reference import fps_reference, sample_counts
from .batch import lengths2offset, offset2lengths


def sample_offset(offset: Tensor, n: int | None = None, ratio: float | None = None) -> Tensor:
    """Offsets [B] of the packed FPS result for the same ``n`` / ``ratio``."""
    return lengths2offset(sample_counts(offset2lengths(offset), n, ratio))


def farthest_point_sample(
    xyz: Tensor, offset: Tensor | None = None, n: int | None = None, ratio: float | None = None, start: int = 0
) -> Tensor:
    """Farthest point sampling (TEMPORARY: reference body)."""
    return fps_reference(xyz, offset, n, ratio, start).to(xyz.device)
