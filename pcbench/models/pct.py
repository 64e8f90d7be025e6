"""PCT: Point Cloud Transformer (Guo et al., Computational Visual Media 2021), classification and segmentation.

Classification: point embedding (two linear-BN-ReLU), neighbour embedding (two sample-and-group stages: FPS,
kNN, shared MLP on ``[f_j - f_c, f_c]``, max-pool), four stacked offset-attention layers whose outputs are
concatenated, a fusion layer to 1024 channels, global max-pooling and an MLP head.
Segmentation (the official part-segmentation network without the category input): point embedding at full
resolution, four offset-attention layers, fusion to 1024 channels, per-point features concatenated with the
cloud's max and mean features, and a per-point MLP head.

Offset attention: ``A = softmax_rows(Q K^T)`` with Q and K sharing one projection (as in the official code),
then every column is L1-normalised (``A_ij / sum_i A_ij``), ``x_r = A^T V`` and the layer outputs
``x + ReLU(BN(Linear(x - x_r)))``.

Design notes:
- Attention is computed per cloud in query chunks: each chunk adds its column sums and its ``A^T V`` share, so
  no ``n x n`` matrix is ever whole; under autograd large chunks are checkpointed (recomputed in backward).
  Ragged batches are padded per chunk and masked, so a cloud gives the same output alone or batched.
- The first layer of each neighbour-embedding MLP is split and applied to points before grouping
  (``W [f_j - f_c; f_c] = W_1 f_j + (W_2 - W_1) f_c``); the seg head's first layer is split into a per-point
  and a per-cloud part so the broadcast global features are never multiplied per point.
- Each cloud is put in canonical (lexicographic) order first, so FPS and the output ignore input order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pcbench.ops import PointBatch, farthest_point_sample, knn, sample_offset
from pcbench.ops.batch import length_bounds, offset2batch, offset2lengths, offset2start

from .heads import ClassifierMixin, MLPHead
from .layers import BatchNormReLUMax, PointBatchNorm, canonical_order, cloud_max, cloud_mean
from .layers.checks import model_input

__all__ = [
    "NeighborEmbedding",
    "OffsetAttention",
    "PCTCls",
    "PCTSeg",
]

_CHUNK_ELEMS = 1 << 24  # attention entries per chunk (64 MiB in float32)
_CHECKPOINT_ELEMS = 1 << 22  # above this many entries per chunk, recompute the chunk in backward


# --------------------------------------------------------------------------------------------- blocks
def _chunk_attention(q: Tensor, v: Tensor, q_chunk: Tensor, v_chunk: Tensor, key_mask: Tensor | None,
                     row_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Column sums [B, L] and ``A^T V`` share [B, L, C] of the query rows in one chunk."""
    energy = torch.bmm(q_chunk, q.transpose(1, 2))  # [B, c, L]
    if key_mask is not None:
        energy = energy.masked_fill(~key_mask.unsqueeze(1), float("-inf"))
    att = torch.softmax(energy, dim=-1)
    if row_mask is not None:
        att = att * row_mask.unsqueeze(-1).to(att.dtype)
    return att.sum(1), torch.bmm(att.transpose(1, 2), v_chunk)


