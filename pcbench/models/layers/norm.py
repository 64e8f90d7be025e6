"""Normalisation layers for packed point features with any number of leading dimensions."""

from __future__ import annotations

import torch
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
        out = super().forward(x.reshape(-1, shape[-1]))
        # A plain .view() output would make the in-place ReLU that follows an in-place op on a view, which
        # autograd handles by copying the whole tensor (CopySlices) in backward; _unsafe_view is the same
        # reshape without view tracking (what torch.matmul uses internally for the same reason).
        return torch.ops.aten._unsafe_view(out, shape)
