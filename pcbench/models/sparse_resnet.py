"""Sparse voxel ResNet classifier for object clouds (ModelNet / ScanObjectNN), on pcbench's sparse conv.

Layout as in MinkowskiEngine ``examples/resnet.py`` (Choy et al., CVPR 2019):

    conv(k=5, s=2) -> BN -> ReLU -> avg-pool(k=2, s=2)
    4 x [BasicBlock(stride 2, PLANES[i]) + (LAYERS[i] - 1) BasicBlocks]
    conv(k=3, s=3) -> BN -> ReLU -> global max pool per cloud -> Linear -> [B, num_classes]

Objects are voxelized internally at ``voxel_size`` (default 0.02 for clouds normalised to the unit
sphere: ~100 cells across, so the 192x total down-sampling ends near one voxel per object).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pcbench.ops import PointBatch

from .heads import ClassifierMixin
from .layers.checks import model_input
from .sparse import (
    SparseAvgPool3d,
    SparseBasicBlock,
    SparseBatchNorm,
    SparseConv3d,
    SparseGlobalPool,
    SparseTensor,
    sparse_from_points,
    sparse_plan,
)

__all__ = ["SparseResNet"]


class SparseResNet(ClassifierMixin, nn.Module):
    """Voxel ResNet: packed object clouds -> logits [B, num_classes].

    Args:
        in_channels: per-point input feature channels (``batch.feat``).
        num_classes: output classes.
        voxel_size: voxel edge in input coordinate units (objects are normalised to the unit sphere).
        layers: residual blocks per stage (ResNet14: 1,1,1,1).
        planes: output width per stage.
        init_dim: width of the stem convolution.
        dropout: dropout before the final linear layer.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        voxel_size: float = 0.02,
        layers: Sequence[int] = (1, 1, 1, 1),
        planes: Sequence[int] = (64, 128, 256, 512),
        init_dim: int = 64,
        dropout: float = 0.0,
    ) -> None:
        """Defaults are ResNet14 widths/depths; ``voxel_size`` in input coordinate units."""
        super().__init__()
        if in_channels < 1 or num_classes < 1:
            raise ValueError(f"in_channels and num_classes must be >= 1, got {in_channels} and {num_classes}")
        if not voxel_size > 0:
            raise ValueError(f"voxel_size must be a positive float, got {voxel_size!r}")
        if len(layers) != len(planes) or not layers:
            raise ValueError(
                f"layers and planes need one entry per stage, got {len(layers)} and {len(planes)}; "
                "e.g. layers=(2, 2, 2, 2), planes=(64, 128, 256, 512)"
            )
        self.in_channels, self.num_classes, self.voxel_size = in_channels, num_classes, float(voxel_size)
        self.conv1 = SparseConv3d(in_channels, init_dim, 5, stride=2)
        self.bn1 = SparseBatchNorm(init_dim)
        self.pool = SparseAvgPool3d(2, 2)
        stages = []
        width = init_dim
        for n, c in zip(layers, planes, strict=True):
            blocks = [SparseBasicBlock(width, int(c), stride=2)]
            blocks += [SparseBasicBlock(int(c), int(c)) for _ in range(int(n) - 1)]
            stages.append(nn.Sequential(*blocks))
            width = int(c)
        self.stages = nn.Sequential(*stages)
        self.conv5 = SparseConv3d(width, width, 3, stride=3)
        self.bn5 = SparseBatchNorm(width)
        self.global_pool = SparseGlobalPool("max")
        self.out_channels = width
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, num_classes))
        for m in self.modules():
            # MinkowskiEngine's Kaiming (fan_out, ReLU gain) variance 2 / fan_out on every kernel, in its
            # uniform form (normal_ on the meta device drags in torch's compiler stack for seconds).
            if isinstance(m, SparseConv3d):
                bound = (6.0 / (m.weight.shape[0] * m.out_channels)) ** 0.5
                nn.init.uniform_(m.weight, -bound, bound)

    def forward_features(self, batch: PointBatch) -> Tensor:
        """Per-cloud global features [B, planes[-1]] (zeros for an empty cloud)."""
        batch = model_input(self, batch)
        # Every level and every kernel map of the forward up front: one host read for the levels (with the
        # voxels), one for all maps, instead of one or two per layer.
        keys, _ = sparse_plan([self.conv1, self.pool, self.stages, self.conv5])
        x, _ = sparse_from_points(batch.coord, batch.feat, self.voxel_size, batch.offset, validate=False,
                                  strides=sorted({k[1] for k in keys}))
        x.cache.prepare(keys)
        x = self._relu(self.bn1(self.conv1(x)))
        x = self.stages(self.pool(x))
        x = self._relu(self.bn5(self.conv5(x)))
        return self.global_pool(x)

    @staticmethod
    def _relu(x: SparseTensor) -> SparseTensor:
        return x.replace(torch.relu(x.feats))

    def forward(self, batch: PointBatch) -> Tensor:
        """Logits [B, num_classes]."""
        return self.head(self.forward_features(batch))
