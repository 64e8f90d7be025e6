"""torch-pointcloud reference networks and real scene inputs for the equivalence checks (reference tier).

Shared by tests/models/test_equivalence_reference.py and benchmarks/eq_reference.py. Everything that differs
by design between the two implementations is pinned here, on the reference side or by a pcbench model option:

- threads: spconv 2.3.8's CPU kernels (gather / scatter-add per kernel offset) are not deterministic when torch
  runs them on more than one thread, far above rounding (consistent with a race): two processes with 2 threads gave stem outputs 0.077 apart (scale 0.88) for the same
  input and weights, while one thread gives the same bits in every process. :func:`one_thread` runs the
  reference (and pcbench, for the same summation order) on one thread.
- bias: spconv's CPU build has no fused bias (``indice_conv`` asserts "cpu don't support act and bias" in
  eval); in train mode its convolutions add the bias after the convolution, the same function, so
  :func:`spconv_train_mode_bias` puts the spconv layers (only they: BatchNorm, dropout stay in eval) in
  train mode.
- PTv3: no flash attention (``use_flash_attn=False``, Pointcept's ``enable_flash=False`` CPU path), no curve
  shuffling on either side, the serialization depth fixed to torch-pointcloud's rule
  (``max(grid).bit_length()``; Pointcept's and pcbench's is ``(max(grid) + 1).bit_length()``), and the Hilbert
  curves only: torch-pointcloud's z-order encoder needs the ``ocnn`` package, which the reference tier does not
  install (pcbench's z-order codes are checked against a per-point reference and their bit layout in
  tests/ops/test_serialize.py). Both block chainings are compared: ``legacy=False`` (a block's xCPE convolves
  the block input, Pointcept since v1.5.2) and ``legacy=True`` (the previous block's MLP branch, Pointcept
  v1.5.1, which the released weights need; pcbench's ``xcpe_legacy``).
- PTv3 patch size: a level smaller than the patch is padded with repeated points in torch-pointcloud's dense
  path (``divisible_pad(mode="all")``), while Pointcept shrinks the patch to the level and pcbench masks; with a
  patch no larger than the coarsest level (16 here) the three agree, and every level has several patches.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from pcbench.ops import PointBatch
from tests.models._helpers import scannet_crop

PTV3_PATCH = 16
PTV3_ORDERS = ("hilbert", "hilbert-trans")
GRID = 0.02


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the body on one torch thread (spconv's CPU kernels race on more: see the module docstring)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def spconv_train_mode_bias(model: nn.Module) -> nn.Module:
    """``model`` in eval mode except its spconv layers, whose train mode adds the bias outside the CPU kernel."""
    from spconv.pytorch.conv import SparseConvolution  # noqa: PLC0415 - reference tier only

    model.eval()
    for m in model.modules():
        if isinstance(m, SparseConvolution):
            m.train()
    return model


def scene_voxels(data: Path, size: float = 3.0) -> tuple[Tensor, Tensor, PointBatch]:
    """(grid [V, 3] int64 from 0, features [V, 6], the same voxels as a pcbench batch at voxel centres).

    ScanNet scene0000_00 (first vertex per 2 cm voxel, a ``size`` m square column around the scene centre);
    features: colour in [-1, 1] (Pointcept's normalisation) and the coordinates relative to the crop's centre.
    One point per voxel, at its centre, so pcbench's per-voxel mean is the point itself.
    """
    batch, _ = scannet_crop(data, GRID, size)
    grid = torch.floor(batch.coord / GRID).long()
    grid = grid - grid.min(0).values
    feat = torch.cat([batch.feat * 2 - 1, batch.coord - batch.coord.mean(0)], 1)
    return grid, feat, PointBatch((grid.double() + 0.5).float() * GRID, feat, torch.tensor([grid.shape[0]]))


def randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorm running statistics and every norm's affine parameters drawn away from (0, 1), so a mapping
    that swapped or dropped them shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if isinstance(m, (nn.BatchNorm1d, nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model


def tpc_ptv3(in_channels: int = 6, num_classes: int = 20, legacy: bool = False) -> nn.Module:
    """torch-pointcloud's PTv3 segmentation network at the paper's widths and depths (ptv3_seg), pinned as
    the module docstring says; ``legacy`` is Pointcept v1.5.1's block chaining (pcbench's ``xcpe_legacy``)."""
    from torch_pointcloud.models.point_transformer_v3 import PointTransformerV3Segmentation  # noqa: PLC0415

    return PointTransformerV3Segmentation(
        in_channels, num_classes, serialization_orders=PTV3_ORDERS, encoder_patch_size=(PTV3_PATCH,) * 5,
        decoder_patch_size=(PTV3_PATCH,) * 4, use_flash_attn=False, norm="batch_norm",
        norm_kwargs={"eps": 1e-3, "momentum": 0.01}, shuffle_serialization_orders=False, legacy=legacy)


def ptv3_overrides(grid: Tensor, legacy: bool = False) -> dict[str, object]:
    """``create_model("ptv3_seg", ...)`` options matching :func:`tpc_ptv3` on ``grid``."""
    return {"order": list(PTV3_ORDERS), "shuffle_orders": False, "enc_patch_size": [PTV3_PATCH] * 5,
            "dec_patch_size": [PTV3_PATCH] * 4, "serialization_depth": max(int(grid.max()).bit_length(), 1),
            "xcpe_legacy": legacy}


def tpc_forward(ref: nn.Module, grid: Tensor, feat: Tensor) -> Tensor:
    """The reference's logits for one scene (rows in ``grid`` order)."""
    return ref(feat, grid.int(), torch.zeros(grid.shape[0], dtype=torch.long))
