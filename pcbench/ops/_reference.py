"""Naive, obviously-correct versions of every op: the semantics the fast ops must reproduce.

Loops over clouds and points in numpy / float64 where that makes the result unambiguous. Used by the
tests as an independent check and by the benchmarks as the "naive" row; never by models.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from torch import Tensor

from .batch import offset2start
from .fps import sample_counts

__all__ = [
    "ball_query_reference",
    "fps_reference",
    "interpolate_reference",
    "kernel_map_reference",
    "knn_reference",
    "serialize_reference",
    "voxelize_reference",
]


def _ranges(offset: Tensor | None, n: int) -> list[tuple[int, int]]:
    if offset is None:
        return [(0, n)]
    o = offset.long().cpu()
    s = offset2start(o)
    return [(int(a), int(b)) for a, b in zip(s, o, strict=True)]


def knn_reference(
    query: Tensor, support: Tensor, k: int, query_offset: Tensor | None = None, support_offset: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Brute-force kNN in float64: (idx [M, k] int64 global support rows, -1 if missing; dist2 [M, k], inf if missing)."""
    q = query.detach().double().cpu().numpy()
    s = support.detach().double().cpu().numpy()
    idx = np.full((q.shape[0], k), -1, dtype=np.int64)
    d2 = np.full((q.shape[0], k), np.inf)
    for (qa, qb), (sa, sb) in zip(_ranges(query_offset, len(q)), _ranges(support_offset, len(s)), strict=True):
        if qb == qa or sb == sa:
            continue
        dd = ((q[qa:qb, None, :] - s[None, sa:sb, :]) ** 2).sum(-1)
        order = np.argsort(dd, axis=1, kind="stable")[:, :k]
        kk = order.shape[1]
        idx[qa:qb, :kk] = order + sa
        d2[qa:qb, :kk] = np.take_along_axis(dd, order, axis=1)
    return torch.from_numpy(idx), torch.from_numpy(d2).to(query.dtype)


def ball_query_reference(
    query: Tensor,
    support: Tensor,
    radius: float,
    max_neighbors: int,
    query_offset: Tensor | None = None,
    support_offset: Tensor | None = None,
    order: str = "distance",
) -> Tensor:
    """Neighbours with dist2 < radius**2 (dist2 rounded to the input dtype), padded with -1.

    ``order="distance"``: the ``max_neighbors`` nearest, nearest first. ``order="index"``: the first
    ``max_neighbors`` support rows of the query's cloud that lie inside, scanned in row order.
    """
    if order == "distance":
        idx, d2 = knn_reference(query, support, max_neighbors, query_offset, support_offset)
        return torch.where(d2.double() < radius * radius, idx, torch.full_like(idx, -1))
    if order != "index":
        raise ValueError(f"order must be 'distance' or 'index', got {order!r}")
    q = query.detach().double().cpu().numpy()
    s = support.detach().double().cpu().numpy()
    idx = np.full((q.shape[0], max_neighbors), -1, dtype=np.int64)
    dtype = torch.empty(0, dtype=query.dtype).numpy().dtype
    for (qa, qb), (sa, sb) in zip(_ranges(query_offset, len(q)), _ranges(support_offset, len(s)), strict=True):
        for i in range(qa, qb):
            d2 = ((q[i] - s[sa:sb]) ** 2).sum(-1)
            inside = np.nonzero(d2.astype(dtype).astype(np.float64) < radius * radius)[0][:max_neighbors]
            idx[i, : len(inside)] = inside + sa
    return torch.from_numpy(idx)


def fps_reference(
    xyz: Tensor, offset: Tensor | None = None, n: int | None = None, ratio: float | None = None, start: int = 0
) -> Tensor:
    """Sequential farthest point sampling per cloud, in the input dtype; ties go to the lowest index.

    ``start`` is the first sample's index inside each cloud. Returns global row indices, packed per cloud.
    """
    ranges = _ranges(offset, xyz.shape[0])
    lengths = torch.tensor([b - a for a, b in ranges])
    counts = sample_counts(lengths, n, ratio)
    out = []
    for (a, b), m in zip(ranges, counts.tolist(), strict=True):
        if m == 0:
            continue
        p = xyz[a:b].detach()
        mind = torch.full((b - a,), math.inf, dtype=p.dtype, device=p.device)
        cur = start
        sel = [cur]
        for _ in range(m - 1):
            d = ((p - p[cur]) ** 2).sum(-1)
            mind = torch.minimum(mind, d)
            cur = int(torch.argmax(mind))
            sel.append(cur)
        out.append(torch.tensor(sel, dtype=torch.long) + a)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def interpolate_reference(
    query: Tensor,
    support: Tensor,
    features: Tensor,
    k: int = 3,
    query_offset: Tensor | None = None,
    support_offset: Tensor | None = None,
    eps: float = 1e-8,
) -> Tensor:
    """Inverse-distance weighted mean of the k nearest support features: w_j = 1 / (||q - s_j|| + eps)."""
    idx, d2 = knn_reference(query, support, k, query_offset, support_offset)
    w = torch.where(idx >= 0, 1.0 / (d2.double().sqrt() + eps), torch.zeros_like(d2, dtype=torch.float64))
    w = w / w.sum(1, keepdim=True).clamp_min(1e-300)
    f = features.detach().double().cpu()
    gathered = f[idx.clamp_min(0)] * (idx >= 0).unsqueeze(-1)
    return (gathered * w.unsqueeze(-1)).sum(1).to(features.dtype)


