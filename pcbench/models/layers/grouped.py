"""Ball-query neighbourhoods without their padding copies: the compact rows PointNet++ grouping runs its MLP on.

The reference networks pad a centre's missing ball-query neighbours with copies of its first one (column 0),
which gives identical feature rows all the way through the shared MLP. ``CompactGroups`` keeps each distinct
(centre, neighbour) row once, ordered so that groups of equal size are consecutive, and describes the copies with
``Repeats`` so that ``PointBatchNorm.forward_relu`` and ``BatchNormReLUMax.pool`` give the statistics, outputs
and gradients of the padded tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pcbench.ops._dispatch import on_gpu_path

from .norm import Repeats

__all__ = ["CompactGroups"]


class _GatherAdd(torch.autograd.Function):
    """``per_point[neighbour] + per_centre[centre of the row]`` with the centre term added group-wise in place."""

    @staticmethod
    def forward(ctx, per_point: Tensor, per_centre: Tensor, groups: CompactGroups) -> Tensor:
        out = per_point.index_select(0, groups.neighbour)
        sorted_centre = per_centre.index_select(0, groups.order)
        row = group = 0
        for size, count in groups.blocks:
            out[row: row + size * count].view(count, size, -1).add_(sorted_centre[group: group + count].unsqueeze(1))
            row, group = row + size * count, group + count
        ctx.groups, ctx.n_points = groups, per_point.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN205 - autograd signature
        groups = ctx.groups
        g_point = g_centre = None
        if ctx.needs_input_grad[0]:
            g_point = grad.new_zeros(ctx.n_points, grad.shape[1]).index_add_(0, groups.neighbour, grad)
        if ctx.needs_input_grad[1]:
            sums, row = [], 0
            for size, count in groups.blocks:
                sums.append(grad[row: row + size * count].view(count, size, -1).sum(1))
                row += size * count
            g_sorted = torch.cat(sums) if sums else grad.new_zeros(0, grad.shape[1])
            g_centre = torch.empty_like(g_sorted).index_copy_(0, groups.order, g_sorted)
        return g_point, g_centre, None


@dataclass(frozen=True)
class CompactGroups:
    """Distinct neighbours of ball-query rows, packed group after group (groups ordered by size, descending).

    order: ``[M]`` centre of each group. neighbour: ``[V]`` support row of each packed row. blocks: ``(group size,
    number of groups)`` in row order. repeats: the padding copies (column 0 of a group of size s < k stands for
    ``k - s + 1`` rows; ``repeats.total = M * k``). If ``order[g] = i`` then group g holds centre i's neighbours.
    """

    order: Tensor
    neighbour: Tensor
    blocks: tuple[tuple[int, int], ...]
    repeats: Repeats

    @classmethod
    def from_ball_query(cls, idx: Tensor) -> CompactGroups:
        """From ``idx [M, k]`` with -1 padding after the found neighbours (``pcbench.ops.ball_query``)."""
        m, k = idx.shape
        if on_gpu_path(idx):
            # GPU path: the padded layout itself (missing slots copy column 0, as the official kernel fills them),
            # one block of k rows per centre. Nothing here depends on data sizes, so nothing is read on the host;
            # statistics, outputs and gradients are those of the compact layout (the copies are identical rows).
            # The centres' self-match is not re-checked here (FPS centres always find themselves).
            empty = idx.new_zeros(0)
            return cls(torch.arange(m, device=idx.device), torch.where(idx < 0, idx[:, :1], idx).reshape(-1),
                       ((k, m),) if m else (), Repeats(empty, empty.float(), m * k))
        valid = idx >= 0
        count = valid.sum(1)
        if m and not bool(valid[:, 0].all()):
            raise ValueError("every centre needs at least one neighbour within the radius (the centres must be "
                             "points of the support cloud, e.g. its farthest point samples)")
        order = torch.argsort(count, descending=True, stable=True)
        count = count[order]
        neighbour = idx[order][valid[order]]  # row-major: each centre's neighbours consecutive, column 0 first
        sizes, numbers = torch.unique_consecutive(count, return_counts=True)
        blocks = tuple(zip(sizes.tolist(), numbers.tolist(), strict=True))
        extra = k - count
        copied = torch.nonzero(extra).squeeze(1)
        first_row = torch.cumsum(count, 0) - count
        return cls(order, neighbour, blocks, Repeats(first_row[copied], extra[copied].float(), m * k))

    def gather(self, per_point: Tensor, per_centre: Tensor) -> Tensor:
        """Rows ``per_point[neighbour] + per_centre[centre]`` -> ``[V, C]`` (differentiable in both inputs)."""
        return _GatherAdd.apply(per_point, per_centre, self)

    def to_centre_order(self, pooled: Tensor) -> Tensor:
        """Per-group rows ``[M, C]`` (as ``BatchNormReLUMax.pool`` returns them) -> one row per centre, in order."""
        return pooled.index_select(0, torch.argsort(self.order))
