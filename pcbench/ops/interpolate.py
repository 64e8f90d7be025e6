"""Inverse-distance feature propagation (PointNet++ / Point Transformer transition up)."""

from __future__ import annotations

from torch import Tensor

from ._reference import interpolate_reference


def interpolate(
    query: Tensor,
    support: Tensor,
    features: Tensor,
    k: int = 3,
    query_offset: Tensor | None = None,
    support_offset: Tensor | None = None,
) -> Tensor:
    """IDW interpolation of support features at query points (TEMPORARY: reference body, no autograd)."""
    return interpolate_reference(query, support, features, k, query_offset, support_offset).to(features.device)
