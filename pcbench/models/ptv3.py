"""Point Transformer V3 (Wu et al., CVPR 2024) on the pure-torch neighbour core.

Pipeline: voxelize the input at ``grid_size`` (features averaged per voxel), serialize the voxels along
space-filling curves (z-order, Hilbert and their x/y-swapped variants), then a U-Net of blocks
``x += xCPE(x); x += Attn(LN(x)); x += MLP(LN(x))`` where Attn is patch attention along one curve
(the curve alternates block to block) and xCPE is a submanifold sparse conv (kernel 3,
``pcbench.models.sparse.SparseConv3d`` on the level's voxels in serialized row order) + Linear + LN.
Pooling merges each stride^3 cell block (``ops.voxelize`` on the integer grid), unpooling gathers through
the pooling map. Segmentation returns per-point logits through the input voxel map; classification
averages the deepest features per cloud.

Serialization follows Pointcept (``pointcept/models/utils/structure.py`` ``Point.serialization`` and
``point_transformer_v3m1_base.py`` ``SerializedPooling``): the curve depth (bits per axis) is taken from the
batch, ``depth = int(max(grid_coord) + 1).bit_length()`` over all clouds, unless fixed by
``serialization_depth``; a pooling of stride ``2**p`` lowers it by ``p`` (the coarse codes are the fine ones
shifted right by ``3p`` bits, which equals encoding the coarse grid at the lower depth); and with
``shuffle_orders`` the curve list is permuted at the input and again at every pooling, in training *and* in
evaluation, as Pointcept does. The Hilbert curve depends on the depth, so a cloud may follow a different curve
alone than inside a batch with a larger scene (z-order does not).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pcbench.ops import (
    PointBatch,
    kernel_maps,
    offset2batch,
    offset2lengths,
    serialize,
    voxel_levels,
    voxel_pool,
)
from pcbench.ops.serialize import MAX_DEPTH, ORDERS

from .heads import ClassifierMixin
from .layers.checks import model_input
from .layers.grid_pool import DropPath, GridPartition, grid_partition, segment_mean
from .layers.serialized_attention import PatchIndex, SerializedAttention, build_patches
from .sparse import CoordinateCache, SparseConv3d, SparseTensor

__all__ = ["PointTransformerV3", "serialization_depth"]


# ----------------------------------------------------------------------------------------------------------
# per-level state: the voxels of one resolution, their curve orders, conv maps and patch layouts (cached)


@dataclass
class _Level:
    grid: Tensor  # [n, 3] int64, non-negative per cloud
    offset: Tensor  # [B]
    names: list[str]  # serialization curves of this level (permuted per level when shuffle_orders)
    parent: GridPartition | None = None  # how the finer level's points map to this level's points
    depth: int = 16  # curve bits per axis (Pointcept's serialized_depth); grid values are < 2**depth
    lengths: list[int] | None = None  # points per cloud on the host, when known (sizes the patches without a read)
    _convs: CoordinateCache = field(default_factory=CoordinateCache)  # kernel maps of this level's voxels
    _patches: dict[tuple[int, int], PatchIndex] = field(default_factory=dict)

    @property
    def num_points(self) -> int:
        return int(self.grid.shape[0])

    def sparse(self, feat: Tensor) -> SparseTensor:
        """``feat`` [n, C] on this level's voxels, rows in level order, for ``pcbench.models.sparse`` layers
        (one kernel map per kernel size, shared by every block of the level)."""
        coords = self._convs.level(1)
        if coords is None:
            coords = torch.cat([offset2batch(self.offset, self.grid.shape[0])[:, None], self.grid], 1)
        return SparseTensor(coords, feat, 1, int(self.offset.numel()), self._convs)

    def patches(self, order_index: int, patch_size: int) -> PatchIndex:
        """Patch layout along curve ``names[order_index]`` (built on first use, only for curves in use)."""
        key = (order_index % len(self.names), patch_size)
        if key not in self._patches:
            # depth 0 (every cloud one voxel) has a single order; serialize needs at least one bit
            code = serialize(self.grid, self.offset, self.names[key[0]], depth=max(self.depth, 1), validate=False)
            order = torch.argsort(code)
            self._patches[key] = build_patches(order, offset2lengths(self.offset), patch_size, self.lengths)
        return self._patches[key]


def serialization_depth(grid: Tensor) -> int:
    """Pointcept's curve depth for a batch of non-negative grid coordinates: ``int(max + 1).bit_length()``."""
    return int(grid.max() + 1).bit_length() if grid.numel() else 1


