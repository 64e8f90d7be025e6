"""SpUNet-base (Pointcept's ``SpUNet-v1m1``) for scene segmentation, on pcbench's sparse convolution.

Architecture as in Pointcept ``pointcept/models/sparse_unet/spconv_unet_v1m1_base.py`` (Wu et al.,
Pointcept codebase; the sparse U-Net baseline of the PTv2/PTv3 papers):

    stem      submanifold conv k=5 -> BN -> ReLU                                   base_channels
    encoder   4 x [conv(k=2, s=2) -> BN -> ReLU -> layers[i] BasicBlocks(channels[i])]
    decoder   4 x [inverse conv(k=2, s=2) -> BN -> ReLU -> concat skip -> layers[4+i] BasicBlocks(channels[4+i])]
    head      kernel-1 conv with bias (a Linear) -> per-voxel logits -> per-point via the voxel inverse map

Unlike MinkUNet the strided convolutions change the width and the blocks' shortcut is a kernel-1
projection (``proj``) only where widths differ. BatchNorm uses eps 1e-3, momentum 0.01, and submanifold
convolutions / the head start from a truncated normal (std 0.02), as in the reference.
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

__all__ = ["SpUNet"]

_BN_EPS, _BN_MOMENTUM = 1e-3, 0.01


def _conv_bn_relu(conv: nn.Module, channels: int) -> SparseConvBNReLU:
    return SparseConvBNReLU(conv, channels, _BN_EPS, _BN_MOMENTUM)


class SpUNet(ClassifierMixin, nn.Module):
    """Sparse U-Net (SpUNet-v1m1): packed points -> per-point logits [N, num_classes].

    Args:
        in_channels: per-point input feature channels (``batch.feat``).
        num_classes: output classes.
        voxel_size: voxel edge in input coordinate units (2 cm for ScanNet).
        base_channels: width of the stem convolution.
        channels: output width per stage, 4 encoder then 4 decoder stages.
        layers: residual blocks per stage, same order.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        voxel_size: float = 0.02,
        base_channels: int = 32,
        channels: Sequence[int] = (32, 64, 128, 256, 256, 128, 96, 96),
        layers: Sequence[int] = (2, 3, 4, 6, 2, 2, 2, 2),
    ) -> None:
        """Defaults are SpUNet-base; ``voxel_size`` in input coordinate units (metres, 2 cm for ScanNet)."""
        super().__init__()
        if in_channels < 1 or num_classes < 1:
            raise ValueError(f"in_channels and num_classes must be >= 1, got {in_channels} and {num_classes}")
        if not voxel_size > 0:
            raise ValueError(f"voxel_size must be a positive float (metres per cell), got {voxel_size!r}")
        if len(channels) != 8 or len(layers) != 8:
            raise ValueError(
                f"channels and layers need 8 entries (4 encoder + 4 decoder stages), got {len(channels)} and "
                f"{len(layers)}; e.g. channels=(32, 64, 128, 256, 256, 128, 96, 96), layers=(2, 3, 4, 6, 2, 2, 2, 2)"
            )
        self.in_channels, self.num_classes, self.voxel_size = in_channels, num_classes, float(voxel_size)
        channels, layers = [int(c) for c in channels], [int(n) for n in layers]

        self.stem = _conv_bn_relu(SparseConv3d(in_channels, base_channels, 5), base_channels)
        self.down, self.enc = nn.ModuleList(), nn.ModuleList()
        width = base_channels
        for i in range(4):
            self.down.append(_conv_bn_relu(SparseConv3d(width, channels[i], 2, stride=2), channels[i]))
            self.enc.append(self._stage(channels[i], channels[i], layers[i]))
            width = channels[i]
        skips = [base_channels, *channels[:3]]
        self.up, self.dec = nn.ModuleList(), nn.ModuleList()
        for i in range(4):
            c = channels[4 + i]
            self.up.append(_conv_bn_relu(SparseConvTranspose3d(width, c, 2, stride=2), c))
            self.dec.append(self._stage(c + skips[3 - i], c, layers[4 + i]))
            width = c
        self.out_channels = width
        self.head = nn.Linear(width, num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _stage(cin: int, cout: int, blocks: int) -> nn.Sequential:
        return nn.Sequential(*[SparseBasicBlock(cin if b == 0 else cout, cout, bn_eps=_BN_EPS, bn_momentum=_BN_MOMENTUM)
                               for b in range(blocks)])

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # The reference re-initialises submanifold convs and Linear layers; strided/inverse convs keep
        # the default uniform init.
        if (isinstance(m, SparseConv3d) and m.stride == 1) or isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm1d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

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
        """Per-point features [N, channels[-1]]."""
        x, inverse = self.forward_voxels(batch)
        return devoxelize(x, inverse)

    def forward(self, batch: PointBatch) -> Tensor:
        """Per-point logits [N, num_classes], rows in input order."""
        x, inverse = self.forward_voxels(batch)
        return self.head(x.feats).index_select(0, inverse)
