"""Patch attention over a space-filling-curve order (Point Transformer V3's serialized attention).

Points of each cloud, sorted along a curve, are cut into patches of ``K`` consecutive points and attend
within their patch via ``torch.nn.functional.scaled_dot_product_attention``. A cloud with ``n >= K``
points gets ``ceil(n / K)`` patches; its last, partial patch is filled up with the points just before it
on the curve (as the official PTv3 does), whose outputs there are discarded, so every real key is a
distinct point. A cloud with ``n < K`` points is one patch whose empty slots are masked out as keys.
``K`` is ``min(patch_size, largest cloud)``; masked keys contribute exactly zero, so a cloud's output
does not depend on which batch it sits in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PatchIndex", "SerializedAttention", "build_patches"]


@dataclass
class PatchIndex:
    """Where each patch slot reads from and where each point's output is.

    gather: [P * K] point row of every slot (slot ``p * K + j`` is the j-th member of patch p).
    key_mask: [P, K] bool, False for empty slots that must not act as keys; None when every slot is real.
    scatter: [N] slot holding each point's own output: ``out_point[i] = out_slot[scatter[i]]``.
    patch_size: K.
    """

    gather: Tensor
    key_mask: Tensor | None
    scatter: Tensor
    patch_size: int

    @property
    def num_patches(self) -> int:
        """Number of patches P."""
        return self.gather.numel() // max(self.patch_size, 1)


def build_patches(order: Tensor, lengths: Tensor, patch_size: int, host_lengths: list[int] | None = None
                  ) -> PatchIndex:
    """Patch layout of points sorted along a curve.

    order: [N] point rows in curve order, clouds contiguous and in offset order (``argsort`` of a
        ``serialize`` code does that). lengths: [B] points per cloud. Returns a ``PatchIndex``.
    host_lengths: the same counts as a list, when the caller has them on the host (e.g. ``ops.voxel_levels``
        read them with the level): the layout is then sized without reading the device.
    """
    if patch_size < 1:
        raise ValueError(f"patch_size must be a positive number of points, got {patch_size}")
    n_tot = order.numel()
    dev = order.device
    lengths = lengths.long()
    if n_tot == 0:
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        return PatchIndex(empty, None, empty, 1)
    if host_lengths is None:
        smallest, largest = torch.stack(list(torch.aminmax(lengths))).tolist()  # one host read for both
    else:
        smallest, largest = min(host_lengths), max(host_lengths)
    k = min(patch_size, largest)
    full = lengths >= k
    num_p = torch.where(full, (lengths + k - 1) // k, (lengths > 0).long())
    slots = num_p * k
    slot_start = torch.cumsum(slots, 0) - slots
    start = torch.cumsum(lengths, 0) - lengths
    if host_lengths is None:
        total = int(slots.sum())  # sizes both repeat_interleave below without further reads
    else:  # the same sum on the host: full clouds take ceil(n / k) patches, smaller non-empty ones one
        total = sum((-(-n // k) if n >= k else int(n > 0)) * k for n in host_lengths)
    cloud = torch.repeat_interleave(torch.arange(lengths.numel(), device=dev), slots, output_size=total)
    local = torch.arange(total, device=dev) - slot_start[cloud]
    n_c = lengths[cloud]
    real = local < n_c
    # fill a partial last patch with the K - r points preceding it on the curve; tiny clouds repeat point 0
    src = torch.where(real, local, torch.where(full[cloud], local - k, torch.zeros_like(local)))
    gather = order[start[cloud] + src]
    key_mask = None
    if smallest < k:
        key_mask = (real | full[cloud]).view(-1, k)
    sorted_cloud = torch.repeat_interleave(torch.arange(lengths.numel(), device=dev), lengths, output_size=n_tot)
    pos = torch.arange(n_tot, device=dev)
    scatter = torch.empty_like(order)
    scatter[order] = slot_start[sorted_cloud] + pos - start[sorted_cloud]
    return PatchIndex(gather, key_mask, scatter, k)


class SerializedAttention(nn.Module):
    """Multi-head self-attention inside serialized patches: [N, C] -> [N, C]."""

    def __init__(
        self, channels: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0
    ) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.channels = channels
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias)
        self.proj = nn.Linear(channels, channels)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, feat: Tensor, patches: PatchIndex) -> Tensor:
        """Attend within the patches of ``patches``; rows of the output follow the rows of ``feat``."""
        if feat.shape[0] == 0:
            return self.proj(feat)
        k, h, c = patches.patch_size, self.num_heads, self.channels
        qkv = self.qkv(feat)[patches.gather].view(-1, k, 3, h, c // h).permute(2, 0, 3, 1, 4)
        q, key, v = qkv.unbind(0)  # each [P, H, K, d]
        mask = None if patches.key_mask is None else patches.key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q, key, v, attn_mask=mask, dropout_p=self.attn_drop if self.training else 0.0
        )
        out = out.transpose(1, 2).reshape(-1, c)[patches.scatter]
        return self.proj_drop(self.proj(out))
