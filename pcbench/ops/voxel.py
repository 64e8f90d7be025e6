"""Voxelization of packed batches and pooling of point features into voxels."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .batch import check_coords, check_same_device, offset2batch, resolve_offset

__all__ = ["voxel_pool", "voxelize"]

# |coord / voxel_size| must stay below this so floor() is exact in float64 and fits int64 with room.
_GRID_LIMIT = 2.0**52
_KEY_LIMIT = 2**62


def voxelize(coord: Tensor, voxel_size: float, offset: Tensor | None = None, *, validate: bool = True
             ) -> tuple[Tensor, Tensor, Tensor]:
    """Group points into the voxels of a regular grid, per cloud.

    coord: [N, 3] float; voxel ``(i, j, k) = floor(coord / voxel_size)`` (computed in float64).
    Returns ``voxels [V, 4]`` int64 rows ``(cloud, i, j, k)`` sorted lexicographically (so by cloud first),
    ``inverse [N]`` int64 with ``voxels[inverse[n]]`` the voxel of point n, and ``counts [V]`` points per
    voxel. Empty clouds contribute no voxels. ``validate=False`` skips the finiteness and offset value checks
    (host syncs) for inputs already checked (e.g. a ``PointBatch``'s).
    """
    check_coords("coord", coord, finite=validate)
    if isinstance(voxel_size, bool) or not isinstance(voxel_size, numbers.Real) or not (
        math.isfinite(voxel_size) and voxel_size > 0
    ):
        raise ValueError(f"voxel_size must be a positive finite number (grid edge length), got {voxel_size!r}")
    dev = coord.device
    off = resolve_offset("offset", offset, coord.shape[0], dev, validate)
    if coord.shape[0] == 0:
        e = torch.zeros(0, dtype=torch.long, device=dev)
        return torch.zeros(0, 4, dtype=torch.long, device=dev), e, e.clone()
    scaled = coord.detach().double() / float(voxel_size)
    grid = torch.floor(scaled).long()
    lo = grid.amin(0)
    # One host read for the range check and the key radix.
    reach, *span = torch.cat([scaled.abs().max()[None], (grid.amax(0) - lo + 1).double()]).tolist()
    if reach >= _GRID_LIMIT:
        raise ValueError(
            f"coord / voxel_size reaches {reach:.3g}, beyond the exact int64 grid range (2**52); use a larger "
            f"voxel_size than {voxel_size} or recentre/rescale the coordinates"
        )
    span = [int(s) for s in span]
    cloud = offset2batch(off, coord.shape[0])
    nclouds = off.numel()
    if nclouds * span[0] * span[1] * span[2] < _KEY_LIMIT:
        # one mixed-radix int64 key: sorting it sorts (cloud, i, j, k) lexicographically
        g = grid - lo
        key = ((cloud * span[0] + g[:, 0]) * span[1] + g[:, 1]) * span[2] + g[:, 2]
        uniq, inverse, counts = torch.unique(key, sorted=True, return_inverse=True, return_counts=True)
        vz = uniq % span[2]
        rest = uniq // span[2]
        vy = rest % span[1]
        rest = rest // span[1]
        vx = rest % span[0]
        vb = rest // span[0]
        voxels = torch.stack([vb, vx + lo[0], vy + lo[1], vz + lo[2]], 1)
    else:  # coordinate range too wide for one key: row-wise unique (slower, same result)
        rows = torch.cat([cloud[:, None], grid], 1)
        voxels, inverse, counts = torch.unique(rows, sorted=True, return_inverse=True, return_counts=True, dim=0)
    return voxels, inverse, counts


def voxel_pool(feat: Tensor, inverse: Tensor, num_voxels: int, reduce: str = "mean", *, validate: bool = True
               ) -> Tensor:
    """Pool point features ``feat [N, C]`` into ``[num_voxels, C]``: row v reduces the points n with
    ``inverse[n] == v`` by ``mean`` or ``max`` (voxels without points are 0). Differentiable w.r.t. ``feat``.
    ``validate=False`` skips the range check of ``inverse`` (host syncs), for an ``inverse`` an op produced.
    """
    if reduce not in ("mean", "max"):
        raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
    if not isinstance(feat, Tensor) or feat.dim() != 2 or not feat.is_floating_point():
        desc = f"shape {list(feat.shape)} dtype {feat.dtype}" if isinstance(feat, Tensor) else type(feat).__name__
        raise ValueError(f"feat must be a floating [N, C] tensor, got {desc}")
    if isinstance(num_voxels, bool) or not isinstance(num_voxels, numbers.Integral) or num_voxels < 0:
        raise ValueError(f"num_voxels must be a non-negative int (e.g. len(counts) from voxelize), got {num_voxels!r}")
    if not isinstance(inverse, Tensor) or inverse.dim() != 1 or inverse.dtype not in (torch.int64, torch.int32):
        desc = f"shape {list(inverse.shape)} dtype {inverse.dtype}" if isinstance(inverse, Tensor) else type(
            inverse).__name__
        raise ValueError(f"inverse must be an integer [N] tensor (voxel of each point), got {desc}")
    if inverse.shape[0] != feat.shape[0]:
        raise ValueError(f"inverse has {inverse.shape[0]} entries but feat has {feat.shape[0]} rows; they must match")
    check_same_device(feat=feat, inverse=inverse)
    if validate and inverse.numel() and (int(inverse.min()) < 0 or int(inverse.max()) >= num_voxels):
        raise ValueError(
            f"inverse values must be in [0, {num_voxels - 1}] (num_voxels={num_voxels}), got "
            f"[{int(inverse.min())}, {int(inverse.max())}]; pass num_voxels=len(counts) from voxelize"
        )
    out = feat.new_zeros(num_voxels, feat.shape[1])
    idx = inverse.long()[:, None].expand_as(feat)
    return out.scatter_reduce(0, idx, feat, reduce="mean" if reduce == "mean" else "amax", include_self=False)
