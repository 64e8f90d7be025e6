"""PointNet++ (Qi et al., NeurIPS 2017): hierarchical set abstraction, SSG and MSG, classification and segmentation.

A set abstraction (SA) level picks centres by farthest point sampling, gathers each centre's neighbours by ball
query, runs a shared MLP on ``[xyz_j - xyz_centre, f_j]`` and max-pools. Multi-scale grouping (MSG) runs several
(radius, cap, MLP) branches and concatenates them; single-scale grouping (SSG) is the one-branch case. Feature
propagation (FP) interpolates coarse features back to finer points (inverse distance, k=3) and fuses skips.

Design notes (mathematically the reference network, arranged for CPU speed):
- The first linear layer of a branch is applied to points *before* grouping:
  ``W [x_j - c; f_j] + b = (W_x x_j + W_f f_j + b) - W_x c``, so the widest per-neighbour matmul disappears.
- The first FP layer is split the same way and its coarse part applied before interpolating (IDW is linear).
- The last BN + ReLU before each max-pool is applied to the pooled rows only (``BatchNormReLUMax``).
- Grouping (``ball_query_order``): ``"index"`` (default) is the official rule: the first ``nsample`` points of
  the ball in the cloud's point order (charlesq34/pointnet2 ``tf_ops/grouping/tf_grouping_g.cu``), with the
  unused slots filled by the first point found, as that kernel fills them. The filled duplicates go through
  the shared MLP and its BatchNorm statistics like real neighbours, exactly as in the official network, and
  change nothing under the max-pool. Points are used in input order, so FPS starts at each cloud's first point
  (the official kernel's start) and the output depends on the point order as the official network's does; the
  official training shuffles the points of every cloud each batch, which makes the kept points a random subset
  of a fuller ball. ``"distance"`` keeps the nearest ``nsample`` instead (filled with the nearest, the centre
  itself) and first puts each cloud in a canonical (lexicographic) order, so the output ignores point order.
- The padding copies are never materialised: each distinct (centre, neighbour) row goes through the shared MLP
  once and the copies are counted in the BatchNorm statistics (``layers.grouped.CompactGroups``), which gives
  the padded network's outputs, gradients and running statistics at about half the MLP work on object clouds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pcbench.ops import PointBatch, ball_query, farthest_point_sample, sample_offset
from pcbench.ops.ball_query import ORDERS
from pcbench.ops.batch import length_bounds, offset2lengths
from pcbench.ops.interpolate import interpolate

from .heads import ClassifierMixin, MLPHead
from .layers import MLP, BatchNormReLUMax, PointBatchNorm, canonical_order, cloud_max
from .layers.checks import model_input
from .layers.grouped import CompactGroups

__all__ = [
    "FeaturePropagation",
    "GlobalSetAbstraction",
    "PointNet2Cls",
    "PointNet2Seg",
    "SetAbstraction",
]


# --------------------------------------------------------------------------------------------- blocks
class _GroupBranch(nn.Module):
    """One grouping scale: ball query (radius, cap) + shared MLP on [relative xyz, features] + max-pool."""

    def __init__(self, in_channels: int, radius: float, max_neighbors: int, widths: Sequence[int],
                 ball_query_order: str = "index") -> None:
        super().__init__()
        if radius <= 0 or max_neighbors <= 0:
            raise ValueError(f"radius and max_neighbors must be positive, got {radius} and {max_neighbors}")
        if not widths:
            raise ValueError(f"widths must list at least one layer width, got {list(widths)}")
        _check_order(ball_query_order)
        self.radius, self.max_neighbors = float(radius), int(max_neighbors)
        self.ball_query_order = ball_query_order
        ins = [3 + in_channels, *widths[:-1]]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(ins, widths, strict=True))
        self.norms = nn.ModuleList([*(PointBatchNorm(w) for w in widths[:-1]), BatchNormReLUMax(widths[-1])])
        self.out_channels = int(widths[-1])

    def forward(self, xyz: Tensor, feat: Tensor, offset: Tensor, centres: Tensor, centre_offset: Tensor) -> Tensor:
        idx = ball_query(centres, xyz, self.radius, self.max_neighbors, centre_offset, offset,
                         order=self.ball_query_order, validate=False)
        # Centres are points of the support (FPS), so each finds itself and column 0 is never -1; the unused
        # slots stand for copies of column 0 (the official kernel's fill), counted rather than computed.
        groups = CompactGroups.from_ball_query(idx)
        first = self.linears[0]
        per_point = first(torch.cat([xyz, feat], 1))  # [N, C1]
        # negate the product, not the weight: weight arithmetic breaks torchao's int8 weight tensors
        per_centre = F.linear(centres, first.weight[:, :3]).neg_()  # [M, C1]
        h = groups.gather(per_point, per_centre)  # [V, C1] == first([xyz_j - c, f_j]) for each distinct pair
        for linear, norm in zip(self.linears[1:], self.norms[:-1], strict=True):
            h = linear(norm.forward_relu(h, groups.repeats))
        # BN + ReLU + max over each centre's neighbours
        return groups.to_centre_order(self.norms[-1].pool(h, groups.blocks, groups.repeats))


class SetAbstraction(nn.Module):
    """Set abstraction level: FPS centres, then one (SSG) or several (MSG) grouping branches, concatenated.

    Args:
        in_channels: feature channels of the incoming points (relative xyz is added on top).
        radii: ball radius of each branch.
        max_neighbors: neighbour cap (``nsample``) of each branch.
        widths: shared-MLP widths of each branch.
        num_samples: centres per cloud (``npoint``), or
        sample_ratio: centres as a fraction of each cloud (exactly one of the two).
        ball_query_order: which points of a fuller ball are grouped: ``"index"`` (the official first-found
            rule) or ``"distance"`` (the nearest); see ``pcbench.ops.ball_query``.
    """

    def __init__(self, in_channels: int, radii: Sequence[float], max_neighbors: Sequence[int],
                 widths: Sequence[Sequence[int]], num_samples: int | None = None,
                 sample_ratio: float | None = None, ball_query_order: str = "index") -> None:
        super().__init__()
        if not (len(radii) == len(max_neighbors) == len(widths)) or not radii:
            raise ValueError(f"radii, max_neighbors and widths need one entry per branch, got {len(radii)}, "
                             f"{len(max_neighbors)} and {len(widths)}")
        if (num_samples is None) == (sample_ratio is None):
            raise ValueError("give exactly one of num_samples or sample_ratio for a set abstraction level, "
                             f"got {num_samples} and {sample_ratio}")
        self.num_samples, self.sample_ratio = num_samples, sample_ratio
        self.branches = nn.ModuleList(_GroupBranch(in_channels, r, k, w, ball_query_order)
                                      for r, k, w in zip(radii, max_neighbors, widths, strict=True))
        self.out_channels = sum(b.out_channels for b in self.branches)

    def forward(self, xyz: Tensor, feat: Tensor, offset: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(centres [M, 3], features [M, out_channels], centre offsets [B])."""
        idx = farthest_point_sample(xyz, offset, n=self.num_samples, ratio=self.sample_ratio, validate=False)
        centre_offset = sample_offset(offset, n=self.num_samples, ratio=self.sample_ratio, validate=False)
        centres = xyz[idx]
        out = [b(xyz, feat, offset, centres, centre_offset) for b in self.branches]
        return centres, (out[0] if len(out) == 1 else torch.cat(out, 1)), centre_offset


