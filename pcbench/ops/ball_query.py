"""Radius search with a neighbour cap on packed batches."""

from __future__ import annotations

from torch import Tensor

from ._reference import ball_query_reference


def ball_query(
    query: Tensor,
    support: Tensor,
    radius: float,
    max_neighbors: int,
    query_offset: Tensor | None = None,
    support_offset: Tensor | None = None,
) -> Tensor:
    """Support neighbours within ``radius`` (TEMPORARY: reference body)."""
    return ball_query_reference(query, support, radius, max_neighbors, query_offset, support_offset).to(query.device)
