"""Point Transformer V2 (Wu et al., NeurIPS 2022) on the pure-torch neighbour core.

Grouped vector attention (GVA) over k nearest neighbours (``ops.knn``): query-key relations
``k_j - q_i`` (optionally multiplied by, and always shifted by, an MLP encoding of ``p_j - p_i``) are
turned into one attention weight per channel group, softmax over the neighbours, and used to average the
(position-shifted) values group by group. Partition-based grid pooling (``ops.voxelize``, per-cloud
anchored grid, max of features, mean of coordinates) and map unpooling through the pooling inverse make
the U-Net. Segmentation voxelizes the input at ``grid_size`` first and returns per-point logits through
that map; classification averages the deepest features per cloud.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pcbench.ops import PointBatch, knn, offset2batch, voxel_pool

from .heads import ClassifierMixin
from .layers.checks import model_input
from .layers.grid_pool import DropPath, GridPartition, grid_partition, segment_mean

__all__ = ["PointTransformerV2"]


# ----------------------------------------------------------------------------------------------------------
# blocks


class RowBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the last (channel) axis of [N, C] or [N, S, C] tensors (statistics over all rows)."""

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return super().forward(x.reshape(-1, x.shape[-1])).view(x.shape)


def _lbr(c_in: int, c_out: int, bias: bool = True) -> nn.Sequential:
    return nn.Sequential(nn.Linear(c_in, c_out, bias=bias), RowBatchNorm(c_out), nn.ReLU(inplace=True))


