"""Exact k-nearest neighbours on packed batches."""

from __future__ import annotations

from torch import Tensor

from ._reference import knn_reference


def knn(
    query: Tensor,
    support: Tensor,
    k: int,
    query_offset: Tensor | None = None,
    support_offset: Tensor | None = None,
    *,
    method: str = "auto",
) -> tuple[Tensor, Tensor]:
    """k nearest support points of every query point, within the same cloud. (TEMPORARY: reference body.)"""
    idx, d2 = knn_reference(query, support, k, query_offset, support_offset)
    return idx.to(query.device), d2.to(query.device)
