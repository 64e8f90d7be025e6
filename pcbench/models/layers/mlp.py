"""Shared per-point MLPs and the small packed-batch helpers every point model needs."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pcbench.ops.batch import length_bounds, offset2batch, offset2lengths

from .norm import PointBatchNorm

__all__ = ["MLP", "canonical_order", "cloud_max", "cloud_mean", "linear_bn_act"]


def linear_bn_act(c_in: int, c_out: int, bias: bool = True, act: nn.Module | None = None) -> nn.Sequential:
    """``Linear -> PointBatchNorm -> act`` (ReLU by default): the 1x1-conv + BN + ReLU unit of point networks."""
    return nn.Sequential(nn.Linear(c_in, c_out, bias=bias), PointBatchNorm(c_out),
                         act if act is not None else nn.ReLU(inplace=True))


class MLP(nn.Sequential):
    """Shared MLP ``c_in -> widths[0] -> ... -> widths[-1]`` of ``Linear + BN + ReLU`` on ``[..., C]`` tensors.

    Args:
        c_in: input channels.
        widths: output channels of each layer (the ``mlp=[64, 64, 128]`` lists of PointNet++).
        bias: linear bias (the reference 1x1 convolutions have one even though BN follows).
    """

    def __init__(self, c_in: int, widths: list[int], bias: bool = True) -> None:
        if not widths:
            raise ValueError(f"widths must list at least one layer width, got {widths}")
        layers = []
        for w in widths:
            layers.append(linear_bn_act(c_in, w, bias))
            c_in = w
        super().__init__(*layers)
        self.out_channels = widths[-1]


def _equal_lengths(offset: Tensor) -> int | None:
    lo, hi = length_bounds(offset)[0]
    return hi if hi > 0 and lo == hi else None


def cloud_max(x: Tensor, offset: Tensor) -> Tensor:
    """Per-cloud max pooling of packed ``x [N, C]`` -> ``[B, C]``; empty clouds give zeros."""
    n = _equal_lengths(offset)
    if n is not None:
        return x.view(offset.numel(), n, x.shape[1]).amax(1)
    idx = offset2batch(offset, x.shape[0]).unsqueeze(1).expand_as(x)
    return x.new_zeros(offset.numel(), x.shape[1]).scatter_reduce(0, idx, x, "amax", include_self=False)


def cloud_mean(x: Tensor, offset: Tensor) -> Tensor:
    """Per-cloud mean pooling of packed ``x [N, C]`` -> ``[B, C]``; empty clouds give zeros."""
    n = _equal_lengths(offset)
    if n is not None:
        return x.view(offset.numel(), n, x.shape[1]).mean(1)
    out = x.new_zeros(offset.numel(), x.shape[1]).index_add_(0, offset2batch(offset, x.shape[0]), x)
    return out / offset2lengths(offset).clamp_min(1).unsqueeze(1).to(x.dtype)


def canonical_order(coord: Tensor, offset: Tensor) -> Tensor:
    """Permutation [N] sorting each cloud's points lexicographically by (x, y, z), clouds kept in place.

    Models apply it first so that farthest point sampling (which starts at each cloud's first row) and hence
    the whole network are invariant to the input point order. If ``perm[i] = j`` then input row ``j`` is row
    ``i`` of the canonical order.
    """
    perm = torch.arange(coord.shape[0], device=coord.device)
    for dim in (2, 1, 0):  # least significant key first; stable sorts compose into a lexicographic sort
        perm = perm[torch.sort(coord[perm, dim], stable=True).indices]
    batch = offset2batch(offset, coord.shape[0])
    return perm[torch.sort(batch[perm], stable=True).indices]
