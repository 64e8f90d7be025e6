"""Normalisation layers for packed point features with any number of leading dimensions."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["PointBatchNorm"]


class PointBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the last (channel) dimension of ``[..., C]`` tensors.

    Packed features ``[N, C]`` and grouped neighbourhoods ``[M, k, C]`` are normalised with statistics over
    every leading position, which equals ``BatchNorm1d`` on the channels-first ``[B, C, n(, k)]`` layout of the
    reference implementations. Parameter names and counts match ``nn.BatchNorm1d(C)``.
    """

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x [..., C]``; returns the same shape."""
        if x.dim() == 2:
            return super().forward(x)
        shape = x.shape
        return super().forward(x.reshape(-1, shape[-1])).reshape(shape)
