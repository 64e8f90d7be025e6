"""Point Transformer (Zhao et al., ICCV 2021): vector self-attention over kNN neighbourhoods.

A point transformer layer attends from every point to its k nearest neighbours with *vector* attention:
``y_i = sum_j softmax_j(gamma(q_i - k_j + delta_ij)) * (v_j + delta_ij)`` where ``delta_ij`` is an MLP of the
relative position and ``gamma`` an MLP producing one weight per channel group ("share_planes": channels are split
in ``share_planes`` groups of ``C / share_planes`` and every group shares the weight vector), as in the official
code. Transition down = FPS + kNN + linear + max-pool; transition up = linear + IDW interpolation + skip.

Design notes (the reference network, arranged for CPU speed):
- kNN of a stage is computed once and shared by all blocks of that stage (the points do not move).
- q, k, v are projected on points before gathering; the transition-down linear is split so its
  per-point part runs before gathering too (``W [x_j - c; f_j] = W_x x_j + W_f f_j - W_x c``).
- Missing neighbours (cloud smaller than k) are masked out of the softmax rather than duplicated.
- Each cloud is put in canonical (lexicographic) order first, so FPS and the output ignore input order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pcbench.ops import PointBatch, farthest_point_sample, knn, sample_offset
from pcbench.ops.batch import length_bounds, offset2batch
from pcbench.ops.interpolate import interpolate

from .heads import ClassifierMixin, MLPHead
from .layers import BatchNormReLUMax, PointBatchNorm, canonical_order, cloud_mean
from .layers.checks import model_input

__all__ = [
    "PointTransformerBlock",
    "PointTransformerCls",
    "PointTransformerLayer",
    "PointTransformerSeg",
    "TransitionDown",
    "TransitionUp",
]


# --------------------------------------------------------------------------------------------- blocks
@dataclass
class _Level:
    """Points of one resolution and their kNN graph (computed once, reused by every block of the level)."""

    xyz: Tensor
    offset: Tensor
    idx: Tensor | None = None  # [n, k] neighbour rows, -1 where missing
    rel: Tensor | None = None  # [n, k, 3] neighbour minus centre
    valid: Tensor | None = None  # [n, k] bool, None when every neighbour exists

    def neighbours(self, k: int) -> _Level:
        if self.idx is None or self.idx.shape[1] != k:
            idx, _ = knn(self.xyz, self.xyz, k, self.offset, self.offset, validate=False)
            valid = idx >= 0
            # A cloud smaller than k leaves -1 slots; the mask is dropped when none does (read from the level's
            # size bounds: no host read beyond the one per level).
            self.valid = None if length_bounds(self.offset)[0][0] >= k else valid
            self.idx = idx.clamp_min(0) if self.valid is not None else idx
            self.rel = self.xyz[self.idx] - self.xyz.unsqueeze(1)
        return self


class PointTransformerLayer(nn.Module):
    """Vector self-attention over the k nearest neighbours (official ``PointTransformerLayer``).

    Args:
        channels: input = output channels C.
        share_planes: channel groups sharing one attention weight (C must be divisible by it).
        k: neighbours per point.
    """

    def __init__(self, channels: int, share_planes: int = 8, k: int = 16) -> None:
        super().__init__()
        if channels % share_planes:
            raise ValueError(f"channels ({channels}) must be divisible by share_planes ({share_planes})")
        self.channels, self.share_planes, self.k = channels, share_planes, k
        self.linear_q = nn.Linear(channels, channels)
        self.linear_k = nn.Linear(channels, channels)
        self.linear_v = nn.Linear(channels, channels)
        self.linear_p = nn.Sequential(nn.Linear(3, 3), PointBatchNorm(3), nn.ReLU(inplace=True),
                                      nn.Linear(3, channels))
        g = channels // share_planes
        self.linear_w = nn.Sequential(PointBatchNorm(channels), nn.ReLU(inplace=True), nn.Linear(channels, g),
                                      PointBatchNorm(g), nn.ReLU(inplace=True), nn.Linear(g, g))

    def forward(self, x: Tensor, level: _Level) -> Tensor:
        """Attend from every point to its neighbours: ``x [n, C] -> [n, C]``."""
        level.neighbours(self.k)
        idx = level.idx
        q, kk, v = self.linear_q(x), self.linear_k(x), self.linear_v(x)
        pos = self.linear_p(level.rel)  # [n, k, C]
        w = kk[idx].sub_(q.unsqueeze(1)).add_(pos)
        w = self.linear_w(w)  # [n, k, C / share_planes]
        if level.valid is not None:
            w = w.masked_fill(~level.valid.unsqueeze(-1), float("-inf"))
        w = torch.softmax(w, dim=1)
        n, k, c = pos.shape
        vals = v[idx].add_(pos).view(n, k, self.share_planes, c // self.share_planes)
        # Multiply-and-sum beats einsum here (it lowers to n tiny batched matmuls): 2-3x on CPU.
        return (vals * w.unsqueeze(2)).sum(1).reshape(n, c)


class PointTransformerBlock(nn.Module):
    """Residual bottleneck: linear-BN-ReLU, point transformer layer-BN-ReLU, linear-BN, add, ReLU."""

    def __init__(self, channels: int, share_planes: int = 8, k: int = 16) -> None:
        super().__init__()
        self.linear1 = nn.Linear(channels, channels, bias=False)
        self.bn1 = PointBatchNorm(channels)
        self.transformer = PointTransformerLayer(channels, share_planes, k)
        self.bn2 = PointBatchNorm(channels)
        self.linear3 = nn.Linear(channels, channels, bias=False)
        self.bn3 = PointBatchNorm(channels)

    def forward(self, x: Tensor, level: _Level) -> Tensor:
        h = F.relu(self.bn1(self.linear1(x)), inplace=True)
        h = F.relu(self.bn2(self.transformer(h, level)), inplace=True)
        return F.relu(self.bn3(self.linear3(h)) + x)


class TransitionDown(nn.Module):
    """Stride 1: linear-BN-ReLU. Stride s > 1: FPS to 1/s of each cloud, kNN, linear-BN-ReLU on
    ``[xyz_j - c, f_j]`` and max-pool over the k neighbours."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, k: int = 16) -> None:
        super().__init__()
        self.stride, self.k = stride, k
        self.linear = nn.Linear(in_channels + (3 if stride > 1 else 0), out_channels, bias=False)
        # With stride > 1 the BN + ReLU + max over the k neighbours runs on the pooled rows only.
        self.bn = BatchNormReLUMax(out_channels) if stride > 1 else PointBatchNorm(out_channels)

    def forward(self, x: Tensor, level: _Level) -> tuple[Tensor, _Level]:
        if self.stride == 1:
            return F.relu(self.bn(self.linear(x)), inplace=True), level
        ratio = 1.0 / self.stride
        sel = farthest_point_sample(level.xyz, level.offset, ratio=ratio, validate=False)
        new = _Level(level.xyz[sel], sample_offset(level.offset, ratio=ratio, validate=False))
        idx, _ = knn(new.xyz, level.xyz, self.k, new.offset, level.offset, validate=False)
        idx = torch.where(idx < 0, idx[:, :1], idx)  # duplicates of the nearest: neutral under max-pool
        per_point = self.linear(torch.cat([level.xyz, x], 1))
        h = per_point[idx].sub_(F.linear(new.xyz, self.linear.weight[:, :3]).unsqueeze(1))
        return self.bn(h), new


