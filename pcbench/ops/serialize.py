"""Space-filling-curve serialization (z-order, Hilbert) of voxel grid coordinates."""

from __future__ import annotations

from torch import Tensor


def serialize(grid_coord: Tensor, offset: Tensor | None = None, order: str = "z") -> Tensor:
    """Curve code per point with the cloud index in the high bits (TEMPORARY: not implemented yet)."""
    raise NotImplementedError("serialize is being implemented")
