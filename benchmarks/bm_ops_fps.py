"""FPS, voxelization and interpolation against their peers (fpsample, QuickFPS, open3d, numpy, scipy).

Inputs come from ``pcbench.testing.clouds`` (the generators the tests use). ``cases(quick)`` feeds
``benchmarks.bm_ops`` (``pcbench-bench-ops --only fps,voxelize,interpolate``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from benchmarks.harness import Case, Entry, optional_entry
from pcbench.ops._reference import fps_reference
from pcbench.ops.fps import farthest_point_sample
from pcbench.ops.interpolate import interpolate
from pcbench.ops.voxel import voxelize
from pcbench.testing.clouds import object_batch, scan_like_scene

__all__ = ["cases"]


def _fpsample(fn_name: str, pts: list[np.ndarray], n: int, **kw) -> Callable[[], object]:
    import fpsample  # noqa: PLC0415 - optional peer

    fn = getattr(fpsample, fn_name)
    return lambda: [fn(p, n, **kw) for p in pts]


def _open3d_fps(pts: list[np.ndarray], n: int) -> Callable[[], object]:
    import open3d as o3d  # noqa: PLC0415 - optional peer

    clouds = [o3d.geometry.PointCloud(o3d.utility.Vector3dVector(p.astype(np.float64))) for p in pts]
    return lambda: [c.farthest_point_down_sample(n) for c in clouds]


def _fps_case(name: str, coord: torch.Tensor, offset: torch.Tensor | None, n: int, reference: bool) -> Case:
    bounds = [0, *(offset.tolist() if offset is not None else [coord.shape[0]])]
    pts = [coord[a:b].numpy() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    # QuickFPS tree height, tuned here (1 thread): 1024 points best at h=4, 65k points at h=7 (h=12: 15x slower)
    h = 4 if max(len(p) for p in pts) <= 4096 else 7
    entries: list[Entry] = [
        Entry("pcbench", lambda: farthest_point_sample(coord, offset, n=n), "exact, identical to reference"),
        optional_entry("fpsample exact", lambda: _fpsample("fps_sampling", pts, n, start_idx=0), "exact"),
        optional_entry("fpsample npdu_kdtree", lambda: _fpsample("fps_npdu_kdtree_sampling", pts, n, start_idx=0),
                       "approximate"),
        optional_entry("QuickFPS kdline", lambda: _fpsample("bucket_fps_kdline_sampling", pts, n, h=h,
                                                             start_idx=0), "bucket QuickFPS"),
        optional_entry("QuickFPS kdtree", lambda: _fpsample("bucket_fps_kdtree_sampling", pts, n, start_idx=0),
                       "bucket QuickFPS"),
        optional_entry("open3d", lambda: _open3d_fps(pts, n), "farthest_point_down_sample"),
    ]
    if reference:
        entries.append(Entry("torch loop (reference)", lambda: fps_reference(coord, offset, n=n),
                             "plain per-cloud torch loop"))
    return Case("fps", name, entries)


def _voxel_case(n: int, size: float) -> Case:
    coord = scan_like_scene(n, seed=0)
    np_coord = coord.numpy()

    def numpy_unique() -> object:
        return np.unique(np.floor(np_coord / size).astype(np.int64), axis=0, return_inverse=True,
                         return_counts=True)

    def o3d_build() -> Callable[[], object]:
        import open3d as o3d  # noqa: PLC0415 - optional peer

        pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np_coord.astype(np.float64)))
        return lambda: pc.voxel_down_sample(size)

    entries = [
        Entry("pcbench", lambda: voxelize(coord, size), "voxels + inverse + counts"),
        optional_entry("open3d voxel_down_sample", o3d_build, "means only, no inverse map"),
        Entry("numpy unique", numpy_unique, "rows unique, axis=0"),
    ]
    return Case("voxelize", f"{n // 1024}k scene, {size * 100:g} cm", entries)


def _interp_case(nq: int, ns: int, channels: int) -> Case:
    query = scan_like_scene(nq, seed=1)
    support = scan_like_scene(ns, seed=2)
    feat = torch.randn(ns, channels, generator=torch.Generator().manual_seed(0))

    def scipy_build() -> Callable[[], object]:
        from scipy.spatial import cKDTree  # noqa: PLC0415 - optional peer

        q, s, f = query.numpy(), support.numpy(), feat.numpy()

        def run() -> object:
            dist, idx = cKDTree(s).query(q, k=3)
            w = 1.0 / (dist + 1e-8)
            w /= w.sum(1, keepdims=True)
            return np.einsum("mk,mkc->mc", w, f[idx])

        return run

    entries = [
        Entry("pcbench", lambda: interpolate(query, support, feat, k=3), "knn + IDW gathers"),
        optional_entry("scipy cKDTree + numpy", scipy_build, "tree build included"),
    ]
    return Case("interpolate", f"{nq // 1024}k <- {ns // 1024}k, k=3, C={channels}",
                entries)


def cases(quick: bool) -> list[Case]:
    """FPS (object batch, scene), voxelization and interpolation cases; ``quick`` shrinks the scenes."""
    obj, off = object_batch(32, 1024, seed=0)
    out = [_fps_case("32 x 1024 -> 256", obj, off, 256, reference=True)]
    if quick:
        scene = scan_like_scene(16384, seed=0)
        out.append(_fps_case("16k -> 4k scene", scene, None, 4096, reference=False))
        out.append(_voxel_case(65536, 0.02))
        out.append(_interp_case(16384, 4096, 32))
    else:
        scene = scan_like_scene(65536, seed=0)
        out.append(_fps_case("65k -> 16k scene", scene, None, 16384, reference=True))
        out.append(_voxel_case(262144, 0.02))
        out.append(_interp_case(65536, 16384, 32))
    return out
