"""Voxelization of packed batches and pooling of point features into voxels."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .batch import check_coords, check_same_device, offset2batch, remember_length_bounds, resolve_offset

__all__ = ["VoxelLevel", "coarsen_levels", "voxel_levels", "voxel_pool", "voxelize"]

# |coord / voxel_size| must stay below this so floor() is exact in float64 and fits int64 with room.
_GRID_LIMIT = 2.0**52
_KEY_LIMIT = 2**62


@dataclass
class VoxelLevel:
    """The occupied cells of one grid level of a packed batch, with the sizes already on the host.

    cells: [V, 4] int64 rows (cloud, i, j, k), sorted lexicographically (so by cloud first).
    inverse: [R] int64 cell of each row of the finer level (of each point, for the first level).
    counts: [V] int64 finer rows per cell.
    offset: [B] int64 cumulative cell ends per cloud (its length bounds remembered: ``batch.length_bounds``
        reads nothing for it).
    lengths: cells per cloud, on the host. lo, hi: per-axis smallest and largest cell coordinate, on the host
        (zeros for an empty level).
    """

    cells: Tensor
    inverse: Tensor
    counts: Tensor
    offset: Tensor
    lengths: list[int]
    lo: list[int]
    hi: list[int]

    @property
    def num_cells(self) -> int:
        """Number of occupied cells V."""
        return int(self.cells.shape[0])


def voxelize(coord: Tensor, voxel_size: float, offset: Tensor | None = None, *, validate: bool = True
             ) -> tuple[Tensor, Tensor, Tensor]:
    """Group points into the voxels of a regular grid, per cloud.

    coord: [N, 3] float; voxel ``(i, j, k) = floor(coord / voxel_size)`` (computed in float64).
    Returns ``voxels [V, 4]`` int64 rows ``(cloud, i, j, k)`` sorted lexicographically (so by cloud first),
    ``inverse [N]`` int64 with ``voxels[inverse[n]]`` the voxel of point n, and ``counts [V]`` points per
    voxel. Empty clouds contribute no voxels. ``validate=False`` skips the finiteness and offset value checks
    (host syncs) for inputs already checked (e.g. a ``PointBatch``'s). Reads the device once
    (``voxel_levels``).
    """
    level = voxel_levels(coord, voxel_size, offset, validate=validate)[0]
    return level.cells, level.inverse, level.counts


def voxel_levels(coord: Tensor, voxel_size: float, offset: Tensor | None = None, factors: Sequence[int] = (), *,
                 anchor: bool = False, validate: bool = True) -> list[VoxelLevel]:
    """``voxelize`` at ``voxel_size`` and every coarser level of a pyramid, with one host read for all.

    Level 0 holds the voxels of ``coord`` (as ``voxelize``; with ``anchor`` each cloud's integer grid is
    shifted so that its smallest voxel coordinate per axis is 0); level ``l`` merges ``factors[l-1]`` cells
    of level ``l - 1`` per axis: its cells are ``floor(cells / factors[l-1])`` of level ``l - 1``, deduplicated
    (equivalently ``floor(grid / prod(factors[:l]))`` of the points, as floor divisions compose).
    Returns ``len(factors) + 1`` levels; ``inverse`` of level 0 maps the points, of level l the cells of l - 1.
    Every level's size, per-cloud cell counts and extent reach the host in one read, so a model that knows its
    pyramid reads the device once for all levels instead of once per level.
    """
    check_coords("coord", coord, finite=validate)
    # a chained comparison (False for NaN) rather than math.isfinite, which dynamo cannot trace
    if isinstance(voxel_size, bool) or not isinstance(voxel_size, numbers.Real) or not 0 < voxel_size < math.inf:
        raise ValueError(f"voxel_size must be a positive finite number (grid edge length), got {voxel_size!r}")
    factors = [int(f) for f in factors]
    if any(f < 1 for f in factors):
        raise ValueError(f"factors must be positive ints (cells merged per axis per level), got {factors}")
    dev = coord.device
    off = resolve_offset("offset", offset, coord.shape[0], dev, validate)
    scaled = coord.detach().double() / float(voxel_size)
    grid = torch.floor(scaled).long()
    cloud = offset2batch(off, coord.shape[0])
    if anchor and coord.shape[0]:
        low = grid.new_zeros(off.numel(), 3).scatter_reduce(0, cloud[:, None].expand_as(grid), grid, "amin",
                                                             include_self=False)
        grid = grid - low[cloud]
    reach = scaled.abs().max()[None] if coord.shape[0] else scaled.new_zeros(1)
    levels, (reach_host,) = _levels_from_rows(cloud, grid, off.numel(), [1, *factors], extra=reach)
    if reach_host >= _GRID_LIMIT:
        raise ValueError(
            f"coord / voxel_size reaches {reach_host:.3g}, beyond the exact int64 grid range (2**52); use a larger "
            f"voxel_size than {voxel_size} or recentre/rescale the coordinates"
        )
    return levels


def coarsen_levels(coords: Tensor, factors: Sequence[int], num_clouds: int) -> list[VoxelLevel]:
    """The coarser levels of integer cells ``coords [V, 4]`` (cloud, i, j, k), rows unique: level l merges
    ``factors[l]`` cells of the previous level per axis (``floor`` division). One host read for all levels."""
    if coords.dim() != 2 or coords.shape[1] != 4 or coords.is_floating_point():
        raise ValueError(f"coords must be an integer tensor [V, 4] (cloud, i, j, k), got {coords.dtype} "
                         f"{list(coords.shape)}")
    factors = [int(f) for f in factors]
    if any(f < 1 for f in factors):
        raise ValueError(f"factors must be positive ints (cells merged per axis per level), got {factors}")
    c = coords.long()
    levels, _ = _levels_from_rows(c[:, 0], c[:, 1:], num_clouds, [1, *factors])
    return levels[1:]


def _levels_from_rows(cloud: Tensor, grid: Tensor, nclouds: int, factors: list[int], extra: Tensor | None = None
                      ) -> tuple[list[VoxelLevel], list[float]]:
    """Unique cells of ``(cloud, floor(grid / prod(factors[:l + 1])))`` per level l, and ``extra``'s values.

    Everything data-dependent is computed on the device first (sort per level, first-of-run flags, cells per
    cloud, extents, key spans) and read in ONE ``tolist``; the cells are then gathered with
    ``nonzero_static`` sized by that read.
    """
    dev, n = grid.device, grid.shape[0]
    pending = []
    scal = [] if extra is None else [extra.double().reshape(-1)]
    f_tot = 1
    for f in factors:
        f_tot *= f
        g = torch.div(grid, f_tot, rounding_mode="floor") if f_tot > 1 else grid
        if n == 0:
            pending.append((g, None, None))
            continue
        lo, hi = g.amin(0), g.amax(0)
        size = hi - lo + 1
        # one mixed-radix int64 key: sorting it sorts (cloud, i, j, k) lexicographically
        key = ((cloud * size[0] + (g[:, 0] - lo[0])) * size[1] + (g[:, 1] - lo[1])) * size[2] + (g[:, 2] - lo[2])
        skey, perm = torch.sort(key)
        first = torch.ones(n, dtype=torch.bool, device=dev)
        first[1:] = skey[1:] != skey[:-1]
        per_cloud = torch.zeros(nclouds, dtype=torch.long, device=dev).index_add_(0, cloud[perm], first.long())
        span = size.double().prod()[None] * nclouds
        scal.append(torch.cat([span, lo.double(), hi.double(), per_cloud.double()]))
        pending.append((g, perm, first))
    host = torch.cat(scal).tolist() if scal else []  # the one host read
    pos = 0 if extra is None else extra.numel()
    extra_host, levels = host[:pos], []
    rep = None  # one finer row per cell of the previous level
    for g, perm, first in pending:
        if perm is None:  # no points: every level is empty
            e = torch.zeros(0, dtype=torch.long, device=dev)
            off = torch.zeros(nclouds, dtype=torch.long, device=dev)
            remember_length_bounds(off, 0, 0)
            levels.append(VoxelLevel(e.reshape(0, 4), e, e.clone(), off, [0] * nclouds, [0] * 3, [0] * 3))
            continue
        span, lo, hi, lengths = host[pos], host[pos + 1:pos + 4], host[pos + 4:pos + 7], host[pos + 7:pos + 7 + nclouds]
        pos += 7 + nclouds
        lengths = [int(x) for x in lengths]
        v = sum(lengths)
        if span < _KEY_LIMIT:
            first_at = torch.nonzero_static(first, size=v).squeeze(1)
            rank_sorted = torch.cumsum(first, 0) - 1
            rank = torch.empty_like(rank_sorted)
            rank[perm] = rank_sorted
            level_rep = perm[first_at]
        else:  # coordinate range too wide for one key: row-wise unique (slower, same result)
            rows = torch.cat([cloud[:, None], g], 1)
            _, rank = torch.unique(rows, sorted=True, return_inverse=True, dim=0)
            level_rep = torch.empty(v, dtype=torch.long, device=dev).scatter_(0, rank, torch.arange(n, device=dev))
        cells = torch.cat([cloud[level_rep, None], g[level_rep]], 1)
        inverse = rank if rep is None else rank[rep]
        counts = torch.zeros(v, dtype=torch.long, device=dev).index_add_(
            0, inverse, torch.ones_like(inverse))
        off = torch.cumsum(torch.tensor(lengths, dtype=torch.long).to(dev, non_blocking=True), 0)
        remember_length_bounds(off, min(lengths), max(lengths))
        levels.append(VoxelLevel(cells, inverse, counts, off, lengths, [int(x) for x in lo], [int(x) for x in hi]))
        rep = level_rep
    return levels, extra_host


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
