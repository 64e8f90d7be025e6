"""Exact k-nearest neighbours on packed batches."""

from __future__ import annotations

import torch
from torch import Tensor

from .batch import offset2start, resolve_offset


def knn(
    query: Tensor,
    support: Tensor,
    k: int,
    query_offset: Tensor | None = None,
    support_offset: Tensor | None = None,
    *,
    method: str = "auto",
) -> tuple[Tensor, Tensor]:
    """k nearest support points of every query point, within the same cloud.

    TEMPORARY body: chunked brute force per cloud (exact, bounded memory, O(N^2) time).
    """
    qo = resolve_offset("query_offset", query_offset, query.shape[0], query.device)
    so = resolve_offset("support_offset", support_offset, support.shape[0], support.device)
    idx = torch.full((query.shape[0], k), -1, dtype=torch.long, device=query.device)
    d2 = torch.full((query.shape[0], k), float("inf"), dtype=query.dtype, device=query.device)
    for qa, qb, sa, sb in zip(offset2start(qo).tolist(), qo.tolist(), offset2start(so).tolist(), so.tolist(),
                              strict=True):
        if qb == qa or sb == sa:
            continue
        kk = min(k, sb - sa)
        s = support[sa:sb]
        chunk = max(1, (1 << 22) // (sb - sa))
        for c in range(qa, qb, chunk):
            e = min(qb, c + chunk)
            dd = ((query[c:e, None, :] - s[None]) ** 2).sum(-1)
            v, i = torch.topk(dd, kk, dim=1, largest=False, sorted=True)
            idx[c:e, :kk] = i + sa
            d2[c:e, :kk] = v
    return idx, d2