def voxelize_reference(
    coord: Tensor, voxel_size: float, offset: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Dict-based voxelization: (voxels [V, 4] = (cloud, i, j, k) sorted lexicographically, inverse [N], counts [V])."""
    c = coord.detach().double().cpu().numpy()
    grid = np.floor(c / voxel_size).astype(np.int64)
    keys = []
    for b, (a, e) in enumerate(_ranges(offset, len(c))):
        keys.extend((b, *map(int, grid[i])) for i in range(a, e))
    uniq = sorted(set(keys))
    pos = {key: i for i, key in enumerate(uniq)}
    inverse = np.array([pos[key] for key in keys], dtype=np.int64)
    counts = np.bincount(inverse, minlength=len(uniq)) if len(uniq) else np.zeros(0, dtype=np.int64)
    vox = np.array(uniq, dtype=np.int64).reshape(-1, 4)
    return torch.from_numpy(vox), torch.from_numpy(inverse), torch.from_numpy(counts.astype(np.int64))


def kernel_offsets(kernel_size: int) -> list[tuple[int, int, int]]:
    """Kernel offsets in conv3d weight order (dx slowest): -(k//2)..k//2 for odd k, 0..k-1 for even k."""
    r = range(-(kernel_size // 2), kernel_size // 2 + 1) if kernel_size % 2 else range(kernel_size)
    return list(itertools.product(r, r, r))


def kernel_map_reference(
    in_coords: Tensor, out_coords: Tensor, kernel_size: int, stride: int = 1, dilation: int = 1
) -> list[tuple[Tensor, Tensor]]:
    """Per kernel offset d, all pairs (i, j) with in_coords[i] == (b_j, out_coords[j].xyz * stride + d * dilation).

    Coordinates are [*, 4] int (cloud, x, y, z) on each level's own grid. Pairs sorted by j.
    """
    table = {tuple(map(int, r)): i for i, r in enumerate(in_coords.tolist())}
    out = []
    oc = out_coords.tolist()
    for d in kernel_offsets(kernel_size):
        ii, jj = [], []
        for j, (b, x, y, z) in enumerate(oc):
            key = (b, x * stride + d[0] * dilation, y * stride + d[1] * dilation, z * stride + d[2] * dilation)
            i = table.get(key)
            if i is not None:
                ii.append(i)
                jj.append(j)
        out.append((torch.tensor(ii, dtype=torch.long), torch.tensor(jj, dtype=torch.long)))
    return out


# --- serialization reference (z-order / Hilbert) is appended below by its owner ---


def _morton_point(x: int, y: int, z: int, depth: int) -> int:
    """Bit-by-bit interleave with x the most significant axis: bit i of x -> 3i+2, y -> 3i+1, z -> 3i."""
    code = 0
    for i in range(depth):
        code |= ((x >> i) & 1) << (3 * i + 2)
        code |= ((y >> i) & 1) << (3 * i + 1)
        code |= ((z >> i) & 1) << (3 * i)
    return code


def _hilbert_point(axes: list[int], depth: int) -> int:
    """Skilling's AxestoTranspose (AIP Conf. Proc. 707, 2004), scalar textbook form, then bit interleave."""
    x = list(axes)
    n = len(x)
    q = 1 << (depth - 1)
    while q > 1:
        p = q - 1
        for i in range(n):
            if x[i] & q:
                x[0] ^= p
            else:
                t = (x[0] ^ x[i]) & p
                x[0] ^= t
                x[i] ^= t
        q >>= 1
    for i in range(1, n):
        x[i] ^= x[i - 1]
    t = 0
    q = 1 << (depth - 1)
    while q > 1:
        if x[n - 1] & q:
            t ^= q - 1
        q >>= 1
    for i in range(n):
        x[i] ^= t
    # the transposed index holds bit b of the Hilbert index digit (axis 0 first) in bit b of each x[i]
    code = 0
    for b in range(depth - 1, -1, -1):
        for i in range(n):
            code = (code << 1) | ((x[i] >> b) & 1)
    return code


def serialize_reference(
    grid_coord: Tensor, offset: Tensor | None = None, order: str = "z", depth: int = 16
) -> Tensor:
    """Per-point curve code: ``cloud << (3 * depth) | curve(x, y, z)``, "-trans" swaps x and y first."""
    g = grid_coord.detach().long().cpu().tolist()
    out = []
    for b, (a, e) in enumerate(_ranges(offset, len(g))):
        for x, y, z in g[a:e]:
            if order.endswith("-trans"):
                x, y = y, x
            c = _morton_point(x, y, z, depth) if order.startswith("z") else _hilbert_point([x, y, z], depth)
            out.append((b << (3 * depth)) | c)
    return torch.tensor(out, dtype=torch.long).reshape(-1)
