"""Radius search with a neighbour cap on packed batches (pure torch, CPU and CUDA)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._dense import dense_select
from ._dispatch import on_gpu_path
from ._grid import Grid, cloud_bounds, stencil_search, unit_scale
from .batch import check_same_device, offset2batch, offset2lengths, resolve_offset
from .knn import _DENSE_BLOCK_CUDA, _exact, _validate, compute_dtype, coord_major

__all__ = ["ORDERS", "ball_query"]

#: Which ``max_neighbors`` points of a ball ``ball_query`` keeps: the nearest, or the first in index order.
ORDERS = ("distance", "index")
# Rows of the float64 dist2 gather for ``order="index"`` with ``return_dist2`` (bounds the temporaries).
_DIST_ROWS = 1 << 16


def ball_query(
    query: Tensor,
    support: Tensor,
    radius: float,
    max_neighbors: int,
    query_offset: Tensor | None = None,
    support_offset: Tensor | None = None,
    *,
    order: str = "distance",
    return_dist2: bool = False,
    validate: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """Up to ``max_neighbors`` support points strictly within ``radius`` of each query.

    Args:
        query: ``[M, 3]`` float16/32/64 query points, packed by cloud.
        support: ``[N, 3]`` support points (same dtype and device), packed by cloud.
        radius: search radius (> 0); a neighbour needs ``dist2 < radius**2`` (strict).
        max_neighbors: cap on neighbours per query (> 0).
        query_offset, support_offset: ``[B]`` cumulative end offsets (``None`` = one cloud), the
            same number of clouds on both sides; cloud b of the queries searches cloud b of the support.
        order: which points of a fuller ball are kept. ``"distance"`` (default): the nearest, sorted
            nearest first. ``"index"``: the first ``max_neighbors`` support points in index (row) order,
            ascending; the rule of the official PointNet++ CUDA kernel (charlesq34/pointnet2
            ``tf_ops/grouping/tf_grouping_g.cu``, ``query_ball_point_gpu``), which scans the cloud in
            order and stops at ``nsample``. That kernel fills missing slots with the first index found;
            here they stay -1, and ``torch.where(idx < 0, idx[:, :1], idx)`` gives the kernel's layout.
        return_dist2: also return the squared distances.
        validate: check that coordinates are finite and offsets well formed (host syncs); ``False`` only for
            inputs already checked, e.g. taken from a ``PointBatch`` or produced by another op.

    Returns:
        ``idx [M, max_neighbors]`` int64 global support rows, padded with -1 after the last neighbour
        inside the ball. ``order="distance"``: if ``idx[i, j] = m >= 0`` then ``support[m]`` is the
        j-th nearest support point of ``query[i]`` and lies within ``radius``. ``order="index"``: if
        ``idx[i, j] = m >= 0`` then ``support[m]`` lies within ``radius`` and so do exactly ``j``
        support points of the same cloud at rows below ``m``. With ``return_dist2`` also ``dist2 [M, max_neighbors]``
        in the query dtype (inf where ``idx`` is -1), in the order of ``idx``.
    """
    check_same_device(query=query, support=support, query_offset=query_offset, support_offset=support_offset)
    _validate(query, support, max_neighbors, "auto", k_name="max_neighbors", finite=validate)
    # chained comparisons (False for NaN) rather than math.isfinite, which dynamo cannot trace
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not 0 < radius < math.inf:
        raise ValueError(f"radius must be a positive finite number, got {radius!r}")
    radius = float(radius)
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS} (nearest first, or the first points in index order), "
                         f"got {order!r}")
    qo = resolve_offset("query_offset", query_offset, query.shape[0], query.device, validate)
    so = resolve_offset("support_offset", support_offset, support.shape[0], support.device, validate)
    if qo.numel() != so.numel():
        raise ValueError(
            f"query_offset and support_offset must describe the same number of clouds, got {qo.numel()} and "
            f"{so.numel()}; pass one offset entry per cloud on both sides (None means a single cloud)"
        )
    dev = query.device
    m = query.shape[0]
    k = max_neighbors
    cd = compute_dtype(query.dtype)
    q64, s64 = query.detach().double(), support.detach().double()
    qcl, scl = offset2batch(qo, query.shape[0]), offset2batch(so, support.shape[0])
    if on_gpu_path(query):
        return _ball_dense(query, q64, s64, qcl, scl, qo, so, radius, k, order, return_dist2)
    ns = offset2lengths(so)
    idx = torch.full((m, k), -1, dtype=torch.long, device=dev)
    d2 = torch.full((m, k), math.inf, dtype=torch.float64, device=dev)
    active = torch.nonzero(ns[qcl] > 0).squeeze(1) if m else qcl
    if active.numel():
        lo, hi = cloud_bounds(q64, s64, qcl, scl, qo.numel())
        cell = torch.full((qo.numel(),), radius, dtype=torch.float64, device=dev)
        # Clouds at extreme scales are rescaled by exact powers of two (see knn); dist2 is scaled back.
        scale = unit_scale(lo, hi)
        if scale is None:
            q, s = query.detach().to(cd), support.detach().to(cd)
        else:
            q64, s64 = q64 * scale[qcl, None], s64 * scale[scl, None]
            lo, hi, cell = lo * scale[:, None], hi * scale[:, None], cell * scale
            q, s = q64.to(cd), s64.to(cd)
        # Cells of size >= radius: the 3x3x3 stencil holds the whole ball, so one pass is exact.
        grid = Grid(lo, hi, cell)
        grid.sort_support(s, s64, scl)
        if order == "index":
            ii, _ = stencil_search(q, q64, qcl, active, grid, k, reach=1, ball=(radius * radius, query.dtype))
            idx[active] = ii
            if return_dist2:
                d2[active] = _dist2(q64, s64, active, ii)
            return (idx, d2.to(query.dtype)) if return_dist2 else idx
        ii, _ = stencil_search(q, q64, qcl, active, grid, k, reach=1)
        ii, dd = _exact(coord_major(q64), coord_major(s64, True), active, ii)
        # The reference rounds dist2 to the input dtype before comparing with radius**2; on rescaled
        # clouds both sides carry the same power of two, so the comparison is the same where dist2 and
        # radius**2 are representable, and still meaningful where they would overflow or underflow.
        r2 = cell.square()[qcl[active], None]
        inside = dd.to(query.dtype).double() < r2
        if scale is not None:
            dd = dd / scale[qcl[active], None] / scale[qcl[active], None]
        idx[active] = torch.where(inside, ii, torch.full_like(ii, -1))
        d2[active] = torch.where(inside, dd, torch.full_like(dd, math.inf))
    if return_dist2:
        return idx, d2.to(query.dtype)
    return idx


def _ball_dense(query: Tensor, q64: Tensor, s64: Tensor, qcl: Tensor, scl: Tensor, qo: Tensor, so: Tensor,
                radius: float, k: int, order: str, return_dist2: bool) -> Tensor | tuple[Tensor, Tensor]:
    """GPU path: padded brute force per cloud (``_dense``), sized by one host read; same rule as the grid path."""
    lo, hi = cloud_bounds(q64, s64, qcl, scl, qo.numel())
    scale = unit_scale(lo, hi, always=True)
    cell = torch.full((qo.numel(),), radius, dtype=torch.float64, device=q64.device)
    if scale is not None:  # exact power-of-two rescaling, as in the grid path
        q64, s64, cell = q64 * scale[qcl, None], s64 * scale[scl, None], cell * scale
    idx, dd = dense_select(q64, s64, qo, so, k, _DENSE_BLOCK_CUDA, ball=(cell.square(), query.dtype, order))
    if not return_dist2:
        return idx
    if scale is not None:
        dd = dd / scale[qcl, None] / scale[qcl, None]
    return idx, dd.to(query.dtype)


def _dist2(q64: Tensor, s64: Tensor, rows: Tensor, idx: Tensor) -> Tensor:
    """Float64 squared distances ``|q64[rows] - s64[idx]|^2`` summed x, y, z; inf where ``idx`` is -1."""
    out = torch.empty(idx.shape, dtype=torch.float64, device=idx.device)
    for a in range(0, idx.shape[0], _DIST_ROWS):
        ii = idx[a : a + _DIST_ROWS]
        diff = q64[rows[a : a + _DIST_ROWS], None, :] - s64[ii.clamp_min(0)]
        sq = diff * diff
        d = (sq[..., 0] + sq[..., 1]) + sq[..., 2]
        out[a : a + _DIST_ROWS] = torch.where(ii >= 0, d, math.inf)
    return out