class GlobalSetAbstraction(nn.Module):
    """Group-all level: shared MLP on [xyz, features] of every point, max-pooled per cloud -> [B, C]."""

    def __init__(self, in_channels: int, widths: Sequence[int]) -> None:
        super().__init__()
        self.mlp = MLP(3 + in_channels, list(widths[:-1])) if len(widths) > 1 else nn.Identity()
        self.last = nn.Linear(widths[-2] if len(widths) > 1 else 3 + in_channels, widths[-1])
        self.last_norm = BatchNormReLUMax(widths[-1])
        self.out_channels = int(widths[-1])

    def forward(self, xyz: Tensor, feat: Tensor, offset: Tensor) -> Tensor:
        h = self.last(self.mlp(torch.cat([xyz, feat], 1)))
        lengths = offset2lengths(offset)
        lo, hi = length_bounds(offset)[0]
        if hi > 0 and lo == hi:
            return self.last_norm(h.view(lengths.numel(), hi, -1))  # clouds as the pooled groups
        return cloud_max(torch.relu(nn.BatchNorm1d.forward(self.last_norm, h)), offset)


class FeaturePropagation(nn.Module):
    """Interpolate coarse features to finer points (IDW, k nearest), concatenate skip features, shared MLP.

    Args:
        coarse_channels: channels of the coarse level being upsampled.
        skip_channels: channels of the finer level's own features (0 for none).
        widths: shared-MLP widths.
        k: neighbours of the inverse-distance interpolation (3 in the paper).
    """

    def __init__(self, coarse_channels: int, skip_channels: int, widths: Sequence[int], k: int = 3) -> None:
        super().__init__()
        self.k, self.coarse_channels = k, coarse_channels
        self.first = nn.Linear(coarse_channels + skip_channels, widths[0])
        self.first_norm = PointBatchNorm(widths[0])
        self.rest = MLP(widths[0], list(widths[1:])) if len(widths) > 1 else nn.Identity()
        self.out_channels = int(widths[-1])

    def forward(self, xyz: Tensor, skip: Tensor | None, offset: Tensor, coarse_xyz: Tensor, coarse_feat: Tensor,
                coarse_offset: Tensor) -> Tensor:
        w_coarse, w_skip = self.first.weight[:, : self.coarse_channels], self.first.weight[:, self.coarse_channels:]
        # IDW weights sum to one, so projecting the (fewer) coarse points first is the same linear map.
        h = interpolate(xyz, coarse_xyz, F.linear(coarse_feat, w_coarse), self.k, offset, coarse_offset,
                        validate=False)
        h = h + self.first.bias
        if skip is not None and skip.shape[1]:
            h = h + F.linear(skip, w_skip)
        return self.rest(F.relu(self.first_norm(h), inplace=True))


