"""Point-cloud generators and real-sample loaders shared by the tests and the benchmarks.

What the benchmarks time is what the tests check: both build their inputs here. Never imported by the library.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "load_modelnet_txt",
    "load_scannet_scene",
    "object_batch",
    "scan_like_scene",
    "shared_data_dir",
    "shared_data_path",
    "uniform_cloud",
]


def shared_data_path() -> Path | None:
    """Where the real sample files are: ``$PCBENCH_SHARED_DATA`` (None when unset).

    The library and the benchmarks know no default location; the test session sets the variable to the sample
    folder beside the checkout (tests/conftest.py), and a user points it at their own copy.
    """
    env = os.environ.get("PCBENCH_SHARED_DATA")
    return Path(env) if env else None


def shared_data_dir() -> Path | None:
    """The folder of ``shared_data_path()`` when it is set and exists, else None."""
    path = shared_data_path()
    return path if path is not None and path.is_dir() else None


def uniform_cloud(n: int, seed: int = 0, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> Tensor:
    """``n`` points uniform in the cube ``[0, scale]^3``, shape [n, 3]."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, generator=g, dtype=torch.float64) * scale).to(dtype)


def _sample_rects(rng: np.random.Generator, rects: np.ndarray, n: int) -> np.ndarray:
    """Area-weighted samples on rectangles given as rows (origin[3], edge_u[3], edge_v[3])."""
    o, u, v = rects[:, 0:3], rects[:, 3:6], rects[:, 6:9]
    area = np.linalg.norm(np.cross(u, v), axis=1)
    which = rng.choice(len(rects), size=n, p=area / area.sum())
    a, b = rng.random((n, 1)), rng.random((n, 1))
    return o[which] + a * u[which] + b * v[which]


def _box_faces(lo: np.ndarray, hi: np.ndarray) -> list[np.ndarray]:
    d = hi - lo
    ex, ey, ez = np.diag(d)
    faces = []
    for base, e1, e2 in ((lo, ex, ey), (lo, ex, ez), (lo, ey, ez)):
        faces.append(np.concatenate([base, e1, e2]))
    for base, e1, e2 in ((lo + ez, ex, ey), (lo + ey, ex, ez), (lo + ex, ey, ez)):
        faces.append(np.concatenate([base, e1, e2]))
    return faces


def scan_like_scene(n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    """``n`` points on the surfaces of a furnished room (~8 x 8 x 3 m): floor, walls and box furniture.

    Like a real indoor scan, almost all grid cells are empty and the occupied ones lie on 2-D sheets.
    """
    rng = np.random.default_rng(seed)
    w, d, h = 8.0, 8.0, 3.0
    rects = [
        np.array([0, 0, 0, w, 0, 0, 0, d, 0]),  # floor
        np.array([0, 0, 0, w, 0, 0, 0, 0, h]),
        np.array([0, d, 0, w, 0, 0, 0, 0, h]),
        np.array([0, 0, 0, 0, d, 0, 0, 0, h]),
        np.array([w, 0, 0, 0, d, 0, 0, 0, h]),
    ]
    for _ in range(12):
        size = rng.uniform([0.3, 0.3, 0.4], [2.0, 1.2, 1.8])
        lo = np.append(rng.uniform([0.2, 0.2], [w - size[0] - 0.2, d - size[1] - 0.2]), 0.0)
        rects.extend(_box_faces(lo, lo + size))
    pts = _sample_rects(rng, np.stack(rects).astype(np.float64), n)
    pts += rng.normal(scale=0.003, size=pts.shape)  # sensor noise: surfaces are not infinitely thin
    return torch.from_numpy(pts).to(dtype)


def object_batch(
    batch: int, n: int, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """``batch`` object clouds of ``n`` surface points each (spheres, boxes, tori), inside the unit sphere.

    Returns (coord [batch * n, 3], offset [batch]).
    """
    rng = np.random.default_rng(seed)
    clouds = []
    for b in range(batch):
        kind = b % 3
        if kind == 0:
            p = rng.normal(size=(n, 3))
            p /= np.linalg.norm(p, axis=1, keepdims=True)
        elif kind == 1:
            size = rng.uniform(0.3, 1.0, size=3)
            p = _sample_rects(rng, np.stack(_box_faces(-size / 2, size / 2)), n)
        else:
            t, s = rng.uniform(0, 2 * math.pi, size=(2, n))
            big, small = 0.7, 0.25
            p = np.stack([(big + small * np.cos(s)) * np.cos(t), (big + small * np.cos(s)) * np.sin(t),
                          small * np.sin(s)], axis=1)
        p = p - p.mean(0)
        p /= np.linalg.norm(p, axis=1).max()
        clouds.append(p)
    coord = torch.from_numpy(np.concatenate(clouds)).to(dtype)
    offset = torch.arange(1, batch + 1, dtype=torch.long) * n
    return coord, offset


def load_scannet_scene(path: Path) -> tuple[Tensor, Tensor]:
    """Vertices of a ScanNet ``*_vh_clean_2.ply`` mesh: (coord [N, 3] float32, color [N, 3] uint8)."""
    from plyfile import PlyData  # noqa: PLC0415 - only tests and benchmarks read plys here

    v = PlyData.read(str(path))["vertex"]
    coord = np.stack([v["x"], v["y"], v["z"]], axis=1).astype(np.float32)
    color = np.stack([v["red"], v["green"], v["blue"]], axis=1).astype(np.uint8)
    return torch.from_numpy(coord), torch.from_numpy(color)


def load_modelnet_txt(path: Path) -> tuple[Tensor, Tensor]:
    """A ``modelnet40_normal_resampled`` sample: (coord [N, 3], normal [N, 3]) float32."""
    arr = np.loadtxt(path, delimiter=",", dtype=np.float32)
    return torch.from_numpy(arr[:, :3].copy()), torch.from_numpy(arr[:, 3:6].copy())
