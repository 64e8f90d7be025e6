"""Gathering neighbour features by index, with -1 (missing neighbour) gathering zeros."""

from __future__ import annotations

import torch
from torch import Tensor

from .batch import check_same_device


def group(features: Tensor, idx: Tensor) -> Tensor:
    """Gather ``features [N, C]`` at ``idx [M, k]`` -> ``[M, k, C]``; rows where ``idx == -1`` are zero.

    If ``idx[i, j] = m >= 0`` then ``out[i, j] = features[m]``. Differentiable w.r.t. ``features``
    (gradients of repeated indices accumulate).
    """
    if features.dim() != 2:
        raise ValueError(f"features must be [N, C], got shape {list(features.shape)}; flatten extra dims first")
    if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"idx must be an integer [M, k] tensor, got shape {list(idx.shape)} dtype {idx.dtype}; "
            "use the idx from knn/ball_query (int64) or idx.long().view(M, k)"
        )
    check_same_device(features=features, idx=idx)
    if idx.numel() and (int(idx.max()) >= features.shape[0] or int(idx.min()) < -1):
        raise ValueError(
            f"idx values must be in [-1, {features.shape[0] - 1}] (rows of features), "
            f"got [{int(idx.min())}, {int(idx.max())}]; idx must index these features (-1 = missing)"
        )
    valid = idx >= 0
    out = features[idx.clamp_min(0).long()]
    return out * valid.unsqueeze(-1).to(out.dtype)


def group_relative(
    query: Tensor, support: Tensor, idx: Tensor, features: Tensor | None = None, with_xyz: bool = True
) -> Tensor:
    """Neighbour offsets ``support[idx] - query`` [M, k, 3], optionally concatenated before features [M, k, 3 + C].

    Missing neighbours (-1) give zeros in both the offsets and the features.
    """
    if query.shape[0] != idx.shape[0]:
        raise ValueError(
            f"query has {query.shape[0]} rows but idx has {idx.shape[0]}; pass one idx row per query point"
        )
    rel = group(support, idx) - query.unsqueeze(1) * (idx >= 0).unsqueeze(-1).to(query.dtype)
    if features is None:
        return rel
    feats = group(features, idx)
    return torch.cat([rel, feats], dim=-1) if with_xyz else feats
