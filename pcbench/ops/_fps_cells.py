"""Cell engine of exact FPS: k-d leaves with bounding boxes, only leaves a new sample can reach are updated.

Why it is exact: a leaf's points can only get a smaller min-distance from a new sample c if the leaf's
current maximum min-distance ``cmax`` exceeds the squared distance from c to the leaf's bounding box
(a lower bound of every point's distance). That bound is evaluated in float64 with a relative and an
absolute margin covering the rounding of the input-dtype distance, so a skipped leaf is one whose
values the reference would also leave unchanged. Updated leaves compute exactly the reference
expression ``((p - c) ** 2).sum(-1)`` in the input dtype. Within a leaf points are stored in index
order and ties between leaves go to the lower index, so the argmax is the reference's argmax.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["build_cells", "fps_cells"]

# Points per k-d leaf: steps are dominated by per-op overhead, so leaves a few times larger than the
# late-stage sample spacing are cheap to update and keep the per-step leaf scan short.
LEAF_SIZE = 64


def build_cells(p: Tensor, starts: Tensor, lengths: Tensor, leaf_size: int = LEAF_SIZE) -> dict[str, Tensor]:
    """Bucket every cloud into k-d leaves of at most ``leaf_size`` points (median splits on the widest axis).

    Returns padded per-leaf tensors laid out as [B * Cmax] leaves (Cmax = most leaves of any cloud):
    ``pts [L, leaf_size, 3]`` (input dtype), ``row [L, leaf_size]`` (global row, points in index order),
    ``valid [L, leaf_size]``, ``lo``/``hi [L, 3]`` float64 boxes, ``real [L]`` and ``cloud [L]``.
    """
    dev = p.device
    num = p.shape[0]
    nclouds = lengths.numel()
    pd = p.double()
    order = torch.arange(num, device=dev)
    node = torch.repeat_interleave(torch.arange(nclouds, device=dev), lengths)
    pos = torch.arange(num, device=dev)
    while True:
        nnodes = int(node[-1]) + 1
        cnt = torch.bincount(node, minlength=nnodes)
        split = cnt > leaf_size
        if not bool(split.any()):
            break
        q = pd.index_select(0, order)
        idx3 = node[:, None].expand(-1, 3)
        lo = torch.full((nnodes, 3), math.inf, dtype=torch.float64, device=dev).scatter_reduce(0, idx3, q, "amin")
        hi = torch.full((nnodes, 3), -math.inf, dtype=torch.float64, device=dev).scatter_reduce(0, idx3, q, "amax")
        axis = (hi - lo).argmax(1)
        key = q.gather(1, axis.index_select(0, node)[:, None]).squeeze(1)
        o1 = torch.argsort(key, stable=True)
        o2 = torch.argsort(node.index_select(0, o1), stable=True)
        perm = o1.index_select(0, o2)
        order = order.index_select(0, perm)  # node stays sorted: the second sort was by node
        nstart = torch.cumsum(cnt, 0) - cnt
        rank = pos - nstart.index_select(0, node)
        bit = (rank >= (cnt // 2).index_select(0, node)) & split.index_select(0, node)
        node = torch.unique_consecutive(node * 2 + bit, return_inverse=True)[1]
    node = torch.unique_consecutive(node, return_inverse=True)[1]  # drop ids of empty clouds
    # points inside a leaf in index order: argmax's first-maximum rule then matches the reference
    order = order.index_select(0, torch.argsort(node * num + order))
    nleaves = int(node[-1]) + 1
    cnt = torch.bincount(node, minlength=nleaves)
    lstart = torch.cumsum(cnt, 0) - cnt
    lcloud = torch.repeat_interleave(torch.arange(nclouds, device=dev), lengths).index_select(
        0, order.index_select(0, lstart))
    per_cloud = torch.bincount(lcloud, minlength=nclouds)
    cmax_cells = int(per_cloud.max())
    cstart = torch.cumsum(per_cloud, 0) - per_cloud
    flat = lcloud * cmax_cells + (torch.arange(nleaves, device=dev) - cstart.index_select(0, lcloud))
    ncells = nclouds * cmax_cells
    slot = pos - lstart.index_select(0, node)
    cell_of_point = flat.index_select(0, node)
    lin = cell_of_point * leaf_size + slot
    pts = torch.zeros(ncells * leaf_size, 3, dtype=p.dtype, device=dev)
    pts.index_copy_(0, lin, p.index_select(0, order))
    row = torch.zeros(ncells * leaf_size, dtype=torch.long, device=dev)
    row.index_copy_(0, lin, order)
    valid = torch.zeros(ncells * leaf_size, dtype=torch.bool, device=dev)
    valid[lin] = True
    q = pd.index_select(0, order)
    idx3 = cell_of_point[:, None].expand(-1, 3)
    lo = torch.zeros(ncells, 3, dtype=torch.float64, device=dev).scatter_reduce(0, idx3, q, "amin", include_self=False)
    hi = torch.zeros(ncells, 3, dtype=torch.float64, device=dev).scatter_reduce(0, idx3, q, "amax", include_self=False)
    real = torch.zeros(ncells, dtype=torch.bool, device=dev)
    real[flat] = True
    return {
        "pts": pts.view(ncells, leaf_size, 3),
        "row": row.view(ncells, leaf_size),
        "valid": valid.view(ncells, leaf_size),
        "lo": lo,
        "hi": hi,
        "real": real,
        "cmax_cells": torch.tensor(cmax_cells),
    }


def _margins(dtype: torch.dtype) -> tuple[float, float]:
    """(relative, absolute) slack between the float64 box bound and a distance rounded in ``dtype``."""
    fi = torch.finfo(dtype)
    # 3 squares, 2 additions and the subtraction each round once (<= 1/2 ulp); subnormal squares may
    # lose up to one smallest subnormal each. Margins are generous: they only cost a few extra leaves.
    return 16.0 * fi.eps, 16.0 * fi.smallest_normal


def fps_cells(p: Tensor, starts: Tensor, lengths: Tensor, counts: Tensor, start: int,
              leaf_size: int = LEAF_SIZE) -> Tensor:
    """Exact FPS of every cloud with the leaf engine: returns [B, max(counts)] global rows (row b valid
    up to counts[b])."""
    dev = p.device
    nclouds = lengths.numel()
    steps = int(counts.max())
    cells = build_cells(p, starts, lengths, leaf_size)
    pts, row = cells["pts"], cells["row"]
    ncm = int(cells["cmax_cells"])
    ncells = pts.shape[0]
    lo3 = cells["lo"].view(nclouds, ncm, 3)
    hi3 = cells["hi"].view(nclouds, ncm, 3)
    mind = torch.full((ncells, leaf_size), math.inf, dtype=p.dtype, device=dev)
    mind.masked_fill_(~cells["valid"], -math.inf)
    rel, absm = _margins(p.dtype)
    real = cells["real"].view(nclouds, ncm)
    cmax = torch.full((nclouds, ncm), math.inf, dtype=torch.float64, device=dev).masked_fill_(~real, -math.inf)
    sthr = cmax.clone()  # sqrt of the update threshold (box distance is compared unsquared)
    carg = row[:, 0].clone().view(nclouds, ncm)  # any valid row: padding leaves never win while one is real
    cmax_f, sthr_f, carg_f, row_f = cmax.view(-1), sthr.view(-1), carg.view(-1), row.view(-1)
    cell_cloud = torch.arange(nclouds, device=dev).repeat_interleave(ncm)
    big = torch.iinfo(torch.long).max
    done_at: dict[int, list[int]] = {}
    for b, c in enumerate(counts.tolist()):
        done_at.setdefault(c, []).append(b)
    cur = (starts + start).clamp_max(max(p.shape[0] - 1, 0))
    out = [cur]
    for t in range(1, steps):
        if t in done_at:  # finished clouds: no leaf of theirs is updated any more
            fin = torch.tensor(done_at[t], device=dev)
            cmax.index_fill_(0, fin, -math.inf)
            sthr.index_fill_(0, fin, -math.inf)
        c = p.index_select(0, cur)
        cd = c.double()[:, None, :]
        gap = torch.maximum(lo3 - cd, cd - hi3).clamp_min_(0.0)
        need = torch.linalg.vector_norm(gap, dim=-1) <= sthr
        sel = need.view(-1).nonzero().squeeze(1)
        cc = c.index_select(0, cell_cloud.index_select(0, sel))
        d = ((pts.index_select(0, sel) - cc[:, None, :]) ** 2).sum(-1)
        m = torch.minimum(mind.index_select(0, sel), d)
        mind.index_copy_(0, sel, m)
        vv, ai = m.max(1)
        vd = vv.double()
        cmax_f.index_copy_(0, sel, vd)
        sthr_f.index_copy_(0, sel, vd.add_(absm).mul_(1.0 + 2.0 * rel).sqrt_())
        carg_f.index_copy_(0, sel, row_f.index_select(0, ai.add_(sel * leaf_size)))
        v = cmax.amax(1, keepdim=True)
        cur = torch.where(cmax == v, carg, big).amin(1)
        out.append(cur)
    return torch.stack(out, 1)
