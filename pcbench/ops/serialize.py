"""Space-filling-curve serialization (z-order, Hilbert) of voxel grid coordinates.

A code packs ``3 * depth`` curve bits (``depth`` bits per axis, default 16, so grid coordinates must lie
in ``[0, 2**depth - 1]``) and puts the cloud index above them: ``code = cloud << (3 * depth) | curve``.
Sorting the codes therefore groups the points cloud by cloud and, inside each cloud, along the curve.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .batch import offset2batch, resolve_offset

__all__ = ["MAX_DEPTH", "ORDERS", "hilbert_encode", "morton_encode", "serialize"]

ORDERS = ("z", "z-trans", "hilbert", "hilbert-trans")
MAX_DEPTH = 20  # 60 curve bits; the remaining 3 positive bits of an int64 hold the cloud index

# Magic-number bit spreading: each step moves groups of bits apart so that bit i of the input ends at
# bit 3 * i; five shift-or-mask rounds replace a 21-step loop over bits.
_SPREAD = (
    (32, 0x1F00000000FFFF),
    (16, 0x1F0000FF0000FF),
    (8, 0x100F00F00F00F00F),
    (4, 0x10C30C30C30C30C3),
    (2, 0x1249249249249249),
)


def _spread3(v: Tensor) -> Tensor:
    """Move bit i of each (< 2**21) int64 value to bit 3 * i, in place on a fresh copy."""
    v = v.to(torch.int64, copy=True)
    tmp = torch.empty_like(v)
    for shift, mask in _SPREAD:
        torch.bitwise_left_shift(v, shift, out=tmp)
        v.bitwise_or_(tmp).bitwise_and_(mask)
    return v


def _interleave(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    """Morton interleave with x the most significant axis: bit i of x -> 3i+2, y -> 3i+1, z -> 3i."""
    code = _spread3(x).bitwise_left_shift_(2)
    code.bitwise_or_(_spread3(y).bitwise_left_shift_(1))
    code.bitwise_or_(_spread3(z))
    return code


def morton_encode(grid: Tensor) -> Tensor:
    """Z-order (Morton) code [N] int64 of non-negative integer coordinates [N, 3] (< 2**21, unchecked)."""
    return _interleave(grid[:, 0], grid[:, 1], grid[:, 2])


def hilbert_encode(grid: Tensor, depth: int) -> Tensor:
    """3-D Hilbert index [N] int64 of integer coordinates [N, 3] in [0, 2**depth) (unchecked).

    Skilling's transform (AIP Conf. Proc. 707, 2004) maps the axes to the "transposed" Hilbert index, whose
    bits interleaved (axis 0 most significant) give the index; the loop runs over bit levels, never points.
    """
    # int32 halves memory traffic; coordinates are < 2**MAX_DEPTH so they fit
    x = [grid[:, i].to(torch.int32, copy=True) for i in range(3)]
    e = torch.empty_like(x[0])
    m = torch.empty_like(x[0])
    # masks are built arithmetically (0 or all ones) because masked_fill_ on int32 is ~20x slower
    for level in range(depth - 1, 0, -1):
        p = (1 << level) - 1
        for i in range(3):
            # bit `level` of x[i] set: invert the low bits of x[0]; else exchange the low bits of x[0], x[i]
            torch.bitwise_right_shift(x[i], level, out=m)
            m.bitwise_and_(1).neg_()
            torch.bitwise_xor(x[0], x[i], out=e)
            e.bitwise_and_(p).bitwise_and_(m.bitwise_not())
            if i:
                x[i].bitwise_xor_(e)
            x[0].bitwise_xor_(e.bitwise_xor_(m.bitwise_and_(p)))
    # Gray-code the transposed index, then undo the excess bits flagged by the last axis
    x[1].bitwise_xor_(x[0])
    x[2].bitwise_xor_(x[1])
    acc = torch.zeros_like(x[0])
    for level in range(depth - 1, 0, -1):
        torch.bitwise_right_shift(x[2], level, out=m)
        acc.bitwise_xor_(m.bitwise_and_(1).neg_().bitwise_and_((1 << level) - 1))
    for i in range(3):
        x[i].bitwise_xor_(acc)
    return _interleave(x[0], x[1], x[2])


def serialize(
    grid_coord: Tensor, offset: Tensor | None = None, order: str = "z", *, depth: int = 16, validate: bool = True
) -> Tensor:
    """Space-filling-curve code [N] int64 per point of integer grid coordinates [N, 3], cloud index in the high bits.

    ``order``: ``"z"`` (Morton, x most significant), ``"hilbert"`` (3-D Hilbert curve), or their
    ``"-trans"`` variants, which swap x and y before encoding (as in Point Transformer V3). Coordinates
    must be integers in ``[0, 2**depth - 1]`` (``depth`` <= 20, default 16: up to 65535 cells per axis);
    the code is ``cloud << (3 * depth) | curve``, so at most ``2**(63 - 3 * depth)`` clouds fit.
    If ``argsort(code)[r] = i`` then point i is the r-th point along the curve (clouds in offset order).
    ``validate=False`` skips the coordinate range and offset value checks (host syncs) for checked inputs.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if not isinstance(depth, int) or not (1 <= depth <= MAX_DEPTH):
        raise ValueError(f"depth must be an int in [1, {MAX_DEPTH}] (bits per axis), got {depth!r}")
    if not isinstance(grid_coord, Tensor):
        raise ValueError(f"grid_coord must be a torch.Tensor, got {type(grid_coord).__name__}")
    if grid_coord.dim() != 2 or grid_coord.shape[1] != 3:
        raise ValueError(f"grid_coord must have shape [N, 3], got {list(grid_coord.shape)}")
    if grid_coord.is_floating_point() or grid_coord.dtype == torch.bool or grid_coord.is_complex():
        raise ValueError(
            f"grid_coord must be an integer tensor, got {grid_coord.dtype}; "
            "voxelize first, e.g. torch.floor(coord / grid_size).long() minus its per-cloud minimum"
        )
    n = grid_coord.shape[0]
    off = resolve_offset("offset", offset, n, grid_coord.device, validate)
    if n and validate:
        lo, hi = int(grid_coord.min()), int(grid_coord.max())
        if lo < 0:
            raise ValueError(
                f"grid_coord must be non-negative, got minimum {lo}; subtract the per-cloud minimum first"
            )
        if hi >= 1 << depth:
            raise ValueError(
                f"grid_coord values must be < 2**depth = {1 << depth} (depth={depth}), got maximum {hi}; "
                "use a coarser grid or a larger depth (<= 20)"
            )
    max_clouds = 1 << (63 - 3 * depth)
    if off.numel() > max_clouds:
        raise ValueError(
            f"offset holds {off.numel()} clouds but depth={depth} leaves room for {max_clouds}; lower depth"
        )
    g = grid_coord.long()
    if order.endswith("-trans"):
        g = g[:, [1, 0, 2]]
    code = morton_encode(g) if order.startswith("z") else hilbert_encode(g, depth)
    if off.numel() > 1:
        code.bitwise_or_(offset2batch(off, n).bitwise_left_shift_(3 * depth))
    return code
