"""Padded brute force over whole clouds: the GPU path of knn and ball_query, sized by one host read.

Cloud b's queries ``[Lq]`` are compared with all of its support points ``[Ls]`` (Lq, Ls = the largest
query / support cloud), a few clouds per block. Squared distances are summed x, y, z in float64 (the
references' arithmetic), so selection and the returned ``dist2`` are exact without a second pass, and no
step needs the data on the host except the two cloud sizes that shape the blocks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .batch import length_bounds, offset2lengths

__all__ = ["block_clouds", "dense_dist2", "dense_select", "max_lengths", "padded_rows"]


def max_lengths(qo: Tensor, so: Tensor) -> tuple[int, int]:
    """(largest query cloud, largest support cloud), through ``batch.length_bounds`` (read once per offset)."""
    (_, lq), (_, ls) = length_bounds(qo, so)
    return lq, ls


def block_clouds(num: int, lq: int, ls: int, budget: int) -> list[tuple[int, int]]:
    """Ranges ``[c0, c1)`` of clouds whose padded ``[clouds, lq, ls]`` blocks stay within ``budget`` elements."""
    per = max(1, budget // max(1, lq * ls))
    return [(c0, min(num, c0 + per)) for c0 in range(0, num, per)]


def padded_rows(off: Tensor, c0: int, c1: int, width: int, n: int) -> tuple[Tensor, Tensor]:
    """Rows ``[c1 - c0, width]`` of clouds c0..c1-1 of a packed tensor of ``n`` rows, and their validity.

    Padding slots repeat the cloud's start row, clamped to ``n - 1`` (an empty last cloud starts at ``n``):
    any real row will do, the slots are masked.
    """
    lengths = offset2lengths(off)[c0:c1]
    start = off[c0:c1] - lengths
    j = torch.arange(width, device=off.device)
    valid = j < lengths[:, None]
    rows = torch.where(valid, start[:, None] + j, start[:, None]).clamp_max_(max(n - 1, 0))
    return rows, valid


def dense_dist2(q64: Tensor, s64: Tensor, qrow: Tensor, srow: Tensor, svalid: Tensor) -> Tensor:
    """float64 squared distances ``[c, Lq, Ls]`` summed x, y, z (inf at padded support slots)."""
    qp = q64.index_select(0, qrow.reshape(-1)).view(*qrow.shape, 3)
    sp = s64.index_select(0, srow.reshape(-1)).view(*srow.shape, 3)
    d2 = None
    for a in range(3):  # x, y, z in turn: the summation order of the references
        diff = qp[:, :, None, a] - sp[:, None, :, a]
        sq = diff.mul_(diff)
        d2 = sq if d2 is None else d2.add_(sq)
    return d2.masked_fill_(~svalid[:, None, :], math.inf)


def dense_select(
    q64: Tensor,
    s64: Tensor,
    qo: Tensor,
    so: Tensor,
    k: int,
    budget: int,
    ball: tuple[Tensor, torch.dtype, str] | None = None,
    sizes: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Per query its ``k`` nearest support points of the same cloud (``idx [M, k]``, float64 ``dist2 [M, k]``).

    With ``ball = (radius2 [B] float64, dtype, order)`` only points whose dist2, rounded to ``dtype``, is
    ``< radius2`` of their cloud qualify, and ``order="index"`` keeps the ``k`` lowest rows (ascending)
    instead of the nearest. Missing neighbours are ``idx = -1``, ``dist2 = inf``. ``q64`` / ``s64`` are the
    float64 points ``[M, 3]`` / ``[N, 3]``; blocks hold at most ``budget`` distance entries. ``sizes``:
    ``max_lengths(qo, so)`` where the caller has read it already.
    """
    m, n = q64.shape[0], s64.shape[0]
    dev = q64.device
    idx = torch.full((m + 1, k), -1, dtype=torch.long, device=dev)  # row m: sink for padded query slots
    d2 = torch.full((m + 1, k), math.inf, dtype=torch.float64, device=dev)
    if m == 0 or n == 0:
        return idx[:m], d2[:m]
    lq, ls = max_lengths(qo, so) if sizes is None else sizes
    kk = min(k, ls)
    big = torch.iinfo(torch.int64).max
    for c0, c1 in block_clouds(qo.numel(), lq, ls, budget):
        qrow, qvalid = padded_rows(qo, c0, c1, lq, m)
        srow, svalid = padded_rows(so, c0, c1, ls, n)
        dd = dense_dist2(q64, s64, qrow, srow, svalid)  # [c, Lq, Ls]
        if ball is None:
            val, arg = torch.topk(dd, kk, dim=2, largest=False, sorted=True)
        else:
            radius2, dtype, order = ball
            inside = dd.to(dtype).double() < radius2[c0:c1, None, None]
            if order == "index":
                key = torch.where(inside, srow[:, None, :], big)
                first, arg = torch.topk(key, kk, dim=2, largest=False, sorted=True)
                val = torch.where(first == big, math.inf, dd.gather(2, arg))
            else:
                val, arg = torch.topk(dd.masked_fill_(~inside, math.inf), kk, dim=2, largest=False, sorted=True)
        found = torch.isfinite(val)
        rows = srow[:, None, :].expand(-1, lq, -1).gather(2, arg)
        target = torch.where(qvalid, qrow, m).view(-1)
        idx[:, :kk].index_copy_(0, target, torch.where(found, rows, -1).view(-1, kk))
        d2[:, :kk].index_copy_(0, target, val.view(-1, kk))
    return idx[:m], d2[:m]
