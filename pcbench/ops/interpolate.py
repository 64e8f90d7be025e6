"""Inverse-distance feature propagation (PointNet++ feature propagation / Point Transformer transition up)."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from ._dispatch import on_gpu_path
from .batch import check_coords, check_same_device, resolve_offset
from .knn import knn

__all__ = ["interpolate"]

EPS = 1e-8


def interpolate(
    query: Tensor,
    support: Tensor,
    features: Tensor,
    k: int = 3,
    query_offset: Tensor | None = None,
    support_offset: Tensor | None = None,
    *,
    validate: bool = True,
) -> Tensor:
    """Inverse-distance weighted mean of the features of the ``k`` nearest support points of each query.

    query: [M, 3], support: [N, 3] (same dtype), features: [N, C]; offsets pair query cloud b with
    support cloud b. Returns [M, C] in ``features.dtype``: ``out[i] = sum_j w_ij features[idx[i, j]]``
    with ``w_ij = 1 / (||query[i] - support[idx[i, j]]|| + 1e-8)`` normalised over the found neighbours
    (``idx`` from ``knn``). Missing neighbours (k > cloud size) weigh 0; a query whose support cloud is
    empty gets zeros. Differentiable w.r.t. ``features`` (not the coordinates). ``validate=False`` skips the
    finiteness and offset value checks (host syncs) for inputs already checked, e.g. from a ``PointBatch``.
    """
    check_coords("query", query, finite=validate)
    check_coords("support", support, finite=validate)
    if not isinstance(features, Tensor) or features.dim() != 2 or not features.is_floating_point():
        desc = f"shape {list(features.shape)} dtype {features.dtype}" if isinstance(features, Tensor) else type(
            features).__name__
        raise ValueError(f"features must be a floating [N, C] tensor, got {desc}")
    if features.shape[0] != support.shape[0]:
        raise ValueError(
            f"features has {features.shape[0]} rows but support has {support.shape[0]}; pass one feature row "
            "per support point"
        )
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be a positive int number of neighbours, got {k!r}; the usual value is 3")
    if query.dtype != support.dtype:
        raise ValueError(
            f"query is {query.dtype} but support is {support.dtype}; convert one with .to(other.dtype)"
        )
    check_same_device(query=query, support=support, features=features)
    qo = resolve_offset("query_offset", query_offset, query.shape[0], query.device, validate)
    so = resolve_offset("support_offset", support_offset, support.shape[0], support.device, validate)
    if qo.numel() != so.numel():
        raise ValueError(
            f"query_offset has {qo.numel()} clouds but support_offset has {so.numel()}; pass one entry per "
            "cloud in both (empty clouds included)"
        )
    out = features.new_zeros(query.shape[0], features.shape[1])
    if support.shape[0] == 0 or query.shape[0] == 0:
        return out
    idx, d2 = knn(query.detach(), support.detach(), int(k), qo, so, validate=False)  # checked above
    # weights in at least float32 so half-precision features still get well-normalised weights
    wdt = torch.promote_types(features.dtype, torch.float32)
    found = idx >= 0
    src = idx.clamp_min(0)
    d = d2.to(wdt).sqrt()
    # dist2 saturates to inf in the input dtype (float32 beyond ~1.8e19 apart): such rows take their distances in
    # float64 from the coordinates, so clouds at any finite scale get their true weights, not zeros.
    ok = torch.isfinite(d).logical_or_(~found)
    if on_gpu_path(d):
        # no host read: the float64 distances of every row (k gathers of [M, 3]) and a per-row choice
        ok = ok.all(1, keepdim=True)
        w = torch.where(ok, _idw(d, found).to(features.dtype), _idw(_dist64(query, support, src), found).to(
            features.dtype))
    elif bool(ok.all()):  # one host read, no boolean-mask gather
        w = _idw(d, found).to(features.dtype)
    else:
        w = _idw(_dist64(query, support, src), found).to(features.dtype)
    for j in range(idx.shape[1]):  # k gathers of [M, C]: no [M, k, C] temporary
        out = out.addcmul(features.index_select(0, src[:, j]), w[:, j : j + 1])
    return out


def _dist64(query: Tensor, support: Tensor, src: Tensor) -> Tensor:
    """float64 distances [M, k] from each query to its gathered support rows ``src`` [M, k]."""
    diff = query.detach().double()[:, None, :] - support.detach().double()[src]
    return torch.linalg.vector_norm(diff, dim=-1)


def _idw(d: Tensor, found: Tensor) -> Tensor:
    """Normalised inverse-distance weights [M, k] in ``d``'s dtype (0 where no neighbour was found)."""
    w = torch.where(found, 1.0 / (d + EPS), torch.zeros((), dtype=d.dtype, device=d.device))
    return w / w.sum(1, keepdim=True).clamp_min(torch.finfo(d.dtype).tiny)