def offset_attention_aggregate(q: Tensor, v: Tensor, offset: Tensor) -> Tensor:
    """``x_r`` of offset attention per cloud: ``x_r[j] = sum_i A_ij v_i / (1e-9 + sum_i A_ij)``, packed [N, C].

    ``A = softmax_j(q_i . q_j)`` within each cloud of the packed ``q [N, c]``, ``v [N, C]``.
    """
    lengths = offset2lengths(offset)
    b = lengths.numel()
    if q.shape[0] == 0:
        return v.new_zeros(v.shape)
    n_min, n_max = length_bounds(offset)[0]  # read once per offset, shared by the layers of the stack
    ragged = n_min != n_max
    if ragged:  # pad to [B, L, C]; padded keys are masked, padded query rows contribute nothing
        pos = torch.arange(q.shape[0], device=q.device) - offset2start(offset)[offset2batch(offset, q.shape[0])]
        rows = offset2batch(offset, q.shape[0]) * n_max + pos
        qp = q.new_zeros(b * n_max, q.shape[1]).index_copy_(0, rows, q).view(b, n_max, -1)
        vp = v.new_zeros(b * n_max, v.shape[1]).index_copy_(0, rows, v).view(b, n_max, -1)
        mask = torch.arange(n_max, device=q.device).unsqueeze(0) < lengths.unsqueeze(1)
    else:
        qp, vp, mask = q.view(b, n_max, -1), v.view(b, n_max, -1), None
    step = max(1, _CHUNK_ELEMS // max(1, b * n_max))
    col = qp.new_zeros(b, n_max)
    agg = vp.new_zeros(b, n_max, vp.shape[2])
    use_ckpt = torch.is_grad_enabled() and (q.requires_grad or v.requires_grad)
    for s in range(0, n_max, step):
        e = min(n_max, s + step)
        args = (qp, vp, qp[:, s:e], vp[:, s:e], mask, None if mask is None else mask[:, s:e])
        if use_ckpt and b * (e - s) * n_max > _CHECKPOINT_ELEMS:
            c, a = checkpoint(_chunk_attention, *args, use_reentrant=False)
        else:
            c, a = _chunk_attention(*args)
        col = col + c
        agg = agg + a
    out = agg / (1e-9 + col.unsqueeze(-1))
    return out.view(b * n_max, -1)[rows] if ragged else out.reshape(q.shape[0], -1)


class OffsetAttention(nn.Module):
    """Offset-attention layer (official ``SA_Layer``): ``x + ReLU(BN(Linear(x - x_r)))``.

    Args:
        channels: feature channels C; queries and keys share one ``C -> C/4`` projection without bias.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.qk = nn.Linear(channels, channels // 4, bias=False)
        self.v = nn.Linear(channels, channels)
        self.trans = nn.Linear(channels, channels)
        self.norm = PointBatchNorm(channels)

    def forward(self, x: Tensor, offset: Tensor) -> Tensor:
        x_r = offset_attention_aggregate(self.qk(x), self.v(x), offset)
        return x + F.relu(self.norm(self.trans(x - x_r)), inplace=True)


class NeighborEmbedding(nn.Module):
    """Sample-and-group stage: FPS centres, kNN, two linear-BN-ReLU on ``[f_j - f_c, f_c]``, max-pool.

    Args:
        in_channels: incoming feature channels C (the MLP sees 2C).
        out_channels: output channels.
        num_samples: centres per cloud.
        k: neighbours per centre.
    """

    def __init__(self, in_channels: int, out_channels: int, num_samples: int, k: int = 32) -> None:
        super().__init__()
        self.num_samples, self.k, self.in_channels = num_samples, k, in_channels
        self.linear1 = nn.Linear(2 * in_channels, out_channels, bias=False)
        self.bn1 = PointBatchNorm(out_channels)
        self.linear2 = nn.Linear(out_channels, out_channels, bias=False)
        self.bn2 = BatchNormReLUMax(out_channels)  # BN + ReLU + max over the k neighbours

    def forward(self, xyz: Tensor, feat: Tensor, offset: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(centres [M, 3], features [M, out_channels], centre offsets [B])."""
        sel = farthest_point_sample(xyz, offset, n=self.num_samples, validate=False)
        new_offset = sample_offset(offset, n=self.num_samples, validate=False)
        centres = xyz[sel]
        idx, _ = knn(centres, xyz, self.k, new_offset, offset, validate=False)
        idx = torch.where(idx < 0, idx[:, :1], idx)  # duplicates of the nearest: neutral under max-pool
        w1, w2 = self.linear1.weight[:, : self.in_channels], self.linear1.weight[:, self.in_channels:]
        m, k = idx.shape
        # index_select of the flat indices is several times faster on CPU than advanced indexing with [M, k];
        # _unsafe_view keeps the in-place add off autograd's view tracking (see PointBatchNorm.forward).
        h = torch.ops.aten._unsafe_view(F.linear(feat, w1).index_select(0, idx.view(-1)), (m, k, w1.shape[0]))
        # two products rather than one with (w2 - w1): weight arithmetic breaks torchao's int8 weight tensors
        centre = feat[sel]
        h = h.add_((F.linear(centre, w2) - F.linear(centre, w1)).unsqueeze(1))
        h = F.relu(self.bn1(h), inplace=True)
        return centres, self.bn2(self.linear2(h)), new_offset


class _AttentionStack(nn.Module):
    """Optionally two linear-BN-ReLU layers (classifier only), then ``depth`` offset-attention layers whose
    outputs are concatenated."""

    def __init__(self, channels: int, depth: int, pre: bool = True) -> None:
        super().__init__()
        self.pre = nn.Sequential(nn.Linear(channels, channels, bias=False), PointBatchNorm(channels),
                                 nn.ReLU(inplace=True), nn.Linear(channels, channels, bias=False),
                                 PointBatchNorm(channels), nn.ReLU(inplace=True)) if pre else nn.Identity()
        self.layers = nn.ModuleList(OffsetAttention(channels) for _ in range(depth))

    def forward(self, x: Tensor, offset: Tensor) -> Tensor:
        x = self.pre(x)
        outs = []
        for layer in self.layers:
            x = layer(x, offset)
            outs.append(x)
        return torch.cat(outs, 1)


# --------------------------------------------------------------------------------------------- models
class PCTCls(ClassifierMixin, nn.Module):
    """PCT classifier with neighbour embedding (the paper's full "PCT").

    Args:
        in_channels: per-point feature channels (0 = xyz only, as in the paper); xyz is always prepended.
        num_classes: number of classes.
        embed_channels: widths of the point embedding (64) and the two neighbour embeddings (128, 256).
        num_samples: centres of the two sample-and-group stages (512, 256).
        k: neighbours per centre (32).
        depth: offset-attention layers (4).
        fuse_channels: width of the fusion layer (1024).
        head_hidden: classifier hidden widths (512, 256).
        dropout: classifier dropout (0.5).
        head_negative_slope: LeakyReLU slope of the classifier's hidden layers: 0.2 in the PyTorch port
            (Strawberry-Eat-Mango/PCT_Pytorch), 0.0 (ReLU) in the official Jittor code.
    """

    def __init__(self, in_channels: int, num_classes: int, embed_channels: Sequence[int] = (64, 128, 256),
                 num_samples: Sequence[int] = (512, 256), k: int = 32, depth: int = 4, fuse_channels: int = 1024,
                 head_hidden: Sequence[int] = (512, 256), dropout: float = 0.5,
                 head_negative_slope: float = 0.2) -> None:
        super().__init__()
        if len(embed_channels) != 3 or len(num_samples) != 2:
            raise ValueError(f"embed_channels needs 3 widths and num_samples 2 counts, got {list(embed_channels)} "
                             f"and {list(num_samples)}")
        c0, c1, c2 = embed_channels
        self.in_channels = in_channels
        self.embed = nn.Sequential(nn.Linear(3 + in_channels, c0, bias=False), PointBatchNorm(c0),
                                   nn.ReLU(inplace=True), nn.Linear(c0, c0, bias=False), PointBatchNorm(c0),
                                   nn.ReLU(inplace=True))
        self.group1 = NeighborEmbedding(c0, c1, num_samples[0], k)
        self.group2 = NeighborEmbedding(c1, c2, num_samples[1], k)
        self.attention = _AttentionStack(c2, depth)
        self.fuse = nn.Sequential(nn.Linear(c2 * depth + c2, fuse_channels, bias=False),
                                  PointBatchNorm(fuse_channels), nn.LeakyReLU(0.2, inplace=True))
        self.num_features = fuse_channels
        self.head = MLPHead(fuse_channels, head_hidden, num_classes, dropout,
                            hidden_bias=[False] + [True] * (len(head_hidden) - 1), negative_slope=head_negative_slope)

    def forward_features(self, batch: PointBatch) -> Tensor:
        """Max-pooled feature per cloud [B, fuse_channels]."""
        batch = model_input(self, batch)
        perm = canonical_order(batch.coord, batch.offset)
        xyz = batch.coord[perm]
        x = self.embed(torch.cat([xyz, batch.feat[perm]], 1))
        xyz, x, offset = self.group1(xyz, x, batch.offset)
        xyz, x, offset = self.group2(xyz, x, offset)
        x = self.fuse(torch.cat([self.attention(x, offset), x], 1))
        return cloud_max(x, offset)

    def forward(self, batch: PointBatch) -> Tensor:
        """Class logits [B, num_classes]."""
        return self.head(self.forward_features(batch))


class PCTSeg(ClassifierMixin, nn.Module):
    """PCT segmentation network (official part-segmentation architecture, no category input).

    Args:
        in_channels: per-point feature channels; xyz is always prepended.
        num_classes: number of classes.
        channels: width of the point embedding and the attention layers (128).
        depth: offset-attention layers (4).
        fuse_channels: width of the fusion layer (1024); the head sees 3 x fuse_channels.
        head_hidden: per-point head hidden widths (512, 256).
        dropout: dropout after the first head layer (0.5).
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 128, depth: int = 4,
                 fuse_channels: int = 1024, head_hidden: Sequence[int] = (512, 256), dropout: float = 0.5) -> None:
        super().__init__()
        if len(head_hidden) < 1:
            raise ValueError(f"head_hidden needs at least one width, got {list(head_hidden)}")
        self.in_channels, self.fuse_channels = in_channels, fuse_channels
        self.embed = nn.Sequential(nn.Linear(3 + in_channels, channels, bias=False), PointBatchNorm(channels),
                                   nn.ReLU(inplace=True), nn.Linear(channels, channels, bias=False),
                                   PointBatchNorm(channels), nn.ReLU(inplace=True))
        self.attention = _AttentionStack(channels, depth, pre=False)
        self.fuse = nn.Sequential(nn.Linear(channels * depth, fuse_channels, bias=False),
                                  PointBatchNorm(fuse_channels), nn.LeakyReLU(0.2, inplace=True))
        self.num_features = 3 * fuse_channels
        h0 = head_hidden[0]
        self.head_first = nn.Linear(3 * fuse_channels, h0)  # split at run time into per-point / per-cloud parts
        self.head_norm = PointBatchNorm(h0)
        self.head_dropout = nn.Dropout(dropout)
        self.head = MLPHead(h0, head_hidden[1:], num_classes, dropout=0.0)

    def _parts(self, batch: PointBatch) -> tuple[Tensor, Tensor, Tensor]:
        """(perm, per-point fused features [N, F] in canonical order, per-cloud [max, mean] [B, 2F])."""
        batch = model_input(self, batch)
        perm = canonical_order(batch.coord, batch.offset)
        x = self.embed(torch.cat([batch.coord[perm], batch.feat[perm]], 1))
        x = self.fuse(self.attention(x, batch.offset))
        return perm, x, torch.cat([cloud_max(x, batch.offset), cloud_mean(x, batch.offset)], 1)

    def forward_features(self, batch: PointBatch) -> Tensor:
        """Per-point features [N, 3 * fuse_channels] (own, cloud max, cloud mean) in input order."""
        perm, x, g = self._parts(batch)
        feat = torch.cat([x, g[offset2batch(batch.offset, x.shape[0])]], 1)
        return torch.empty_like(feat).index_copy_(0, perm, feat)

    def _head(self, h: Tensor) -> Tensor:
        return self.head(self.head_dropout(F.relu(self.head_norm(h), inplace=True)))

    def forward(self, batch: PointBatch) -> Tensor:
        """Per-point logits [N, num_classes] in input order (equals the head applied to ``forward_features``)."""
        perm, x, g = self._parts(batch)
        f = self.fuse_channels
        w = self.head_first.weight
        h = F.linear(x, w[:, :f], self.head_first.bias) + F.linear(g, w[:, f:])[offset2batch(batch.offset, x.shape[0])]
        out = self._head(h)
        return torch.empty_like(out).index_copy_(0, perm, out)

    def forward_head(self, features: Tensor) -> Tensor:
        """Logits from ``forward_features`` output (the unsplit head, for checks and feature reuse)."""
        return self._head(self.head_first(features))

    head_logits = forward_head  # the name this method had before the shared ClassifierMixin API
