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

__all__ = ["build_cells", "fps_cells", "fps_cells_speculative"]

# Points per k-d leaf (measured best at 65k-262k points): iterations are dominated by per-op overhead, so
# leaves many times larger than the late-stage sample spacing are cheap and keep the per-iteration leaf scan short.
LEAF_SIZE = 128


def build_cells(p: Tensor, starts: Tensor, lengths: Tensor, leaf_size: int = LEAF_SIZE) -> dict[str, Tensor]:
    """Bucket every cloud into k-d leaves of at most ``leaf_size`` points (median splits on the widest axis).

    Returns padded per-leaf tensors laid out as [B * Cmax] leaves (Cmax = most leaves of any cloud):
    ``pts [L, leaf_size, 3]`` (input dtype), ``row [L, leaf_size]`` (global row, points in index order),
    ``valid [L, leaf_size]``, ``lo``/``hi [L, 3]`` float64 boxes, ``real [L]`` (leaf holds points) and
    ``cmax_cells`` (Cmax as a 0-d tensor).
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
        ext = hi - lo
        axis = ext.argmax(1)
        # one int64 sort by (node, coordinate quantised to 2**20 levels along the node's widest axis);
        # quantisation ties only make a split slightly uneven, never wrong
        a_node = axis.index_select(0, node)
        lo_a = lo.gather(1, axis[:, None]).squeeze(1).index_select(0, node)
        ext_a = ext.gather(1, axis[:, None]).squeeze(1).clamp_min(1e-300).index_select(0, node)
        frac = (q.gather(1, a_node[:, None]).squeeze(1) - lo_a) / ext_a
        key = node * (1 << 21) + (frac * ((1 << 20) - 1)).long()
        perm = torch.argsort(key)
        order = order.index_select(0, perm)  # node stays sorted: the key sorts by node first
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
    """Exact FPS with the leaf engine, one sample per cloud per iteration (any dtype, float64 included).

    Returns [B, max(counts)] global rows (row b valid up to counts[b]).
    """
    dev = p.device
    nclouds = lengths.numel()
    steps = int(counts.max())
    cells = build_cells(p, starts, lengths, leaf_size)
    pts = cells["pts"].transpose(1, 2).contiguous()  # [L, 3, leaf]: long axis innermost
    row = cells["row"]
    ncm = int(cells["cmax_cells"])
    ncells = pts.shape[0]
    lo = cells["lo"].view(nclouds, ncm, 3).permute(0, 2, 1).contiguous()  # [B, 3, Cmax]
    hi = cells["hi"].view(nclouds, ncm, 3).permute(0, 2, 1).contiguous()
    mind = torch.full((ncells, leaf_size), math.inf, dtype=p.dtype, device=dev)
    mind.masked_fill_(~cells["valid"], -math.inf)
    rel, absm = _margins(p.dtype)
    real = cells["real"].view(nclouds, ncm)
    cmax = torch.full((nclouds, ncm), math.inf, dtype=torch.float64, device=dev).masked_fill_(~real, -math.inf)
    thr = cmax.clone()  # update threshold on the squared box distance
    carg = row[:, 0].clone().view(nclouds, ncm)  # any valid row: padding leaves never win while one is real
    cmax_f, thr_f, carg_f, row_f = cmax.view(-1), thr.view(-1), carg.view(-1), row.view(-1)
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
            thr.index_fill_(0, fin, -math.inf)
        c = p.index_select(0, cur)  # [B, 3]
        cd = c.double()[:, :, None]
        gap = torch.maximum(lo - cd, cd - hi).clamp_min_(0.0)
        sel = (gap.mul_(gap).sum(1) <= thr).view(-1).nonzero().squeeze(1)
        cc = c.index_select(0, cell_cloud.index_select(0, sel))[:, :, None]  # [A, 3, 1]
        d = pts.index_select(0, sel) - cc
        d = d.mul_(d).sum(1)  # [A, leaf]: the reference's ((p - c) ** 2).sum(-1), same rounding
        m = torch.minimum(mind.index_select(0, sel), d)
        mind.index_copy_(0, sel, m)
        vv, ai = m.max(1)  # first maximum: points sit in index order inside a leaf
        vd = vv.double()
        cmax_f.index_copy_(0, sel, vd)
        thr_f.index_copy_(0, sel, vd.add_(absm).mul_(1.0 + 2.0 * rel))
        carg_f.index_copy_(0, sel, row_f.index_select(0, ai.add_(sel * leaf_size)))
        v = cmax.amax(1, keepdim=True)
        cur = torch.where(cmax == v, carg, big).amin(1)  # ties between leaves: lowest row
        out.append(cur)
    return torch.stack(out, 1)


# Candidates tried per cloud and iteration by the speculative engine.
SPECULATE = 8
_LOW = 0xFFFFFFFF
_PAD_KEY = -(2**63) + _LOW  # below every real leaf key; decodes to row 0, a valid row


def _pack(value: Tensor, rowkey: Tensor) -> Tensor:
    """Order-preserving int64 key of (value desc, row asc): float32 bits high, ``_LOW - row`` low.

    Exact for every dtype that float32 represents exactly (float16, bfloat16, float32); values are >= 0.
    """
    return value.float().view(torch.int32).long().mul_(1 << 32).add_(rowkey)


def _unpack_value(key: Tensor) -> Tensor:
    """float64 value of packed keys (inverse of `_pack` on the high half)."""
    return (key >> 32).int().view(torch.float32).double()


def fps_cells_speculative(p: Tensor, starts: Tensor, lengths: Tensor, counts: Tensor, start: int,
                          leaf_size: int = LEAF_SIZE, speculate: int = SPECULATE,
                          stats: dict[str, int] | None = None) -> Tensor:
    """Exact FPS with the leaf engine, taking up to ``speculate`` samples per cloud per iteration.

    Why several at once stays exact: the top leaf keys a_1 > a_2 > ... (key = value, then lowest row)
    are tried in order. For every leaf the update could touch, the min-distance after each prefix
    a_1..a_j is computed (cumulative minimum over the candidates), so the true maximum after a_1..a_{j-1}
    is known; a_j is accepted iff it equals that maximum, i.e. iff the reference would pick it next.
    Leaves outside the update set are unchanged and rank below every candidate. a_1 is always accepted.
    Needs a float32-representable dtype (keys pack float32 bits); float64 uses `fps_cells`.
    ``stats``, when given, receives ``iterations`` and ``leaf_updates`` (for tests and tuning).
    """
    dev = p.device
    nclouds = lengths.numel()
    kk = speculate
    cells = build_cells(p, starts, lengths, leaf_size)
    # structure-of-arrays layouts keep the long axis innermost, so the broadcast ops vectorise
    pts = cells["pts"].transpose(1, 2).contiguous()  # [L, 3, leaf]
    row = cells["row"]
    ncm = int(cells["cmax_cells"])
    ncells = pts.shape[0]
    lo = cells["lo"].view(nclouds, ncm, 3).permute(0, 2, 1).contiguous()[:, :, None, :]  # [B, 3, 1, Cmax]
    hi = cells["hi"].view(nclouds, ncm, 3).permute(0, 2, 1).contiguous()[:, :, None, :]
    mind = torch.full((ncells, leaf_size), math.inf, dtype=p.dtype, device=dev)
    mind.masked_fill_(~cells["valid"], -math.inf)
    rowkey = _LOW - row  # [L, leaf]
    rel, absm = _margins(p.dtype)
    real = cells["real"].view(nclouds, ncm)
    thr = torch.full((nclouds, ncm), math.inf, dtype=torch.float64, device=dev).masked_fill_(~real, -math.inf)
    key = torch.full((nclouds, ncm), _PAD_KEY, dtype=torch.long, device=dev)
    key_f, thr_f = key.view(-1), thr.view(-1)
    cell_cloud = torch.arange(nclouds, device=dev).repeat_interleave(ncm)
    counts = counts.to(dev)
    steps = int(counts.max())
    out = torch.zeros(nclouds, steps + kk, dtype=torch.long, device=dev)
    taken = torch.zeros(nclouds, dtype=torch.long, device=dev)
    spread = torch.arange(kk, device=dev)
    # first iteration: the given start as the only candidate
    cand = (starts + start).clamp_max(max(p.shape[0] - 1, 0))[:, None].to(dev)
    cand_key = None
    iterations = leaf_updates = 0
    while True:
        iterations += 1
        k_now = cand.shape[1]
        c = p.index_select(0, cand.view(-1)).view(nclouds, k_now, 3).transpose(1, 2)  # [B, 3, k]
        cd = c.double()[:, :, :, None]  # [B, 3, k, 1]
        gap = torch.maximum(lo - cd, cd - hi).clamp_min_(0.0)  # [B, 3, k, Cmax]
        lb = gap.mul_(gap).sum(1).amin(1)  # squared box distance of the nearest candidate [B, Cmax]
        sel = (lb <= thr).view(-1).nonzero().squeeze(1)
        leaf_updates += sel.numel()
        ucloud = cell_cloud.index_select(0, sel)
        cc = c.index_select(0, ucloud)[:, :, :, None]  # [A, 3, k, 1]
        d = pts.index_select(0, sel)[:, :, None, :] - cc
        d = d.mul_(d).sum(1)  # [A, k, leaf]: the reference's ((p - c) ** 2).sum(-1), same rounding
        m = d  # min-distance after each prefix of candidates (k - 1 slice minima beat cummin here)
        torch.minimum(m[:, 0], mind.index_select(0, sel), out=m[:, 0])
        for j in range(1, k_now):
            torch.minimum(m[:, j - 1], m[:, j], out=m[:, j])
        # per-point keys: one amax gives each leaf's maximum after each prefix and its lowest row
        keys = _pack(m, rowkey.index_select(0, sel)[:, None, :]).amax(2)  # [A, k]
        remaining = counts - taken
        if cand_key is None:
            accept = torch.ones(nclouds, dtype=torch.long, device=dev)
        else:
            best = torch.full((nclouds, k_now), _PAD_KEY, dtype=torch.long, device=dev)
            best.scatter_reduce_(0, ucloud[:, None].expand(-1, k_now), keys, "amax")
            ok = best[:, :-1] == cand_key[:, 1:]  # a_j is the maximum once a_1..a_{j-1} are applied
            accept = 1 + torch.cumprod(ok.long(), 1).sum(1)
        accept = torch.minimum(accept, remaining.clamp_min(0))
        out.scatter_(1, taken[:, None] + spread[:k_now], cand)
        taken += accept
        jj = (accept - 1).clamp_min_(0).index_select(0, ucloud)  # prefix to keep per updated leaf
        mind.index_copy_(0, sel, m.gather(1, jj[:, None, None].expand(-1, 1, leaf_size)).squeeze(1))
        key_f.index_copy_(0, sel, keys.gather(1, jj[:, None]).squeeze(1))  # v below reads these keys
        v = _unpack_value(key_f.index_select(0, sel))
        thr_f.index_copy_(0, sel, v.add_(absm).mul_(1.0 + 2.0 * rel))
        done = (taken >= counts)[:, None]
        if bool(done.all()):
            break
        key.masked_fill_(done, _PAD_KEY)  # finished clouds: no leaf of theirs is updated any more
        thr.masked_fill_(done, -math.inf)
        cand_key = key.topk(min(kk, ncm), dim=1).values
        cand = _LOW - (cand_key & _LOW)
    if stats is not None:
        stats.update(iterations=iterations, leaf_updates=leaf_updates)
    return out[:, :steps]