def _check_order(order: str) -> None:
    if order not in ORDERS:
        raise ValueError(f"ball_query_order must be one of {ORDERS} (\"index\": the official first-found grouping; "
                         f"\"distance\": the nearest points), got {order!r}")


def _input_order(batch: PointBatch, order: str) -> tuple[Tensor | None, Tensor, Tensor]:
    """(perm or None, coord, feat): the canonical order for nearest-first grouping, else the input order."""
    if order == "index":
        return None, batch.coord, batch.feat
    perm = canonical_order(batch.coord, batch.offset)
    return perm, batch.coord[perm], batch.feat[perm]


def _sa_levels(in_channels: int, num_samples: Sequence[int] | None, sample_ratios: Sequence[float] | None,
               radii: Sequence[Sequence[float]], max_neighbors: Sequence[Sequence[int]],
               widths: Sequence[Sequence[Sequence[int]]], ball_query_order: str) -> nn.ModuleList:
    n_levels = len(radii)
    if num_samples is not None and len(num_samples) != n_levels:
        raise ValueError(f"num_samples needs one entry per level ({n_levels}), got {list(num_samples)}")
    if sample_ratios is not None and len(sample_ratios) != n_levels:
        raise ValueError(f"sample_ratios needs one entry per level ({n_levels}), got {list(sample_ratios)}")
    levels = nn.ModuleList()
    c = in_channels
    for i in range(n_levels):
        sa = SetAbstraction(c, radii[i], max_neighbors[i], widths[i],
                            num_samples=None if num_samples is None else num_samples[i],
                            sample_ratio=None if sample_ratios is None else sample_ratios[i],
                            ball_query_order=ball_query_order)
        levels.append(sa)
        c = sa.out_channels
    return levels


# --------------------------------------------------------------------------------------------- models
class PointNet2Cls(ClassifierMixin, nn.Module):
    """PointNet++ classifier: SA levels, a group-all level, and an MLP head.

    Args:
        in_channels: per-point input feature channels (0 = xyz only; 3 for ModelNet normals).
        num_classes: number of classes.
        radii: per level, the ball radius of each branch (one branch = SSG).
        max_neighbors: per level, the neighbour cap of each branch.
        widths: per level, the shared-MLP widths of each branch.
        num_samples: centres per cloud at each level (the paper's ``npoint``); or
        sample_ratios: centres as a fraction of the previous level (exactly one of the two).
        global_widths: shared-MLP widths of the group-all level.
        head_hidden: hidden widths of the classifier MLP.
        dropout: dropout of the classifier MLP (the drop probability; TensorFlow's ``keep_prob`` is 1 - it).
        ball_query_order: ``"index"`` (official first-found grouping, input point order) or ``"distance"``
            (nearest-first grouping, point-order invariant); see the module notes.
    """

    def __init__(self, in_channels: int, num_classes: int, radii: Sequence[Sequence[float]],
                 max_neighbors: Sequence[Sequence[int]], widths: Sequence[Sequence[Sequence[int]]],
                 num_samples: Sequence[int] | None = None, sample_ratios: Sequence[float] | None = None,
                 global_widths: Sequence[int] = (256, 512, 1024), head_hidden: Sequence[int] = (512, 256),
                 dropout: float = 0.5, ball_query_order: str = "index") -> None:
        super().__init__()
        if in_channels < 0:
            raise ValueError(f"in_channels must be >= 0, got {in_channels}")
        _check_order(ball_query_order)
        self.in_channels = in_channels
        self.ball_query_order = ball_query_order
        self.levels = _sa_levels(in_channels, num_samples, sample_ratios, radii, max_neighbors, widths,
                                 ball_query_order)
        self.global_sa = GlobalSetAbstraction(self.levels[-1].out_channels, global_widths)
        self.num_features = self.global_sa.out_channels
        self.head = MLPHead(self.num_features, head_hidden, num_classes, dropout)

    def forward_features(self, batch: PointBatch) -> Tensor:
        """Global feature per cloud [B, global_widths[-1]]."""
        batch = model_input(self, batch)
        _, xyz, feat = _input_order(batch, self.ball_query_order)
        offset = batch.offset
        for sa in self.levels:
            xyz, feat, offset = sa(xyz, feat, offset)
        return self.global_sa(xyz, feat, offset)

    def forward(self, batch: PointBatch) -> Tensor:
        """Class logits [B, num_classes]."""
        return self.head(self.forward_features(batch))


