"""Kernel maps for pure-torch sparse convolution."""

from __future__ import annotations

from torch import Tensor

from ._reference import kernel_map_reference


def kernel_map(
    in_coords: Tensor, out_coords: Tensor, kernel_size: int, stride: int = 1, dilation: int = 1
) -> list[tuple[Tensor, Tensor]]:
    """Per kernel offset (in_idx, out_idx) pairs (TEMPORARY: reference body)."""
    return [(i.to(in_coords.device), o.to(in_coords.device)) for i, o in
            kernel_map_reference(in_coords, out_coords, kernel_size, stride, dilation)]