def _pooled_depth(depth: int, stride: int) -> int:
    """Depth after a pooling of stride ``2**p``; Pointcept skips the shift when ``p`` exceeds the depth."""
    p = (stride - 1).bit_length()
    return depth - p if p <= depth else depth


# ----------------------------------------------------------------------------------------------------------
# blocks


class Block(nn.Module):
    """Pre-norm PTv3 block: xCPE, serialized patch attention and MLP, each with a residual."""

    def __init__(
        self,
        channels: int,
        num_heads: int,
        patch_size: int,
        order_index: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.order_index = order_index
        self.cpe_conv = SparseConv3d(channels, channels, 3, bias=True)
        self.cpe_linear = nn.Linear(channels, channels)
        self.cpe_norm = nn.LayerNorm(channels)
        self.norm1 = nn.LayerNorm(channels)
        self.attn = SerializedAttention(channels, num_heads, qkv_bias, attn_drop, proj_drop)
        self.norm2 = nn.LayerNorm(channels)
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden), nn.GELU(), nn.Dropout(proj_drop), nn.Linear(hidden, channels),
            nn.Dropout(proj_drop),
        )
        self.drop_path = DropPath(drop_path)

    def forward(self, feat: Tensor, level: _Level, cpe_input: Tensor | None = None,
                return_mlp: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """[n, C] -> [n, C] on one level; the xCPE convolves ``cpe_input`` when given, else ``feat``.
        ``return_mlp`` also returns the MLP branch (what Pointcept v1.5.1's next xCPE convolved)."""
        cpe = self.cpe_conv(level.sparse(feat if cpe_input is None else cpe_input)).feats
        feat = feat + self.cpe_norm(self.cpe_linear(cpe))
        feat = feat + self.drop_path(self.attn(self.norm1(feat), level.patches(self.order_index, self.patch_size)))
        branch = self.drop_path(self.mlp(self.norm2(feat)))
        return (feat + branch, branch) if return_mlp else feat + branch


class GridPooling(nn.Module):
    """Linear, then max over each stride^3 block of voxels, then BatchNorm + GELU (PTv3 serialized pooling)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__()
        if stride < 2:
            raise ValueError(f"stride must be an integer >= 2, got {stride}")
        self.stride = stride
        self.proj = nn.Linear(in_channels, out_channels)
        self.norm = nn.BatchNorm1d(out_channels, eps=1e-3, momentum=0.01)
        self.act = nn.GELU()

    def partition(self, level: _Level) -> GridPartition:
        """Cells of ``stride`` voxels per axis (exact on integer grids); cell ijk are the coarse grid coords."""
        return grid_partition(level.grid.double(), float(self.stride), level.offset, relative=False)

    def forward(self, feat: Tensor, part: GridPartition) -> Tensor:
        """[n_fine, C_in] -> [n_coarse, C_out]."""
        pooled = voxel_pool(self.proj(feat), part.inverse, part.num_cells, reduce="max", validate=False)
        return self.act(self.norm(pooled))


class GridUnpooling(nn.Module):
    """Project coarse and skip features, add the coarse ones gathered through the pooling map."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()

        def proj(c: int) -> nn.Sequential:
            return nn.Sequential(nn.Linear(c, out_channels), nn.BatchNorm1d(out_channels, eps=1e-3, momentum=0.01),
                                 nn.GELU())

        self.proj = proj(in_channels)
        self.proj_skip = proj(skip_channels)

    def forward(self, feat: Tensor, skip: Tensor, part: GridPartition) -> tuple[Tensor, Tensor]:
        """coarse [n_coarse, C_in], skip [n_fine, C_skip] -> (sum [n_fine, C_out], projected skip [n_fine, C_out]).

        The projected skip is what the stage's first xCPE convolves: Pointcept's SerializedUnpooling adds the
        coarse features to ``feat`` only, leaving the sparse tensor of the skip at its projection
        (point_transformer_v3m1_base.py; torch-pointcloud's ``cpe_from_skip``).
        """
        projected = self.proj_skip(skip)
        return projected + self.proj(feat)[part.inverse], projected


# ----------------------------------------------------------------------------------------------------------
# the model


def _tuple(x: Sequence, n: int, name: str) -> tuple:
    t = tuple(x)
    if len(t) != n:
        raise ValueError(f"{name} must have {n} entries (one per stage), got {len(t)}: {t}")
    return t


class PointTransformerV3(ClassifierMixin, nn.Module):
    """Point Transformer V3 for segmentation ([N, num_classes]) or classification ([B, num_classes]).

    Args:
        in_channels: input feature channels per point.
        num_classes: output classes.
        grid_size: input voxel size in coordinate units (the paper's ScanNet setting: 0.02 m).
        order: serialization curves cycled block to block; names from ``ops.serialize``.
        stride: pooling stride per encoder transition (len = stages - 1).
        enc_depths, enc_channels, enc_num_heads, enc_patch_size: per encoder stage.
        dec_depths, dec_channels, dec_num_heads, dec_patch_size: per decoder stage (finest first);
            ignored when ``cls_mode``.
        mlp_ratio, qkv_bias, attn_drop, proj_drop: block settings.
        drop_path: largest stochastic-depth rate (linearly increasing over blocks).
        shuffle_orders: permute the curve list at the input and at every pooling, in training and evaluation
            (Pointcept's rule; seed torch's generator for a repeatable evaluation).
        serialization_depth: curve bits per axis at the input level; None (default) takes Pointcept's
            ``int(max(grid_coord) + 1).bit_length()`` over the batch, an int fixes it (at most 20).
        cls_mode: encoder only + per-cloud mean + MLP head (classification).
        cls_head_channels, cls_dropout: hidden widths and dropout of the classification head.
        embed_kernel_size: kernel of the sparse-conv stem.
        xcpe_legacy: Pointcept v1.5.1's block chaining, which the released PT-v3m1 weights were trained with:
            inside a stage, a block's xCPE convolves the previous block's MLP branch instead of its output (the
            sparse tensor was not updated; fixed in Pointcept v1.5.2, torch-pointcloud's ``legacy=True``).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        grid_size: float = 0.02,
        order: Sequence[str] = ("z", "z-trans", "hilbert", "hilbert-trans"),
        stride: Sequence[int] = (2, 2, 2, 2),
        enc_depths: Sequence[int] = (2, 2, 2, 6, 2),
        enc_channels: Sequence[int] = (32, 64, 128, 256, 512),
        enc_num_heads: Sequence[int] = (2, 4, 8, 16, 32),
        enc_patch_size: Sequence[int] = (1024, 1024, 1024, 1024, 1024),
        dec_depths: Sequence[int] = (2, 2, 2, 2),
        dec_channels: Sequence[int] = (64, 64, 128, 256),
        dec_num_heads: Sequence[int] = (4, 4, 8, 16),
        dec_patch_size: Sequence[int] = (1024, 1024, 1024, 1024),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        drop_path: float = 0.3,
        shuffle_orders: bool = True,
        cls_mode: bool = False,
        cls_head_channels: Sequence[int] = (256, 128),
        cls_dropout: float = 0.5,
        embed_kernel_size: int = 5,
        serialization_depth: int | None = None,
        xcpe_legacy: bool = False,
    ) -> None:
        super().__init__()
        if grid_size <= 0:
            raise ValueError(f"grid_size must be positive, got {grid_size}")
        if serialization_depth is not None and not 1 <= serialization_depth <= MAX_DEPTH:
            raise ValueError(f"serialization_depth must be None (from the batch) or an int in [1, {MAX_DEPTH}], "
                             f"got {serialization_depth!r}")
        self.order = (order,) if isinstance(order, str) else tuple(order)
        bad = [o for o in self.order if o not in ORDERS]
        if bad or not self.order:
            raise ValueError(f"order entries must be among {ORDERS}, got {self.order}")
        ns = len(tuple(enc_depths))
        enc_depths = _tuple(enc_depths, ns, "enc_depths")
        enc_channels = _tuple(enc_channels, ns, "enc_channels")
        enc_num_heads = _tuple(enc_num_heads, ns, "enc_num_heads")
        enc_patch_size = _tuple(enc_patch_size, ns, "enc_patch_size")
        self.stride = _tuple(stride, ns - 1, "stride")
        bad_stride = [x for x in self.stride if int(x) < 2 or int(x) & (int(x) - 1)]
        if bad_stride:
            raise ValueError(f"stride entries must be powers of two >= 2 (serialized pooling shifts the curve "
                             f"codes by 3 bits per halving, as in Pointcept), got {self.stride}")
        self.serialization_depth = serialization_depth
        self.xcpe_legacy = bool(xcpe_legacy)
        self.in_channels, self.num_classes = in_channels, num_classes
        self.grid_size = float(grid_size)
        self.shuffle_orders = shuffle_orders
        self.cls_mode = cls_mode
        self.num_stages = ns

        self.embed_conv = SparseConv3d(in_channels, enc_channels[0], embed_kernel_size, bias=False)
        self.embed_norm = nn.BatchNorm1d(enc_channels[0], eps=1e-3, momentum=0.01)
        self.embed_act = nn.GELU()

        rates = torch.linspace(0, drop_path, sum(enc_depths)).tolist()
        self.down = nn.ModuleList()
        self.enc = nn.ModuleList()
        for s in range(ns):
            if s > 0:
                self.down.append(GridPooling(enc_channels[s - 1], enc_channels[s], int(self.stride[s - 1])))
            r = rates[sum(enc_depths[:s]) : sum(enc_depths[: s + 1])]
            self.enc.append(nn.ModuleList(
                Block(enc_channels[s], enc_num_heads[s], enc_patch_size[s], i % len(self.order), mlp_ratio,
                      qkv_bias, attn_drop, proj_drop, r[i])
                for i in range(enc_depths[s])
            ))

        if cls_mode:
            self.up = nn.ModuleList()
            self.dec = nn.ModuleList()
            layers: list[nn.Module] = []
            c = enc_channels[-1]
            for h in cls_head_channels:
                layers += [nn.Linear(c, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True), nn.Dropout(cls_dropout)]
                c = h
            layers.append(nn.Linear(c, num_classes))
            self.head = nn.Sequential(*layers)
            self.out_channels = enc_channels[-1]
        else:
            dec_depths = _tuple(dec_depths, ns - 1, "dec_depths")
            dec_channels = _tuple(dec_channels, ns - 1, "dec_channels")
            dec_num_heads = _tuple(dec_num_heads, ns - 1, "dec_num_heads")
            dec_patch_size = _tuple(dec_patch_size, ns - 1, "dec_patch_size")
            rates = torch.linspace(0, drop_path, sum(dec_depths)).tolist()
            chans = list(dec_channels) + [enc_channels[-1]]
            self.up = nn.ModuleList()
            self.dec = nn.ModuleList()
            for s in range(ns - 1):  # index s = decoder stage producing level s
                r = rates[sum(dec_depths[:s]) : sum(dec_depths[: s + 1])][::-1]
                self.up.append(GridUnpooling(chans[s + 1], enc_channels[s], chans[s]))
                self.dec.append(nn.ModuleList(
                    Block(chans[s], dec_num_heads[s], dec_patch_size[s], i % len(self.order), mlp_ratio,
                          qkv_bias, attn_drop, proj_drop, r[i])
                    for i in range(dec_depths[s])
                ))
            self.head = nn.Linear(chans[0], num_classes)
            self.out_channels = chans[0]

    # -- serialization --------------------------------------------------------------------------------------

    def _order_names(self, levels: int) -> list[list[str]]:
        """The curves of each of ``levels`` levels: ``order``, re-permuted at every level when shuffling."""
        names, out = list(self.order), []
        # Pointcept permutes the code list at every serialization, in eval too. One randperm per level in level
        # order (the RNG stream of a per-level draw), read together: one host copy for all levels.
        perms = torch.stack([torch.randperm(len(names)) for _ in range(levels)]).tolist() if self.shuffle_orders \
            else None
        for lv in range(levels):
            if perms is not None:
                names = [names[i] for i in perms[lv]]
            out.append(names)
        return out

    # -- forward --------------------------------------------------------------------------------------------

    def levels(self, batch: PointBatch) -> tuple[GridPartition, list[_Level]]:
        """The input voxel map and every level's voxels, curve depth and curve list (geometry only).

        Level 0 holds the input voxels (per-cloud anchored grid: each cloud's smallest voxel coordinate is 0);
        level s the cells of the s-th pooling, with ``parent`` mapping level s - 1 onto them. With
        ``shuffle_orders`` this draws one ``torch.randperm`` per level, in level order. All levels come from
        one host read (``ops.voxel_levels``: pooling cells are floor divisions of the input grid), and the
        convolution maps of every level from one more (``ops.kernel_maps``).
        """
        vl = voxel_levels(batch.coord, self.grid_size, batch.offset, [int(x) for x in self.stride], anchor=True,
                          validate=False)
        top = max(vl[0].hi) if vl[0].num_cells else 0
        depth = self.serialization_depth
        if depth is None:
            depth = (top + 1).bit_length() if vl[0].num_cells else 1
            if depth > MAX_DEPTH:
                raise ValueError(
                    f"PTv3 serialization: the largest grid coordinate {top} needs {depth} bits per axis, "
                    f"more than {MAX_DEPTH}; use a coarser grid_size (now {self.grid_size}) or crop the scene")
        elif top >= 1 << depth:  # a fixed depth must hold the input grid (the levels' serialize skips the check)
            raise ValueError(
                f"PTv3 serialization: grid_coord values must be < 2**depth = {1 << depth} (depth={depth}), got "
                f"maximum {top}; use a coarser grid_size (now {self.grid_size}) or a larger serialization_depth")
        names = self._order_names(len(vl))
        parts = [GridPartition(lv.cells, lv.inverse, lv.counts, lv.offset) for lv in vl]
        out: list[_Level] = []
        for s, lv in enumerate(vl):
            if s:
                depth = _pooled_depth(depth, int(self.stride[s - 1]))
            level = _Level(lv.cells[:, 1:], lv.offset, names[s], parts[s] if s else None, depth=depth,
                           lengths=lv.lengths)
            level._convs.coords[1] = lv.cells
            level._convs.num_clouds = len(lv.lengths)
            out.append(level)
        # every level's xCPE map (and the stem's) in one read; decoder blocks reuse their level's map
        keys = [(0, int(self.embed_conv.kernel_size))] if self.embed_conv.kernel_size > 1 else []
        keys += [(s, int(blocks[0].cpe_conv.kernel_size)) for s, blocks in enumerate(self.enc) if len(blocks)]
        keys += [(s, int(blocks[0].cpe_conv.kernel_size)) for s, blocks in enumerate(self.dec) if len(blocks)]
        keys = [(s, k) for s, k in dict.fromkeys(keys) if (1, 1, k, 1) not in out[s]._convs.kernel_maps]
        maps = kernel_maps([(vl[s].cells, vl[s].cells, k, 1, 1) for s, k in keys], validate=False)
        for (s, k), km in zip(keys, maps, strict=True):
            out[s]._convs.kernel_maps[(1, 1, k, 1)] = km
        return parts[0], out

    def forward_features(self, batch: PointBatch) -> Tensor:
        """Per-point features [N, out_channels] (segmentation) or per-cloud features [B, out_channels] (cls)."""
        batch = model_input(self, batch)
        part, levels = self.levels(batch)
        feat = segment_mean(batch.feat, part)
        feat = self.embed_act(self.embed_norm(self.embed_conv(levels[0].sparse(feat)).feats))
        skips = []
        for s in range(self.num_stages):
            if s > 0:
                skips.append(feat)
                feat = self.down[s - 1](feat, levels[s].parent)
            feat = self._stage(self.enc[s], feat, levels[s], None)
        if self.cls_mode:
            lvl = levels[-1]
            cloud = offset2batch(lvl.offset, feat.shape[0])
            return voxel_pool(feat, cloud, lvl.offset.numel(), reduce="mean", validate=False)
        for s in reversed(range(self.num_stages - 1)):
            feat, seed = self.up[s](feat, skips[s], levels[s + 1].parent)
            feat = self._stage(self.dec[s], feat, levels[s], seed)
        return feat[part.inverse]

    def _stage(self, blocks: nn.ModuleList, feat: Tensor, level: _Level, seed: Tensor | None) -> Tensor:
        """The blocks of one stage; the first xCPE convolves ``seed`` (or ``feat``), the next ones the previous
        block's output, or its MLP branch with ``xcpe_legacy``."""
        carry = seed
        for blk in blocks:
            feat, branch = blk(feat, level, carry, return_mlp=True)
            carry = branch if self.xcpe_legacy else None
        return feat

    def forward(self, batch: PointBatch) -> Tensor:
        """Logits [N, num_classes] in input point order (segmentation) or [B, num_classes] (classification)."""
        return self.head(self.forward_features(batch))
