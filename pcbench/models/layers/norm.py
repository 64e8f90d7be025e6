"""Normalisation layers for packed point features with any number of leading dimensions.

Grouped features can be passed compactly: a ball-query neighbourhood padded with copies of one neighbour holds
the same feature row several times, so the grouping layers compute each distinct row once and describe the copies
with ``Repeats``. ``PointBatchNorm.forward_relu`` and ``BatchNormReLUMax.pool`` then give exactly the statistics,
outputs, running statistics and gradients of the expanded tensor (the gradient of a repeated row being the sum
over its copies, which is what the layers before it receive from the expanded formulation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pcbench.ops._dispatch import on_gpu_path

__all__ = ["BatchNormReLUMax", "PointBatchNorm", "Repeats"]


@dataclass(frozen=True)
class Repeats:
    """Rows of a ``[V, C]`` tensor that stand for several identical rows of a larger ``[total, C]`` one.

    Row ``rows[i]`` counts ``1 + extra[i]`` times (every other row once); ``total = V + extra.sum()``.
    """

    rows: Tensor  # [E] int64
    extra: Tensor  # [E] float, > 0
    total: int


def _statistics(bn: nn.BatchNorm1d, x: Tensor, repeats: Repeats | None) -> tuple[Tensor, Tensor]:
    """(mean, biased variance) of the rows of ``x [V, C]`` (expanded by ``repeats``) for batch normalisation.

    In training with running statistics these are updated as ``nn.BatchNorm1d`` does (unbiased variance, momentum
    or cumulative average). Uses BatchNorm's own statistics kernel (one vectorised pass per moment): reducing
    across the rows of ``[rows, C]`` with ``torch.var_mean(x, 0)`` is about 30x slower on CPU.
    """
    with torch.no_grad():
        x = x.detach()
        update = bn.training and bn.track_running_stats
        momentum = 0.0
        if update:
            bn.num_batches_tracked.add_(1)
            momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        direct = (update and repeats is None and bn.running_mean.dtype == bn.running_var.dtype == x.dtype)
        mean, var = torch.batch_norm_update_stats(x, bn.running_mean if direct else None,
                                                  bn.running_var if direct else None, momentum)
        n = x.shape[0]
        if repeats is not None and repeats.rows.numel():
            # Chan et al.'s pairwise combination of (the distinct rows) and (the extra copies of repeated rows).
            w = repeats.extra.to(x.dtype)
            n_extra = float(repeats.total - n)
            xe = x.index_select(0, repeats.rows)
            mean_e = (w @ xe) / n_extra
            m2_e = w @ (xe - mean_e).square_()
            delta = mean_e - mean
            n_all = float(repeats.total)
            mean = mean + delta * (n_extra / n_all)
            var = (var * n + m2_e + delta.square() * (n * n_extra / n_all)) / n_all
            n = repeats.total
        if update and not direct:  # e.g. half running statistics of a half module (x is float here)
            bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), momentum)
            bn.running_var.lerp_((var * (n / max(n - 1, 1))).to(bn.running_var.dtype), momentum)
    return mean, var


def _affine(bn: nn.BatchNorm1d, x: Tensor) -> tuple[Tensor, Tensor]:
    c = x.shape[-1]
    weight = bn.weight if bn.weight is not None else torch.ones(c, dtype=x.dtype, device=x.device)
    bias = bn.bias if bn.bias is not None else torch.zeros(c, dtype=x.dtype, device=x.device)
    return weight.to(x.dtype), bias.to(x.dtype)


def _dense_grad_terms(weight: Tensor, mean: Tensor, invstd: Tensor, g_weight: Tensor, g_bias: Tensor,
                      total: int) -> tuple[Tensor, Tensor]:
    """(a, b) of the gradient that flows through the batch statistics: ``a + b * x`` for every (expanded) row."""
    wi = weight * invstd
    b = -(wi * invstd / total) * g_weight
    a = -(wi / total) * g_bias - b * mean
    return a, b


def _add_dense_grad(g_x: Tensor, x: Tensor, a: Tensor, b: Tensor, repeats: Repeats | None) -> None:
    """``g_x += m * (a + b * x)`` per row, ``m`` its multiplicity (1, or 1 + extra for repeated rows)."""
    g_x.addcmul_(x, b).add_(a)
    if repeats is not None and repeats.rows.numel():
        xe = x.index_select(0, repeats.rows)
        g_x.index_add_(0, repeats.rows, torch.addcmul(a, xe, b).mul_(repeats.extra.to(x.dtype).unsqueeze(1)))


class _BNReLUFunction(torch.autograd.Function):
    """ReLU(BN(x)) on the rows of ``x [V, C]`` with given statistics; backward written out with the repeats."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, var: Tensor, eps: float,
                batch_stats: bool, repeats: Repeats | None) -> Tensor:
        invstd = torch.rsqrt(var + eps)
        scale = weight * invstd
        y = torch.addcmul(bias - mean * scale, x, scale).relu_()
        ctx.save_for_backward(x, y, weight, mean, var, invstd)
        ctx.eps, ctx.batch_stats, ctx.repeats = eps, batch_stats, repeats
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN205 - autograd signature
        x, y, weight, mean, var, invstd = ctx.saved_tensors
        g = torch.ops.aten.threshold_backward(grad, y, 0)
        # Eval-mode BatchNorm backward: g * weight * invstd and the two parameter gradients, in one kernel.
        g_x, g_weight, g_bias = torch.ops.aten.native_batch_norm_backward(
            g, x, weight, mean, var, None, None, False, ctx.eps, [True, True, True])
        if ctx.batch_stats:
            repeats = ctx.repeats
            total = repeats.total if repeats is not None else x.shape[0]
            a, b = _dense_grad_terms(weight, mean, invstd, g_weight, g_bias, total)
            _add_dense_grad(g_x, x, a, b, repeats)
        return g_x, g_weight, g_bias, None, None, None, None, None


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

    def forward_relu(self, x: Tensor, repeats: Repeats | None = None) -> Tensor:
        """``ReLU(BN(x))`` for rows ``x [V, C]``, statistics over the rows expanded by ``repeats`` -> ``[V, C]``."""
        low_precision = x.dtype not in (torch.float32, torch.float64)
        xf = x.float() if low_precision else x
        batch_stats = self.training or not self.track_running_stats
        if batch_stats:
            mean, var = _statistics(self, xf, repeats)
        else:
            mean, var = self.running_mean.to(xf.dtype), self.running_var.to(xf.dtype)
        weight, bias = _affine(self, xf)
        out = _BNReLUFunction.apply(xf, weight, bias, mean.to(xf.dtype), var.to(xf.dtype), self.eps, batch_stats,
                                    repeats)
        return out.to(x.dtype) if low_precision else out