class TransitionUp(nn.Module):
    """Decoder fusion. With ``out_channels``: ``linear1(skip) + interpolate(linear2(coarse))``.
    Without (the head of the decoder): concatenate every point with an MLP of its cloud's mean feature."""

    def __init__(self, in_channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        self.is_head = out_channels is None
        if out_channels is None:
            self.linear1 = nn.Sequential(nn.Linear(2 * in_channels, in_channels), PointBatchNorm(in_channels),
                                         nn.ReLU(inplace=True))
            self.linear2 = nn.Sequential(nn.Linear(in_channels, in_channels), nn.ReLU(inplace=True))
        else:
            self.linear1 = nn.Sequential(nn.Linear(out_channels, out_channels), PointBatchNorm(out_channels),
                                         nn.ReLU(inplace=True))
            self.linear2 = nn.Sequential(nn.Linear(in_channels, out_channels), PointBatchNorm(out_channels),
                                         nn.ReLU(inplace=True))

    def forward(self, x: Tensor, level: _Level, coarse_x: Tensor | None = None,
                coarse: _Level | None = None) -> Tensor:
        if self.is_head:
            g = self.linear2(cloud_mean(x, level.offset))[offset2batch(level.offset, x.shape[0])]
            return self.linear1(torch.cat([x, g], 1))
        up = interpolate(level.xyz, coarse.xyz, self.linear2(coarse_x), 3, level.offset, coarse.offset, validate=False)
        return self.linear1(x) + up


class _Stage(nn.Module):
    """Transition down followed by ``depth`` point transformer blocks."""

    def __init__(self, in_channels: int, channels: int, depth: int, stride: int, k: int, share_planes: int,
                 down_k: int) -> None:
        super().__init__()
        self.down = TransitionDown(in_channels, channels, stride, down_k)
        self.blocks = nn.ModuleList(PointTransformerBlock(channels, share_planes, k) for _ in range(depth))

    def forward(self, x: Tensor, level: _Level) -> tuple[Tensor, _Level]:
        x, level = self.down(x, level)
        for blk in self.blocks:
            x = blk(x, level)
        return x, level


class _Encoder(nn.Module):
    def __init__(self, in_channels: int, channels: Sequence[int], depths: Sequence[int], strides: Sequence[int],
                 neighbors: Sequence[int], share_planes: int) -> None:
        super().__init__()
        if not (len(channels) == len(depths) == len(strides) == len(neighbors)):
            raise ValueError("channels, depths, strides and neighbors need one entry per stage, got "
                             f"{list(channels)}, {list(depths)}, {list(strides)}, {list(neighbors)}")
        self.stages = nn.ModuleList()
        c = 3 + in_channels  # the official network feeds [xyz, features] to its first layer
        for ch, d, s, k in zip(channels, depths, strides, neighbors, strict=True):
            # The reference transition down groups with the stage's k (16); stage 1 has stride 1.
            self.stages.append(_Stage(c, ch, d, s, k, share_planes, down_k=k))
            c = ch

    def forward(self, batch: PointBatch) -> tuple[Tensor, list[tuple[Tensor, _Level]]]:
        perm = canonical_order(batch.coord, batch.offset)
        xyz = batch.coord[perm]
        x = torch.cat([xyz, batch.feat[perm]], 1)
        level = _Level(xyz, batch.offset)
        out = []
        for stage in self.stages:
            x, level = stage(x, level)
            out.append((x, level))
        return perm, out


# --------------------------------------------------------------------------------------------- models
class PointTransformerSeg(ClassifierMixin, nn.Module):
    """Point Transformer U-Net for semantic segmentation (official ``PointTransformerSeg``).

    Args:
        in_channels: per-point feature channels (xyz is prepended internally, as in the official code).
        num_classes: number of classes.
        channels: width of each stage (paper: 32, 64, 128, 256, 512).
        depths: point transformer blocks per encoder stage after its transition down (official
            ``[2, 3, 4, 6, 3]`` counts the transition down too, i.e. 1, 2, 3, 5, 2 blocks).
        strides: down-sampling factor of each stage (1, 4, 4, 4, 4).
        neighbors: k of each stage (8, 16, 16, 16, 16).
        share_planes: channel groups sharing one attention weight (8).
        decoder_depths: blocks per decoder stage after its transition up (1 each), coarsest first.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: Sequence[int] = (32, 64, 128, 256, 512),
                 depths: Sequence[int] = (1, 2, 3, 5, 2), strides: Sequence[int] = (1, 4, 4, 4, 4),
                 neighbors: Sequence[int] = (8, 16, 16, 16, 16), share_planes: int = 8,
                 decoder_depths: Sequence[int] = (1, 1, 1, 1, 1)) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.encoder = _Encoder(in_channels, channels, depths, strides, neighbors, share_planes)
        self.up = nn.ModuleList()
        self.dec_blocks = nn.ModuleList()
        n = len(channels)
        if len(decoder_depths) != n:
            raise ValueError(f"decoder_depths needs one entry per stage ({n}), got {list(decoder_depths)}")
        for i in reversed(range(n)):
            self.up.append(TransitionUp(channels[i]) if i == n - 1 else TransitionUp(channels[i + 1], channels[i]))
            self.dec_blocks.append(nn.ModuleList(PointTransformerBlock(channels[i], share_planes, neighbors[i])
                                                 for _ in range(decoder_depths[n - 1 - i])))
        self.num_features = channels[0]
        self.head = MLPHead(channels[0], [channels[0]], num_classes, dropout=0.0)

    def forward_features(self, batch: PointBatch) -> Tensor:
        """Per-point features [N, channels[0]] in input order."""
        batch = model_input(self, batch)
        perm, skips = self.encoder(batch)
        x, level = skips[-1]
        for j, (up, blocks) in enumerate(zip(self.up, self.dec_blocks, strict=True)):
            if j == 0:
                x = up(x, level)
            else:
                fine_x, fine = skips[-1 - j]
                x = up(fine_x, fine, x, level)
                level = fine
            for blk in blocks:
                x = blk(x, level)
        return torch.empty_like(x).index_copy_(0, perm, x)

    def forward(self, batch: PointBatch) -> Tensor:
        """Per-point logits [N, num_classes] in input order."""
        return self.head(self.forward_features(batch))


class PointTransformerCls(ClassifierMixin, nn.Module):
    """Point Transformer classifier: the segmentation encoder, per-cloud mean pooling, MLP head.

    Args:
        in_channels, num_classes, channels, depths, strides, neighbors, share_planes: as in
            ``PointTransformerSeg`` (Pointcept's PointTransformer-Cls50 builds depths 0, 1, 2, 4, 1; a depth
            may be 0: the stage is then its transition down alone).
        head_hidden: hidden widths of the classifier (256, 128).
        dropout: classifier dropout (0.5).
    """

    def __init__(self, in_channels: int, num_classes: int, channels: Sequence[int] = (32, 64, 128, 256, 512),
                 depths: Sequence[int] = (1, 2, 3, 5, 2), strides: Sequence[int] = (1, 4, 4, 4, 4),
                 neighbors: Sequence[int] = (8, 16, 16, 16, 16), share_planes: int = 8,
                 head_hidden: Sequence[int] = (256, 128), dropout: float = 0.5) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.encoder = _Encoder(in_channels, channels, depths, strides, neighbors, share_planes)
        self.num_features = channels[-1]
        self.head = MLPHead(channels[-1], head_hidden, num_classes, dropout)

    def forward_features(self, batch: PointBatch) -> Tensor:
        """Mean-pooled feature per cloud [B, channels[-1]]."""
        batch = model_input(self, batch)
        _, skips = self.encoder(batch)
        x, level = skips[-1]
        return cloud_mean(x, level.offset)

    def forward(self, batch: PointBatch) -> Tensor:
        """Class logits [B, num_classes]."""
        return self.head(self.forward_features(batch))
