"""Normalisation layers for packed point features with any number of leading dimensions."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["BatchNormReLUMax", "PointBatchNorm"]


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


class BatchNormReLUMax(nn.BatchNorm1d):
    """``ReLU(BatchNorm(h)).amax(1)`` for grouped ``h [M, k, C]`` -> ``[M, C]``, normalising only the pooled rows.

    BatchNorm + ReLU is monotonic per channel (increasing where ``weight / std >= 0``, else decreasing), so the
    max over the k neighbours commutes with it: pool ``max_k h`` (or ``min_k h`` for negative scales) first,
    then normalise M rows instead of M*k. Statistics (training) still come from all M*k values, and running
    statistics are updated exactly as ``nn.BatchNorm1d`` does, so parameters and state dicts are the same.
    """

    def forward(self, h: Tensor) -> Tensor:
        """Pooled, normalised, rectified features [M, C] from grouped pre-normalisation features [M, k, C]."""
        c = h.shape[-1]
        if self.training or not self.track_running_stats:
            flat = h.reshape(-1, c)
            stats_in = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
            var, mean = torch.var_mean(stats_in, dim=0, correction=0)
            if self.training and self.track_running_stats:
                n = flat.shape[0]
                with torch.no_grad():
                    self.num_batches_tracked.add_(1)
                    m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                    self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                    unbiased = var.detach() * (n / max(n - 1, 1))
                    self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        else:
            mean, var = self.running_mean, self.running_var
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        pooled = h.amax(1)
        if bool((scale < 0).any()):
            pooled = torch.where(scale >= 0, pooled, h.amin(1))
        return torch.relu(torch.addcmul(shift.to(h.dtype), pooled, scale.to(h.dtype)))