def _max_with_index(rows: Tensor, size: int, count: int) -> tuple[Tensor, Tensor]:
    """Max and its first index over each group of ``size`` consecutive rows of ``rows [size * count, C]``.

    Same result as ``rows.view(count, size, C).max(1)``, computed by max-pooling the groups seen as a
    channels-last ``[count, C, size, 1]`` image: that kernel vectorises over channels, about 10x faster on CPU
    than a max with indices over the middle dimension.
    """
    c = rows.shape[1]
    image = rows.view(count, size, 1, c).permute(0, 3, 1, 2)
    values, index = F.max_pool2d(image, (size, 1), return_indices=True)
    return values.reshape(count, c), index.reshape(count, c)


class _PooledBNFunction(torch.autograd.Function):
    """max_k ReLU(BN(h)) per group with a hand-written backward: one dense pass over h plus a scatter at the pooled
    rows, instead of autograd's chain of BatchNorm, ReLU and max-pool backward passes over every row."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, invstd: Tensor, batch_stats: bool,
                blocks: tuple[tuple[int, int], ...], repeats: Repeats | None) -> Tensor:
        scale = weight * invstd
        shift = bias - mean * scale
        neg = scale < 0  # decreasing channels: the max of the output comes from the min of h
        # GPU path: max of h * (+-1) per channel (the same values and first indices as the two passes below)
        # instead of reading any(neg) on the host.
        sign = torch.where(neg, -1.0, 1.0).to(h.dtype) if on_gpu_path(h) else None
        any_neg = sign is None and bool(neg.any())
        pooled, arg, start = [h.new_zeros(0, h.shape[1])], [torch.zeros(0, h.shape[1], dtype=torch.long, device=h.device)], 0
        for size, count in blocks:
            if sign is not None:
                p, a = _max_with_index(h[start: start + size * count] * sign, size, count)
                p = p * sign
            else:
                p, a = _max_with_index(h[start: start + size * count], size, count)
            if any_neg:
                low, a_low = _max_with_index(h[start: start + size * count].neg(), size, count)
                p, a = torch.where(neg, low.neg_(), p), torch.where(neg, a_low, a)
            pooled.append(p)
            arg.append(a.add_((torch.arange(count, device=h.device) * size + start).unsqueeze(1)))
            start += size * count
        pooled_h = pooled[1] if len(pooled) == 2 else torch.cat(pooled)
        arg_rows = arg[1] if len(arg) == 2 else torch.cat(arg)  # [M, C] row of h that each output comes from
        z = pooled_h * scale + shift
        ctx.save_for_backward(h, arg_rows, pooled_h, weight, mean, invstd, z)
        ctx.batch_stats, ctx.repeats = batch_stats, repeats
        return torch.relu(z)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN205 - autograd signature
        h, arg_rows, pooled_h, weight, mean, invstd, z = ctx.saved_tensors
        gz = grad * (z > 0).to(grad.dtype)  # [M, C]
        g_bias = gz.sum(0)
        g_weight = (gz * ((pooled_h - mean) * invstd)).sum(0)
        g_h = None
        if ctx.needs_input_grad[0]:
            if ctx.batch_stats:  # the statistics depend on every entry of h: dense BN-backward term
                repeats = ctx.repeats
                total = repeats.total if repeats is not None else h.shape[0]
                a, b = _dense_grad_terms(weight, mean, invstd, g_weight, g_bias, total)
                g_h = torch.addcmul(a.to(h.dtype), h, b.to(h.dtype))
                if repeats is not None and repeats.rows.numel():
                    g_h.index_add_(0, repeats.rows, torch.addcmul(a, h.index_select(0, repeats.rows), b)
                                   .mul_(repeats.extra.to(h.dtype).unsqueeze(1)))
            else:
                g_h = torch.zeros_like(h)
            g_h.scatter_add_(0, arg_rows, (gz * (weight * invstd)).to(h.dtype))
        return g_h, g_weight, g_bias, None, None, None, None, None


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
        m, k, c = h.shape
        return self.pool(h.reshape(m * k, c), ((k, m),))

    def pool(self, h: Tensor, blocks: Sequence[tuple[int, int]], repeats: Repeats | None = None) -> Tensor:
        """Groups of variable size: ``h [V, C]`` holds, for each ``(size, count)`` of ``blocks`` in turn, ``count``
        groups of ``size`` consecutive rows; ``repeats`` marks rows standing for several identical rows (they count
        in the statistics, not in the max). Returns ``[sum(count), C]``, one row per group in order."""
        low_precision = h.dtype not in (torch.float32, torch.float64)
        x = h.float() if low_precision else h
        if sum(size * count for size, count in blocks) != x.shape[0]:
            raise ValueError(f"blocks {list(blocks)} cover {sum(s * n for s, n in blocks)} rows, h has {x.shape[0]}")
        batch_stats = self.training or not self.track_running_stats
        if batch_stats:
            mean, var = _statistics(self, x, repeats)
        else:
            mean, var = self.running_mean, self.running_var
        invstd = torch.rsqrt(var.to(x.dtype) + self.eps)
        weight, bias = _affine(self, x)
        out = _PooledBNFunction.apply(x, weight, bias, mean.to(x.dtype), invstd, batch_stats, tuple(blocks), repeats)
        return out.to(h.dtype) if low_precision else out
