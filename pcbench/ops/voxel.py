"""Voxelization of packed batches and pooling of point features into voxels."""

from __future__ import annotations

import torch
from torch import Tensor

from ._reference import voxelize_reference


def voxelize(coord: Tensor, voxel_size: float, offset: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(voxels [V, 4] (cloud, i, j, k), inverse [N], counts [V]) (TEMPORARY: reference body)."""
    v, inv, cnt = voxelize_reference(coord, voxel_size, offset)
    return v.to(coord.device), inv.to(coord.device), cnt.to(coord.device)


def voxel_pool(feat: Tensor, inverse: Tensor, num_voxels: int, reduce: str = "mean") -> Tensor:
    """Pool point features [N, C] into voxels [V, C] by ``inverse`` with ``mean`` or ``max``."""
    out = feat.new_zeros(num_voxels, feat.shape[1])
    idx = inverse.long().unsqueeze(1).expand_as(feat)
    return out.scatter_reduce(0, idx, feat, reduce="mean" if reduce == "mean" else "amax", include_self=False)
