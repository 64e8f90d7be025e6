"""serialize (z-order / Hilbert codes) against vectorised numpy encoders of the same curves.

Inputs: room-like scan scenes from ``pcbench.testing.clouds.scan_like_scene`` voxelized at 2 cm (the PTv3
setting), as integer grid coordinates relative to the scene minimum. The numpy peers are independent
whole-array implementations (magic-number bit spreading for Morton, Skilling's transform for Hilbert)
and are checked against pcbench before timing.
"""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.harness import Case, Entry
from pcbench.ops import serialize
from pcbench.testing.clouds import scan_like_scene

_MASKS = (
    (32, 0x1F00000000FFFF),
    (16, 0x1F0000FF0000FF),
    (8, 0x100F00F00F00F00F),
    (4, 0x10C30C30C30C30C3),
    (2, 0x1249249249249249),
)


def _np_spread(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.uint64)
    for shift, mask in _MASKS:
        v = (v | (v << np.uint64(shift))) & np.uint64(mask)
    return v


def numpy_morton(grid: np.ndarray) -> np.ndarray:
    """Z-order codes of [N, 3] non-negative ints (x most significant), numpy uint64 -> int64."""
    return ((_np_spread(grid[:, 0]) << np.uint64(2)) | (_np_spread(grid[:, 1]) << np.uint64(1))
            | _np_spread(grid[:, 2])).astype(np.int64)


def numpy_hilbert(grid: np.ndarray, depth: int = 16) -> np.ndarray:
    """3-D Hilbert index by Skilling's transform on whole numpy arrays (loop over bit levels)."""
    x = [grid[:, i].astype(np.int32) for i in range(3)]
    for level in range(depth - 1, 0, -1):
        p = np.int32((1 << level) - 1)
        for i in range(3):
            hit = ((x[i] >> level) & 1).astype(bool)
            t = np.where(hit, 0, (x[0] ^ x[i]) & p).astype(np.int32)
            x[0] = x[0] ^ np.where(hit, p, t).astype(np.int32)
            if i:
                x[i] = x[i] ^ t
    x[1] ^= x[0]
    x[2] ^= x[1]
    t = np.zeros_like(x[0])
    for level in range(depth - 1, 0, -1):
        t ^= np.where((x[2] >> level) & 1, np.int32((1 << level) - 1), np.int32(0)).astype(np.int32)
    return numpy_morton(np.stack([xi ^ t for xi in x], 1).astype(np.int64))


def scene_grid(n: int, seed: int = 0, grid_size: float = 0.02) -> torch.Tensor:
    """Integer grid coordinates [n, 3] of a scan-like scene at ``grid_size``, relative to its minimum.

    Points sharing a cell are kept: the encoders cost the same per row either way.
    """
    c = scan_like_scene(n, seed=seed)
    g = torch.floor(c / grid_size).long()
    return g - g.min(0).values


def cases(quick: bool) -> list[Case]:
    """z-order and Hilbert encoding of 65k (quick) or 262k and 1M scene points."""
    sizes = (65_536,) if quick else (262_144, 1_048_576)
    out = []
    for n in sizes:
        g = scene_grid(n)
        g_np = g.numpy()
        for order in ("z", "hilbert"):
            ours = serialize(g, order=order)
            peer_fn = numpy_morton if order == "z" else numpy_hilbert
            if not np.array_equal(ours.numpy(), peer_fn(g_np)):
                raise AssertionError(f"numpy {order} peer disagrees with pcbench.ops.serialize")
            out.append(Case(
                op="serialize",
                case=f"{order} scene n={n}",
                entries=[
                    Entry("pcbench", lambda g=g, order=order: serialize(g, order=order)),
                    Entry("numpy", lambda g_np=g_np, f=peer_fn: f(g_np), "vectorised numpy, same curve"),
                ],
            ))
    return out
