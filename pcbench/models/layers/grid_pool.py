"""Partition-based (grid) pooling shared by Point Transformer V2 and V3, built on ``ops.voxelize``.

Pooling maps N points to V cells (``inverse [N]`` gives each point's cell); unpooling is the gather
``coarse[inverse]``, so no neighbour search is needed on the way back up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pcbench.ops import offset2batch, voxel_pool
from pcbench.ops.voxel import voxel_levels

__all__ = ["DropPath", "GridPartition", "cloud_min", "grid_partition", "segment_mean"]


@dataclass
class GridPartition:
    """Cells of a packed batch: cell [V, 4] (cloud, i, j, k) sorted, inverse [N], counts [V], offset [B]."""

    cell: Tensor
    inverse: Tensor
    counts: Tensor
    offset: Tensor

    @property
    def num_cells(self) -> int:
        """Number of non-empty cells V."""
        return int(self.cell.shape[0])


def cloud_min(x: Tensor, offset: Tensor) -> Tensor:
    """Per-cloud minimum [B, C] of rows [N, C] (zeros for empty clouds)."""
    batch = offset2batch(offset, x.shape[0])
    out = x.new_zeros(offset.numel(), x.shape[1])
    return out.scatter_reduce(0, batch[:, None].expand_as(x), x, reduce="amin", include_self=False)


def grid_partition(coord: Tensor, cell_size: float, offset: Tensor, relative: bool = True, validate: bool = False
                   ) -> GridPartition:
    """Cells of side ``cell_size`` over ``coord`` [N, 3]; ``relative`` anchors each cloud's grid at its minimum.

    Anchoring per cloud (as PTv2's grid pooling does) makes a cloud's cells independent of where it sits.
    If ``inverse[i] = v`` then point i lies in cell ``cell[v]``. Models call it on points of a checked
    ``PointBatch`` (or derived from one), so the input checks of ``voxelize`` are off unless ``validate``.
    """
    if relative and coord.shape[0]:
        coord = coord - cloud_min(coord, offset)[offset2batch(offset, coord.shape[0])]
    # One host read: the cells and their per-cloud counts (the new offset carries its length bounds, so the
    # level's neighbour searches read nothing more).
    level = voxel_levels(coord, cell_size, offset, validate=validate)[0]
    return GridPartition(level.cells, level.inverse, level.counts, level.offset)


def segment_mean(x: Tensor, part: GridPartition) -> Tensor:
    """Mean of the rows of each cell: [N, C] -> [V, C]."""
    return voxel_pool(x, part.inverse, part.num_cells, reduce="mean", validate=False)


class DropPath(nn.Module):
    """Stochastic depth per point row, as the official PTv2/PTv3 code applies timm's DropPath to [N, C]."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        """Zero whole rows with probability p in training, rescaling the kept ones by 1 / (1 - p)."""
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty(x.shape[0], *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"
