"""MinkUNet (Res16UNet) for scene segmentation, on pcbench's pure-torch sparse convolution.

Architecture as in Choy et al., "4D Spatio-Temporal ConvNets: Minkowski Convolutional Neural Networks",
CVPR 2019 (github.com/chrischoy/SpatioTemporalSegmentation ``models/res16unet.py``; the same network is
MinkowskiEngine's ``examples/minkunet.py`` and Pointcept's ``MinkUNet34C``):

    stem      conv(k=conv1_kernel_size) -> BN -> ReLU                              stride 1, INIT_DIM
    encoder   4 x [conv(k=2, s=2) -> BN -> ReLU -> LAYERS[i] BasicBlocks(PLANES[i])]  strides 2, 4, 8, 16
    decoder   4 x [convT(k=2, s=2) -> BN -> ReLU -> concat skip -> LAYERS[4+i] BasicBlocks(PLANES[4+i])]
    head      kernel-1 conv with bias (a Linear) -> per-voxel logits -> per-point via the voxel inverse map

Variants differ only in LAYERS and PLANES (14A, 18A, 34C, ...). The published 72.2% ScanNet val mIoU of
MinkUNet34C used 2 cm voxels and a 5x5x5 first convolution (SpatioTemporalSegmentation README model zoo),
which are the defaults here.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from pcbench.ops import PointBatch

from .heads import ClassifierMixin
from .layers.checks import model_input
from .sparse import (
    SparseBasicBlock,
    SparseConv3d,
    SparseConvBNReLU,
    SparseConvTranspose3d,
    SparseTensor,
    devoxelize,
    sparse_from_points,
    sparse_unet,
    unet_plan,
    unet_strides,
)

__all__ = ["MinkUNet"]


def _check_widths(layers: Sequence[int], planes: Sequence[int]) -> None:
    if len(layers) != 8 or len(planes) != 8:
        raise ValueError(
            f"layers and planes need 8 entries (4 encoder + 4 decoder stages), got {len(layers)} and {len(planes)}; "
            "e.g. layers=(2, 3, 4, 6, 2, 2, 2, 2), planes=(32, 64, 128, 256, 256, 128, 96, 96)"
        )
    if any(int(n) < 1 for n in layers) or any(int(c) < 1 for c in planes):
        raise ValueError(f"layers and planes must be positive, got layers={tuple(layers)} planes={tuple(planes)}")


class MinkUNet(ClassifierMixin, nn.Module):
    """Res16UNet-style sparse U-Net: packed points -> per-point logits [N, num_classes].

    Args:
        in_channels: per-point input feature channels (``batch.feat``).
        num_classes: output classes.
        voxel_size: voxel edge in input coordinate units (2 cm for ScanNet, as in the 72.2 mIoU model).
        layers: residual blocks per stage, 4 encoder then 4 decoder stages (34C: 2,3,4,6,2,2,2,2).
        planes: output width per stage, same order (34C: 32,64,128,256,256,128,96,96).
        init_dim: width of the stem convolution.
        conv1_kernel_size: stem kernel size (5 in Res16UNet).
        bn_momentum: BatchNorm momentum (MinkowskiEngine default 0.02).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        voxel_size: float = 0.02,
        layers: Sequence[int] = (2, 3, 4, 6, 2, 2, 2, 2),
        planes: Sequence[int] = (32, 64, 128, 256, 256, 128, 96, 96),
        init_dim: int = 32,
        conv1_kernel_size: int = 5,
        bn_momentum: float = 0.02,
    ) -> None:
        """Widths/depths default to MinkUNet34C; ``voxel_size`` in input coordinate units (metres)."""
        super().__init__()
        if in_channels < 1 or num_classes < 1:
            raise ValueError(f"in_channels and num_classes must be >= 1, got {in_channels} and {num_classes}")
        if not voxel_size > 0:
            raise ValueError(f"voxel_size must be a positive float (metres per cell), got {voxel_size!r}")
        _check_widths(layers, planes)
        self.in_channels, self.num_classes, self.voxel_size = in_channels, num_classes, float(voxel_size)
        layers, planes = [int(n) for n in layers], [int(c) for c in planes]

        self.stem = SparseConvBNReLU(SparseConv3d(in_channels, init_dim, conv1_kernel_size), init_dim,
                                     momentum=bn_momentum)
        self.down = nn.ModuleList()
        self.enc = nn.ModuleList()
        width = init_dim
        for i in range(4):
            # As in Res16UNet, the stride-2 convolution keeps the width; the first block widens.
            self.down.append(SparseConvBNReLU(SparseConv3d(width, width, 2, stride=2), width, momentum=bn_momentum))
            self.enc.append(self._stage(width, planes[i], layers[i], bn_momentum))
            width = planes[i]
        skips = [init_dim, planes[0], planes[1], planes[2]]
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in range(4):
            self.up.append(SparseConvBNReLU(SparseConvTranspose3d(width, planes[4 + i], 2, stride=2), planes[4 + i],
                                            momentum=bn_momentum))
            self.dec.append(self._stage(planes[4 + i] + skips[3 - i], planes[4 + i], layers[4 + i], bn_momentum))
            width = planes[4 + i]
        self.out_channels = width
        self.head = nn.Linear(width, num_classes)

    @staticmethod
    def _stage(cin: int, cout: int, blocks: int, bn_momentum: float) -> nn.Sequential:
        return nn.Sequential(*[SparseBasicBlock(cin if b == 0 else cout, cout, bn_momentum=bn_momentum)
                               for b in range(blocks)])

    def forward_voxels(self, batch: PointBatch) -> tuple[SparseTensor, Tensor]:
        """Decoder features on the finest voxels and the point -> voxel inverse map [N]."""
        batch = model_input(self, batch)
        # every level in the voxelize read; sparse_unet then builds all kernel maps in one more
        strides = unet_strides(unet_plan(self.stem, self.down, self.enc, self.up, self.dec))
        x, inverse = sparse_from_points(batch.coord, batch.feat, self.voxel_size, batch.offset, validate=False,
                                        strides=strides)
        x = sparse_unet(x, self.stem, self.down, self.enc, self.up, self.dec)
        return x, inverse

    def forward_features(self, batch: PointBatch) -> Tensor:
        """Per-point features [N, planes[-1]] (each point reads its voxel's decoder feature)."""
        x, inverse = self.forward_voxels(batch)
        return devoxelize(x, inverse)

    def forward(self, batch: PointBatch) -> Tensor:
        """Per-point logits [N, num_classes], rows in input order."""
        x, inverse = self.forward_voxels(batch)
        # The head is per-voxel (a kernel-1 convolution), so apply it before copying rows to points.
        return self.head(x.feats).index_select(0, inverse)
