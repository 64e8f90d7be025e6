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


class _PooledBNFunction(torch.autograd.Function):
    """max_k ReLU(BN(h)) with a hand-written backward: one dense pass over h plus a scatter at the pooled rows,
    instead of autograd's chain of BatchNorm, ReLU and max-pool backward passes over the whole [M, k, C]."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, invstd: Tensor,
                batch_stats: bool) -> Tensor:
        scale = weight * invstd
        shift = bias - mean * scale
        pooled, arg = h.max(1)
        if bool((scale < 0).any()):  # decreasing channels: the max of the output comes from the min of h
            low, arg_low = h.min(1)
            neg = scale < 0
            pooled, arg = torch.where(neg, low, pooled), torch.where(neg, arg_low, arg)
        z = pooled * scale + shift
        ctx.save_for_backward(h, arg, weight, mean, invstd, z)
        ctx.batch_stats = batch_stats
        return torch.relu(z)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN205 - autograd signature
        h, arg, weight, mean, invstd, z = ctx.saved_tensors
        gz = grad * (z > 0).to(grad.dtype)  # [M, C]
        pooled_hat = (h.gather(1, arg.unsqueeze(1)).squeeze(1) - mean) * invstd
        g_bias = gz.sum(0)
        g_weight = (gz * pooled_hat).sum(0)
        g_h = None
        if ctx.needs_input_grad[0]:
            wi = weight * invstd
            if ctx.batch_stats:  # the statistics depend on every entry of h: dense BN-backward term
                r = h.shape[0] * h.shape[1]
                b = -(wi * invstd / r) * g_weight
                a = -(wi / r) * g_bias - b * mean
                g_h = torch.addcmul(a.to(h.dtype), h, b.to(h.dtype))
            else:
                g_h = torch.zeros_like(h)
            g_h.scatter_add_(1, arg.unsqueeze(1), (gz * wi).unsqueeze(1).to(h.dtype))
        return g_h, g_weight, g_bias, None, None, None


class BatchNormReLUMax(nn.BatchNorm1d):
    """``ReLU(BatchNorm(h)).amax(1)`` for grouped ``h [M, k, C]`` -> ``[M, C]``, normalising only the pooled rows.

    BatchNorm + ReLU is monotonic per channel (increasing where ``weight / std >= 0``, else decreasing), so the
    max over the k neighbours commutes with it: pool ``max_k h`` (or ``min_k h`` for negative scales) first,
    then normalise M rows instead of M*k. Statistics (training) still come from all M*k values, running
    statistics are updated exactly as ``nn.BatchNorm1d`` does (same parameters and state dict), and the
    backward pass is written out (one dense pass plus a scatter at the pooled entries).
    """

    def forward(self, h: Tensor) -> Tensor:
        """Pooled, normalised, rectified features [M, C] from grouped pre-normalisation features [M, k, C]."""
        c = h.shape[-1]
        low_precision = h.dtype not in (torch.float32, torch.float64)
        x = h.float() if low_precision else h
        batch_stats = self.training or not self.track_running_stats
        if batch_stats:
            with torch.no_grad():
                flat = x.detach().reshape(-1, c)
                var, mean = torch.var_mean(flat, dim=0, correction=0)
                if self.training and self.track_running_stats:
                    n = flat.shape[0]
                    self.num_batches_tracked.add_(1)
                    m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                    self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                    self.running_var.lerp_((var * (n / max(n - 1, 1))).to(self.running_var.dtype), m)
        else:
            mean, var = self.running_mean, self.running_var
        invstd = torch.rsqrt(var.to(x.dtype) + self.eps)
        weight = self.weight if self.weight is not None else torch.ones(c, dtype=x.dtype, device=x.device)
        bias = self.bias if self.bias is not None else torch.zeros(c, dtype=x.dtype, device=x.device)
        out = _PooledBNFunction.apply(x, weight.to(x.dtype), bias.to(x.dtype), mean.to(x.dtype), invstd,
                                      batch_stats)
        return out.to(h.dtype) if low_precision else out