class PointNet2Seg(ClassifierMixin, nn.Module):
    """PointNet++ segmentation network: SA encoder, FP decoder back to every input point, per-point head.

    Args:
        in_channels: per-point input feature channels (0 = xyz only; 3 for colour).
        num_classes: number of classes.
        radii, max_neighbors, widths, num_samples, sample_ratios: the SA levels, as in ``PointNet2Cls``.
        fp_widths: FP widths, from the coarsest level to the input points (one list per SA level).
        head_hidden: hidden widths of the per-point classifier.
        dropout: dropout of the per-point classifier.
        ball_query_order: ``"index"`` (official first-found grouping) or ``"distance"`` (nearest first).
    """

    def __init__(self, in_channels: int, num_classes: int, radii: Sequence[Sequence[float]],
                 max_neighbors: Sequence[Sequence[int]], widths: Sequence[Sequence[Sequence[int]]],
                 fp_widths: Sequence[Sequence[int]], num_samples: Sequence[int] | None = None,
                 sample_ratios: Sequence[float] | None = None, head_hidden: Sequence[int] = (128,),
                 dropout: float = 0.5, ball_query_order: str = "index") -> None:
        super().__init__()
        if in_channels < 0:
            raise ValueError(f"in_channels must be >= 0, got {in_channels}")
        if len(fp_widths) != len(radii):
            raise ValueError(f"fp_widths needs one entry per SA level ({len(radii)}), got {len(fp_widths)}")
        _check_order(ball_query_order)
        self.in_channels = in_channels
        self.ball_query_order = ball_query_order
        self.levels = _sa_levels(in_channels, num_samples, sample_ratios, radii, max_neighbors, widths,
                                 ball_query_order)
        # Skip channels per resolution; the reference networks pass no skip at the input resolution.
        skips = [0] + [sa.out_channels for sa in self.levels[:-1]]
        self.fps = nn.ModuleList()
        c = self.levels[-1].out_channels
        for i, w in enumerate(fp_widths):
            fp = FeaturePropagation(c, skips[len(skips) - 1 - i], w)
            self.fps.append(fp)
            c = fp.out_channels
        self.num_features = c
        self.head = MLPHead(c, head_hidden, num_classes, dropout)

    def forward_features(self, batch: PointBatch) -> Tensor:
        """Per-point features [N, fp_widths[-1][-1]] in input order."""
        batch = model_input(self, batch)
        perm, xyz, feat = _input_order(batch, self.ball_query_order)
        pyramid = [(xyz, feat, batch.offset)]
        for sa in self.levels:
            pyramid.append(sa(*pyramid[-1]))
        coarse_xyz, h, coarse_offset = pyramid[-1]
        for i, fp in enumerate(self.fps):
            fine_xyz, fine_feat, fine_offset = pyramid[-2 - i]
            skip = fine_feat if i < len(self.fps) - 1 else None
            h = fp(fine_xyz, skip, fine_offset, coarse_xyz, h, coarse_offset)
            coarse_xyz, coarse_offset = fine_xyz, fine_offset
        return h if perm is None else torch.empty_like(h).index_copy_(0, perm, h)

    def forward(self, batch: PointBatch) -> Tensor:
        """Per-point logits [N, num_classes] in input order."""
        return self.head(self.forward_features(batch))
