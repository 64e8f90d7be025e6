"""Synthetic object datasets written in the raw OFFICIAL formats, from parametric shapes.

Used as test fixtures and as the embedded default of a quickstart (no download needed). Each writer
produces exactly the on-disk layout of the real release, so the preparers read it like the real thing:

* :func:`write_modelnet_off`: ``ModelNet{40,10}/<class>/{train,test}/<class>_<id>.off`` meshes (one per
  split with the malformed glued header "OFF<V> <F> 0", polygons as quads/n-gons).
* :func:`write_modelnet_normal_resampled`: ``modelnet40_normal_resampled/`` txt rows ``x,y,z,nx,ny,nz``
  (6 decimals, unit sphere) + shape names + split lists + filelist.
* :func:`write_modelnet_ply_hdf5`: ``modelnet40_ply_hdf5_2048/ply_data_{train,test}0.h5`` (data float32
  (N,2048,3), label uint8 (N,1), normal float32 (N,2048,3)) + shape_names.txt + id2file json.
* :func:`write_scanobjectnn`: ``h5_files/main_split{,_nobg}/{training,test}_objectdataset*.h5`` (data
  float32 (N,2048,3), label int64 (N,), mask int64 (N,2048), -1 = background) for every variant,
  with partial occlusion, noise and background clutter (floor and wall patches) + shape_names_ext.txt.

Shapes (box, sphere, cylinder, cone, torus) stand in for classes; :data:`MODELNET_CLASS_OF` and
:data:`SCANOBJECTNN_CLASS_OF` say which official class name each shape is filed under (placeholders so
that the official label lists apply). Everything is deterministic for a seed.

Command line: ``python -m data_prep.synthetic_objects out=<folder> [seed=0] [train=4] [test=2]``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from .modelnet import MODELNET10_CLASSES, MODELNET40_CLASSES, sample_surface
from .scanobjectnn import CLASSES as SCANOBJECTNN_CLASSES
from .scanobjectnn import VARIANTS

SHAPES = ("box", "sphere", "cylinder", "cone", "torus")
#: shape -> ModelNet class name it is filed under (all in ModelNet10, hence also in ModelNet40)
MODELNET_CLASS_OF = {"box": "dresser", "sphere": "bathtub", "cylinder": "night_stand", "cone": "chair",
                     "torus": "table"}
#: shape -> ScanObjectNN class name it is filed under
SCANOBJECTNN_CLASS_OF = {"box": "box", "sphere": "bag", "cylinder": "bin", "cone": "chair", "torus": "table"}


# -------------------------------------------------------------------------------------------- meshes
def _rot(axis_angles: np.ndarray) -> np.ndarray:
    rx, ry, rz = axis_angles
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    mx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    my = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    mz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return mz @ my @ mx


def make_mesh(shape: str, segments: int = 16) -> tuple[np.ndarray, list[list[int]]]:
    """Unit-size outward-oriented polygon mesh (vertices [V,3], faces as vertex-index lists, CCW from outside)."""
    n = segments
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    if shape == "box":
        v = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=np.float64) * 0.5
        f = [[0, 1, 3, 2], [4, 6, 7, 5], [0, 4, 5, 1], [2, 3, 7, 6], [0, 2, 6, 4], [1, 5, 7, 3]]
        return v, f
    if shape == "sphere":
        rings = n // 2
        phi = np.linspace(0, np.pi, rings + 1)[1:-1]
        v = [[0, 0, 1]] + [[np.sin(p) * np.cos(a), np.sin(p) * np.sin(a), np.cos(p)] for p in phi for a in t] + [[0, 0, -1]]
        f = [[0, 1 + j, 1 + (j + 1) % n] for j in range(n)]
        for r in range(rings - 2):
            a0, a1 = 1 + r * n, 1 + (r + 1) * n
            f += [[a0 + j, a1 + j, a1 + (j + 1) % n, a0 + (j + 1) % n] for j in range(n)]
        last, bottom = 1 + (rings - 2) * n, len(v) - 1
        f += [[last + j, bottom, last + (j + 1) % n] for j in range(n)]
        return np.array(v, dtype=np.float64) * 0.5, f
    if shape == "cylinder":
        ring = np.stack([np.cos(t), np.sin(t)], 1) * 0.5
        v = np.concatenate([np.c_[ring, np.full(n, -0.5)], np.c_[ring, np.full(n, 0.5)]])
        f = [[j, (j + 1) % n, n + (j + 1) % n, n + j] for j in range(n)]
        f += [list(range(n - 1, -1, -1)), list(range(n, 2 * n))]  # n-gon caps
        return v, f
    if shape == "cone":
        ring = np.stack([np.cos(t), np.sin(t)], 1) * 0.5
        v = np.concatenate([np.c_[ring, np.full(n, -0.5)], [[0, 0, 0.5]]])
        f = [[j, (j + 1) % n, n] for j in range(n)] + [list(range(n - 1, -1, -1))]
        return v, f
    if shape == "torus":
        m = max(n // 2, 4)
        s = np.linspace(0, 2 * np.pi, m, endpoint=False)
        big, small = 0.35, 0.15
        v = [[(big + small * np.cos(b)) * np.cos(a), (big + small * np.cos(b)) * np.sin(a), small * np.sin(b)]
             for a in t for b in s]
        f = [[i * m + j, ((i + 1) % n) * m + j, ((i + 1) % n) * m + (j + 1) % m, i * m + (j + 1) % m]
             for i in range(n) for j in range(m)]
        return np.array(v, dtype=np.float64), f
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def triangulate(faces: list[list[int]]) -> np.ndarray:
    """Fan-triangulate polygon faces into [T,3] (the same rule the OFF reader applies)."""
    return np.array([(p[0], p[j], p[j + 1]) for p in faces for j in range(1, len(p) - 1)], dtype=np.int64)


def random_instance(shape: str, rng: np.random.Generator, scale: float = 1.0) -> tuple[np.ndarray, list[list[int]]]:
    """A randomly stretched, rotated (about z), shifted copy of a shape mesh, ``scale`` times larger."""
    v, f = make_mesh(shape, segments=int(rng.integers(10, 20)))
    v = v * rng.uniform(0.6, 1.4, size=3)
    v = v @ _rot(np.array([0.0, 0.0, rng.uniform(0, 2 * np.pi)])).T
    return (v + rng.normal(scale=0.1, size=3)) * scale, f


def _ids(rng: np.random.Generator, train: int, test: int) -> dict[str, list[tuple[str, int]]]:
    """{split: [(shape, instance number)]} with ModelNet-style 1-based numbering per class."""
    out: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for shape in SHAPES:
        k = 1
        for split, cnt in (("train", train), ("test", test)):
            for _ in range(cnt):
                out[split].append((shape, k))
                k += 1
    return out


def _unit_sphere(p: np.ndarray) -> np.ndarray:
    p = p - p.mean(0)
    return p / np.sqrt((p ** 2).sum(1).max())


# ---------------------------------------------------------------------------------------- ModelNet
def write_modelnet_off(root: Path, train: int = 3, test: int = 2, seed: int = 0, num_classes: int = 40) -> Path:
    """ModelNet{num_classes}/<class>/{train,test}/*.off meshes; returns the ModelNet folder."""
    rng = np.random.default_rng(seed)
    base = Path(root) / f"ModelNet{num_classes}"
    glued = {"train": False, "test": False}
    for split, items in _ids(rng, train, test).items():
        for shape, k in items:
            cls = MODELNET_CLASS_OF[shape]
            v, f = random_instance(shape, rng, scale=20.0)  # ModelNet meshes are in arbitrary large units
            d = base / cls / split
            d.mkdir(parents=True, exist_ok=True)
            if not glued[split]:  # the known malformed header of some ModelNet40 originals
                head = f"OFF{len(v)} {len(f)} 0\n"
                glued[split] = True
            else:
                head = f"OFF\n{len(v)} {len(f)} 0\n"
            body = "".join(f"{x:f} {y:f} {z:f}\n" for x, y, z in v)
            body += "".join(f"{len(p)} {' '.join(map(str, p))}\n" for p in f)
            (d / f"{cls}_{k:04d}.off").write_text(head + body)
    return base


def write_modelnet_normal_resampled(root: Path, train: int = 3, test: int = 2, seed: int = 0,
                                    points: int = 10000) -> Path:
    """modelnet40_normal_resampled/ with txt samples, shape names (40 and 10) and split lists."""
    rng = np.random.default_rng(seed)
    base = Path(root) / "modelnet40_normal_resampled"
    base.mkdir(parents=True, exist_ok=True)
    lists: dict[str, list[str]] = {"train": [], "test": []}
    for split, items in _ids(rng, train, test).items():
        for shape, k in items:
            cls = MODELNET_CLASS_OF[shape]
            v, f = random_instance(shape, rng)
            pts, nrm = sample_surface(v, triangulate(f), points, rng)
            pts = _unit_sphere(pts)
            (base / cls).mkdir(exist_ok=True)
            rows = np.concatenate([pts, nrm], 1)
            fmt = ",".join(["%.6f"] * 6) + "\n"  # one %-format over the whole file: 4x faster than per value
            (base / cls / f"{cls}_{k:04d}.txt").write_text((fmt * len(rows)) % tuple(rows.ravel().tolist()))
            lists[split].append(f"{cls}_{k:04d}")
    (base / "modelnet40_shape_names.txt").write_text("\n".join(MODELNET40_CLASSES) + "\n")
    (base / "modelnet10_shape_names.txt").write_text("\n".join(MODELNET10_CLASSES) + "\n")
    for split, ids in lists.items():
        ids = sorted(ids)
        for nc in (40, 10):  # every synthetic class is in ModelNet10
            (base / f"modelnet{nc}_{split}.txt").write_text("\n".join(ids) + "\n")
    allids = sorted(lists["train"] + lists["test"])
    (base / "filelist.txt").write_text("".join(f"{i.rsplit('_', 1)[0]}/{i}.txt\n" for i in allids))
    return base


def write_modelnet_ply_hdf5(root: Path, train: int = 3, test: int = 2, seed: int = 0) -> Path:
    """modelnet40_ply_hdf5_2048/ with ply_data_{train,test}0.h5 (data, label, normal) and lists."""
    import h5py  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    base = Path(root) / "modelnet40_ply_hdf5_2048"
    base.mkdir(parents=True, exist_ok=True)
    for split, items in _ids(rng, train, test).items():
        data, normal, label, names = [], [], [], []
        for shape, k in items:
            cls = MODELNET_CLASS_OF[shape]
            v, f = random_instance(shape, rng)
            pts, nrm = sample_surface(v, triangulate(f), 2048, rng)
            data.append(_unit_sphere(pts))
            normal.append(nrm)
            label.append(MODELNET40_CLASSES.index(cls))
            names.append(f"{cls}/{cls}_{k:04d}.ply")
        with h5py.File(base / f"ply_data_{split}0.h5", "w") as h:
            h.create_dataset("data", data=np.array(data, dtype=np.float32))
            h.create_dataset("label", data=np.array(label, dtype=np.uint8)[:, None])
            h.create_dataset("normal", data=np.array(normal, dtype=np.float32))
        (base / f"ply_data_{split}_0_id2file.json").write_text(json.dumps(names))
        (base / f"{split}_files.txt").write_text(f"data/modelnet40_ply_hdf5_2048/ply_data_{split}0.h5\n")
    (base / "shape_names.txt").write_text("\n".join(MODELNET40_CLASSES) + "\n")
    return base


# ------------------------------------------------------------------------------------- ScanObjectNN
def _scan_object(shape: str, rng: np.random.Generator, with_bg: bool, n: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """One ScanObjectNN-like cloud: occluded noisy object points (mask = 1) and clutter (mask = -1)."""
    v, f = random_instance(shape, rng)
    tris = triangulate(f)
    pts, nrm = sample_surface(v, tris, 4 * n, rng)
    view = rng.normal(size=3)
    view[2] = abs(view[2]) * 0.5
    view /= np.linalg.norm(view)
    keep = nrm @ view > -0.2  # self-occlusion: mostly the faces seen from one side
    cut = pts[:, 2] > pts[:, 2].min() + rng.uniform(0, 0.15) * np.ptp(pts[:, 2])  # partly cut at the bottom
    obj = pts[keep & cut] + rng.normal(scale=0.005, size=(int((keep & cut).sum()), 3))
    n_bg = int(rng.uniform(0.1, 0.3) * n) if with_bg else 0
    obj = obj[rng.choice(len(obj), n - n_bg, replace=len(obj) < n - n_bg)]
    if n_bg:
        lo, hi = obj.min(0), obj.max(0)
        floor = np.c_[rng.uniform(lo[0] - 0.3, hi[0] + 0.3, n_bg), rng.uniform(lo[1] - 0.3, hi[1] + 0.3, n_bg),
                      np.full(n_bg, lo[2]) + rng.normal(scale=0.005, size=n_bg)]
        wall = floor.copy()
        wall[:, 1] = hi[1] + 0.3
        wall[:, 2] = rng.uniform(lo[2], hi[2], n_bg)
        bg = np.where(rng.random(n_bg)[:, None] < 0.6, floor, wall)
        cloud = np.concatenate([obj, bg])
        mask = np.concatenate([np.ones(len(obj), np.int64), -np.ones(n_bg, np.int64)])
        order = rng.permutation(n)
        return cloud[order], mask[order]
    return obj, np.ones(n, np.int64)


_PERTURB = {  # variant suffix -> (translate, rotate, scale) as in the paper's PB_* definitions
    "": (0.0, False, False),
    "_augmented25_norot": (0.25, False, False),
    "_augmented25rot": (0.25, True, False),
    "_augmentedrot": (0.5, True, False),
    "_augmentedrot_scale75": (0.5, True, True),
}


def write_scanobjectnn(root: Path, train: int = 3, test: int = 2, seed: int = 0,
                       variants: tuple[str, ...] = tuple(VARIANTS), split: str = "main_split") -> Path:
    """h5_files/<split>{,_nobg}/{training,test}_objectdataset*.h5 for the given variants; returns h5_files/."""
    import h5py  # noqa: PLC0415

    base = Path(root) / "h5_files"
    base.mkdir(parents=True, exist_ok=True)
    (Path(root) / "shape_names_ext.txt").write_text("\n".join(SCANOBJECTNN_CLASSES))  # official: no final newline
    for variant in variants:
        folder_sfx, file_sfx = VARIANTS[variant]
        rng = np.random.default_rng([seed, list(VARIANTS).index(variant)])
        shift, rotate, scale = _PERTURB[file_sfx]
        d = base / f"{split}{folder_sfx}"
        d.mkdir(parents=True, exist_ok=True)
        for sp, items in _ids(rng, train, test).items():
            data, label, mask = [], [], []
            for shape, _ in items:
                cloud, m = _scan_object(shape, rng, with_bg=folder_sfx == "")
                if rotate:
                    cloud = cloud @ _rot(np.array([0, 0, rng.uniform(0, 2 * np.pi)])).T
                if scale:
                    cloud = cloud * rng.uniform(0.75, 1.25)
                cloud = cloud + rng.uniform(-shift, shift, size=3) * np.ptp(cloud, 0) if shift else cloud
                data.append(cloud)
                label.append(SCANOBJECTNN_CLASSES.index(SCANOBJECTNN_CLASS_OF[shape]))
                mask.append(m)
            name = f"{'training' if sp == 'train' else 'test'}_objectdataset{file_sfx}.h5"
            with h5py.File(d / name, "w") as h:
                h.create_dataset("data", data=np.array(data, dtype=np.float32))
                h.create_dataset("label", data=np.array(label, dtype=np.int64))
                h.create_dataset("mask", data=np.array(mask, dtype=np.int64))
    return base


def write_all(root: Path, train: int = 3, test: int = 2, seed: int = 0) -> dict[str, Path]:
    """Every format under ``root``: {"off40", "off10", "normal_resampled", "ply_hdf5_2048", "scanobjectnn"}."""
    root = Path(root)
    return {
        "off40": write_modelnet_off(root / "off", train, test, seed, 40),
        "off10": write_modelnet_off(root / "off", train, test, seed, 10),
        "normal_resampled": write_modelnet_normal_resampled(root, train, test, seed),
        "ply_hdf5_2048": write_modelnet_ply_hdf5(root, train, test, seed),
        "scanobjectnn": write_scanobjectnn(root / "scanobjectnn", train, test, seed),
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m data_prep.synthetic_objects out=<folder> [seed=0] [train=3] [test=2]``."""
    kv = dict(a.split("=", 1) for a in (sys.argv[1:] if argv is None else argv) if "=" in a)
    if "out" not in kv:
        print(__doc__)
        return 2
    paths = write_all(Path(kv["out"]), int(kv.get("train", 3)), int(kv.get("test", 2)), int(kv.get("seed", 0)))
    for k, p in paths.items():
        print(f"{k}: {p}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
