"""Kernel-map construction (``pcbench.ops.kernel_map``) on the real ScanNet sample scene and a synthetic room.

Peers: a dense lookup volume (one int32 cell per grid position; fast but memory grows with the bounding
box, not with the occupied voxels) and, on small inputs, the dict-based naive reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from benchmarks.harness import Case, Entry
from pcbench.ops import kernel_map, voxelize
from pcbench.ops._reference import kernel_map_reference
from pcbench.ops.sparse import kernel_offsets
from pcbench.testing.clouds import load_scannet_scene, scan_like_scene, shared_data_dir

SCENE = "scannet/scans/scene0000_00/scene0000_00_vh_clean_2.ply"
# The dense-volume peer is skipped when its table would exceed this many cells (4 bytes each).
DENSE_TABLE_LIMIT = 1 << 28


def dense_table_kernel_map(in_coords: Tensor, out_coords: Tensor, kernel_size: int, stride: int = 1,
                           dilation: int = 1) -> list[tuple[Tensor, Tensor]]:
    """Peer: scatter input rows into a dense int32 volume and read every shifted query from it."""
    offs = kernel_offsets(kernel_size) * dilation
    base = out_coords.clone()
    base[:, 1:] *= stride
    lo = torch.minimum(in_coords[:, 1:].min(0).values, base[:, 1:].min(0).values + offs.min(0).values)
    hi = torch.maximum(in_coords[:, 1:].max(0).values, base[:, 1:].max(0).values + offs.max(0).values)
    size = (hi - lo + 1).tolist()
    nb = int(max(in_coords[:, 0].max(), base[:, 0].max())) + 1
    table = torch.full((nb, *size), -1, dtype=torch.int32)
    ic = in_coords[:, 1:] - lo
    table[in_coords[:, 0], ic[:, 0], ic[:, 1], ic[:, 2]] = torch.arange(in_coords.shape[0], dtype=torch.int32)
    q = base[:, 1:] - lo
    out = []
    for d in offs:
        p = q + d
        hit = table[base[:, 0], p[:, 0], p[:, 1], p[:, 2]]
        j = (hit >= 0).nonzero().squeeze(1)
        out.append((hit[j].long(), j))
    return out


def _grids(quick: bool) -> list[tuple[str, Tensor]]:
    grids = []
    data = shared_data_dir()
    if data is not None and (data / SCENE).is_file():
        coord, _ = load_scannet_scene(data / SCENE)
        for vs in ((0.05,) if quick else (0.02, 0.05)):
            grids.append((f"scene0000_00 @{round(vs * 100)}cm", voxelize(coord, vs)[0]))
    room = scan_like_scene(20_000 if quick else 200_000, seed=0)
    grids.append((f"synthetic room {room.shape[0] // 1000}k @2cm", voxelize(room, 0.02)[0]))
    return grids


def _coarse(v: Tensor) -> Tensor:
    c = v.clone()
    c[:, 1:] = torch.div(c[:, 1:], 2, rounding_mode="floor")
    return torch.unique(c, dim=0)


def cases(quick: bool) -> list[Case]:
    """kernel_map cases: submanifold k=3 and k=5, and the k=2 stride-2 down-sampling map."""
    out = []
    for name, v in _grids(quick):
        coarse = _coarse(v)
        for label, (a, b, k, s) in {"k3 s1": (v, v, 3, 1), "k5 s1": (v, v, 5, 1), "k2 s2": (v, coarse, 2, 2)}.items():
            entries = [Entry("pcbench", lambda a=a, b=b, k=k, s=s: kernel_map(a, b, k, s))]
            cells = int(torch.prod(v[:, 1:].max(0).values - v[:, 1:].min(0).values + 8))
            if cells <= DENSE_TABLE_LIMIT:
                entries.append(Entry("dense volume", lambda a=a, b=b, k=k, s=s: dense_table_kernel_map(a, b, k, s),
                                     note=f"{cells / 1e6:.0f}M-cell int32 table"))
            if v.shape[0] * k ** 3 <= 200_000:
                entries.append(Entry("naive dict", lambda a=a, b=b, k=k, s=s: kernel_map_reference(a, b, k, s)))
            out.append(Case("kernel_map", f"{name} V={v.shape[0]} {label}", entries))
    return out