class GroupedVectorAttention(nn.Module):
    """GVA over neighbour lists: feat [N, C], coord [N, 3], idx [N, S] (-1 = missing) -> [N, C]."""

    def __init__(
        self,
        channels: int,
        groups: int,
        qkv_bias: bool = True,
        pe_multiplier: bool = False,
        pe_bias: bool = True,
        attn_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if channels % groups:
            raise ValueError(f"channels ({channels}) must be divisible by groups ({groups})")
        self.groups = groups
        self.linear_q = _lbr(channels, channels, qkv_bias)
        self.linear_k = _lbr(channels, channels, qkv_bias)
        self.linear_v = nn.Linear(channels, channels, bias=qkv_bias)
        self.pe_mul = nn.Sequential(_lbr(3, channels), nn.Linear(channels, channels)) if pe_multiplier else None
        self.pe_bias = nn.Sequential(_lbr(3, channels), nn.Linear(channels, channels)) if pe_bias else None
        self.weight_encoding = nn.Sequential(_lbr(channels, groups), nn.Linear(groups, groups))
        self.attn_drop = nn.Dropout(attn_drop)

    def forward(self, feat: Tensor, coord: Tensor, idx: Tensor) -> Tensor:
        """If ``idx[i, j] = m`` then point m is the j-th neighbour that point i attends to."""
        n, s = idx.shape
        valid = idx >= 0
        safe = idx.clamp_min(0)
        q, k, v = self.linear_q(feat), self.linear_k(feat), self.linear_v(feat)
        pos = (coord[safe] - coord[:, None, :]) * valid[..., None]
        rel = k[safe] - q[:, None, :]
        v = v[safe]
        if self.pe_mul is not None:
            rel = rel * self.pe_mul(pos)
        if self.pe_bias is not None:
            peb = self.pe_bias(pos)
            rel = rel + peb
            v = v + peb
        w = self.attn_drop(torch.softmax(self.weight_encoding(rel), dim=1))  # [N, S, G]
        # as in the official code, missing neighbours are zeroed after the softmax (no renormalisation)
        w = w * valid[..., None].to(w.dtype)
        c = v.shape[-1]
        out = (v.view(n, s, self.groups, c // self.groups) * w[..., None]).sum(1)
        return out.reshape(n, c)


class Block(nn.Module):
    """Bottleneck residual block around GVA: fc-BN-ReLU, GVA, BN-ReLU, fc-BN, + identity, ReLU."""

    def __init__(self, channels: int, groups: int, qkv_bias: bool = True, pe_multiplier: bool = False,
                 pe_bias: bool = True, attn_drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, channels, bias=False)
        self.norm1 = RowBatchNorm(channels)
        self.attn = GroupedVectorAttention(channels, groups, qkv_bias, pe_multiplier, pe_bias, attn_drop)
        self.norm2 = RowBatchNorm(channels)
        self.fc3 = nn.Linear(channels, channels, bias=False)
        self.norm3 = RowBatchNorm(channels)
        self.act = nn.ReLU(inplace=True)
        self.drop_path = DropPath(drop_path)

    def forward(self, feat: Tensor, coord: Tensor, idx: Tensor) -> Tensor:
        """[N, C] -> [N, C]."""
        x = self.act(self.norm1(self.fc1(feat)))
        x = self.act(self.norm2(self.attn(x, coord, idx)))
        x = self.norm3(self.fc3(x))
        return self.act(feat + self.drop_path(x))


class BlockSequence(nn.Module):
    """``depth`` GVA blocks sharing one kNN neighbourhood (computed once per stage)."""

    def __init__(self, depth: int, channels: int, groups: int, neighbours: int = 16, qkv_bias: bool = True,
                 pe_multiplier: bool = False, pe_bias: bool = True, attn_drop: float = 0.0,
                 drop_path: Sequence[float] | float = 0.0) -> None:
        super().__init__()
        rates = [float(drop_path)] * depth if isinstance(drop_path, float | int) else list(drop_path)
        self.neighbours = neighbours
        self.blocks = nn.ModuleList(
            Block(channels, groups, qkv_bias, pe_multiplier, pe_bias, attn_drop, rates[i]) for i in range(depth)
        )

    def forward(self, feat: Tensor, coord: Tensor, offset: Tensor) -> Tensor:
        """[N, C] -> [N, C]; neighbours are searched within each cloud of ``offset``."""
        if not len(self.blocks):
            return feat
        idx, _ = knn(coord.detach(), coord.detach(), self.neighbours, offset, offset, validate=False)
        for blk in self.blocks:
            feat = blk(feat, coord, idx)
        return feat


class GridPool(nn.Module):
    """Partition-based pooling: fc-BN-ReLU, then per grid cell (anchored at each cloud's minimum) max of
    features and mean of coordinates."""

    def __init__(self, in_channels: int, out_channels: int, grid_size: float) -> None:
        super().__init__()
        if grid_size <= 0:
            raise ValueError(f"grid_size must be positive, got {grid_size}")
        self.grid_size = float(grid_size)
        self.proj = _lbr(in_channels, out_channels, bias=False)

    def forward(self, feat: Tensor, coord: Tensor, offset: Tensor) -> tuple[Tensor, Tensor, GridPartition]:
        """(feat [V, C_out], coord [V, 3], partition) of the pooled points."""
        part = grid_partition(coord.detach(), self.grid_size, offset, relative=True)
        feat = voxel_pool(self.proj(feat), part.inverse, part.num_cells, reduce="max", validate=False)
        return feat, segment_mean(coord, part), part


class UnpoolWithSkip(nn.Module):
    """Map unpooling: fc-BN-ReLU of the coarse features gathered by the pooling map, plus fc-BN-ReLU(skip)."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.proj = _lbr(in_channels, out_channels)
        self.proj_skip = _lbr(skip_channels, out_channels)

    def forward(self, feat: Tensor, skip: Tensor, part: GridPartition) -> Tensor:
        """coarse [V, C_in], skip [N, C_skip] -> [N, C_out]."""
        return self.proj(feat)[part.inverse] + self.proj_skip(skip)


# ----------------------------------------------------------------------------------------------------------
# the model


def _tuple(x: Sequence, n: int, name: str) -> tuple:
    t = tuple(x)
    if len(t) != n:
        raise ValueError(f"{name} must have {n} entries (one per stage), got {len(t)}: {t}")
    return t


class PointTransformerV2(ClassifierMixin, nn.Module):
    """Point Transformer V2 for segmentation ([N, num_classes]) or classification ([B, num_classes]).

    Args:
        in_channels: input feature channels per point.
        num_classes: output classes.
        grid_size: input voxel size (features averaged per voxel, logits mapped back); None = raw points.
        patch_embed_depth, patch_embed_channels, patch_embed_groups, patch_embed_neighbours: stem GVA stage.
        enc_depths, enc_channels, enc_groups, enc_neighbours, grid_sizes: per encoder stage (pooling cell).
        dec_depths, dec_channels, dec_groups, dec_neighbours: per decoder stage (finest first); ignored
            when ``cls_mode``.
        qkv_bias, pe_multiplier, pe_bias, attn_drop: GVA settings.
        drop_path: largest stochastic-depth rate (linear over blocks).
        cls_mode: encoder only + per-cloud mean + MLP head (classification).
        cls_head_channels, cls_dropout: classification head.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        grid_size: float | None = 0.02,
        patch_embed_depth: int = 1,
        patch_embed_channels: int = 48,
        patch_embed_groups: int = 6,
        patch_embed_neighbours: int = 8,
        enc_depths: Sequence[int] = (2, 2, 6, 2),
        enc_channels: Sequence[int] = (96, 192, 384, 512),
        enc_groups: Sequence[int] = (12, 24, 48, 64),
        enc_neighbours: Sequence[int] = (16, 16, 16, 16),
        dec_depths: Sequence[int] = (1, 1, 1, 1),
        dec_channels: Sequence[int] = (48, 96, 192, 384),
        dec_groups: Sequence[int] = (6, 12, 24, 48),
        dec_neighbours: Sequence[int] = (16, 16, 16, 16),
        grid_sizes: Sequence[float] = (0.06, 0.12, 0.24, 0.48),
        qkv_bias: bool = True,
        pe_multiplier: bool = False,
        pe_bias: bool = True,
        attn_drop: float = 0.0,
        drop_path: float = 0.3,
        cls_mode: bool = False,
        cls_head_channels: Sequence[int] = (256, 128),
        cls_dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if grid_size is not None and grid_size <= 0:
            raise ValueError(f"grid_size must be positive or None (no input voxelization), got {grid_size}")
        ns = len(tuple(enc_depths))
        enc_depths = _tuple(enc_depths, ns, "enc_depths")
        enc_channels = _tuple(enc_channels, ns, "enc_channels")
        enc_groups = _tuple(enc_groups, ns, "enc_groups")
        enc_neighbours = _tuple(enc_neighbours, ns, "enc_neighbours")
        grid_sizes = _tuple(grid_sizes, ns, "grid_sizes")
        self.in_channels, self.num_classes = in_channels, num_classes
        self.grid_size = None if grid_size is None else float(grid_size)
        self.cls_mode = cls_mode
        self.num_stages = ns
        gva = dict(qkv_bias=qkv_bias, pe_multiplier=pe_multiplier, pe_bias=pe_bias, attn_drop=attn_drop)

        self.embed_proj = _lbr(in_channels, patch_embed_channels, bias=False)
        self.embed_blocks = BlockSequence(patch_embed_depth, patch_embed_channels, patch_embed_groups,
                                          patch_embed_neighbours, **gva)
        rates = torch.linspace(0, drop_path, sum(enc_depths)).tolist()
        chans = [patch_embed_channels, *enc_channels]
        self.down = nn.ModuleList()
        self.enc = nn.ModuleList()
        for s in range(ns):
            self.down.append(GridPool(chans[s], chans[s + 1], grid_sizes[s]))
            self.enc.append(BlockSequence(enc_depths[s], chans[s + 1], enc_groups[s], enc_neighbours[s], **gva,
                                          drop_path=rates[sum(enc_depths[:s]) : sum(enc_depths[: s + 1])]))
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        if cls_mode:
            layers: list[nn.Module] = []
            c = chans[-1]
            for h in cls_head_channels:
                layers += [nn.Linear(c, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True), nn.Dropout(cls_dropout)]
                c = h
            layers.append(nn.Linear(c, num_classes))
            self.head = nn.Sequential(*layers)
            self.out_channels = chans[-1]
        else:
            dec_depths = _tuple(dec_depths, ns, "dec_depths")
            dec_channels = _tuple(dec_channels, ns, "dec_channels")
            dec_groups = _tuple(dec_groups, ns, "dec_groups")
            dec_neighbours = _tuple(dec_neighbours, ns, "dec_neighbours")
            rates = torch.linspace(0, drop_path, sum(dec_depths)).tolist()
            dchans = [*dec_channels, chans[-1]]
            for s in range(ns):  # decoder s maps level s + 1 back to level s
                self.up.append(UnpoolWithSkip(dchans[s + 1], chans[s], dchans[s]))
                self.dec.append(BlockSequence(dec_depths[s], dchans[s], dec_groups[s], dec_neighbours[s], **gva,
                                              drop_path=rates[sum(dec_depths[:s]) : sum(dec_depths[: s + 1])]))
            self.head = nn.Sequential(_lbr(dchans[0], dchans[0]), nn.Linear(dchans[0], num_classes))
            self.out_channels = dchans[0]

    def forward_features(self, batch: PointBatch) -> Tensor:
        """Per-point features [N, out_channels] (segmentation) or per-cloud features [B, out_channels] (cls)."""
        batch = model_input(self, batch)
        coord, feat, offset = batch.coord, batch.feat, batch.offset.long()
        inp = None
        if self.grid_size is not None:
            inp = grid_partition(coord, self.grid_size, offset, relative=False)
            coord, feat, offset = segment_mean(coord, inp), segment_mean(feat, inp), inp.offset
        feat = self.embed_blocks(self.embed_proj(feat), coord, offset)
        stack = []
        for s in range(self.num_stages):
            stack.append((feat, coord, offset))
            feat, coord, part = self.down[s](feat, coord, offset)
            offset = part.offset
            feat = self.enc[s](feat, coord, offset)
            stack[-1] = (*stack[-1], part)
        if self.cls_mode:
            return voxel_pool(feat, offset2batch(offset, feat.shape[0]), offset.numel(), reduce="mean", validate=False)
        for s in reversed(range(self.num_stages)):
            skip, coord, offset, part = stack[s]
            feat = self.dec[s](self.up[s](feat, skip, part), coord, offset)
        return feat if inp is None else feat[inp.inverse]

    def forward(self, batch: PointBatch) -> Tensor:
        """Logits [N, num_classes] in input point order (segmentation) or [B, num_classes] (classification)."""
        return self.head(self.forward_features(batch))
