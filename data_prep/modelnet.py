"""ModelNet40 / ModelNet10 preparer: object clouds with unit normals in ragged HDF5 shards.

Three raw sources are recognised (``source=auto`` picks the first found in raw= or one level below):

* ``off``: the Princeton meshes ``ModelNet40/<class>/{train,test}/<class>_<id>.off``. Points are sampled
  on the surface, area-weighted (``surface_points`` per mesh, deterministic for ``seed``), with the unit
  face normal of each sampled triangle (oriented by the face winding; ModelNet meshes are not
  consistently oriented, so some normals point inwards), then reduced to ``points``. The known malformed header where
  ``OFF`` and the counts share the first line ("OFF1234 5678 0") is read correctly.
* ``normal_resampled``: the PointNet++ release ``modelnet40_normal_resampled/`` with
  ``<class>/<class>_<id>.txt`` rows ``x,y,z,nx,ny,nz``, ``modelnet{40,10}_shape_names.txt`` and the
  split lists ``modelnet{40,10}_{train,test}.txt``.
* ``ply_hdf5_2048``: the PointNet release ``modelnet40_ply_hdf5_2048/ply_data_{train,test}<k>.h5`` with
  keys ``data`` (N,2048,3), ``label`` (N,1) and optionally ``normal`` (N,2048,3) (ModelNet40 only;
  modelnet10 keeps the 10 ModelNet10 classes and relabels them).

Output: ``out/<split>/shard_<k>.h5`` with per sample ``coord`` float32 [n,3], ``normal`` float32 [n,3]
(when normals=true) and ``label`` int64 (index into the manifest's ``classes``), plus manifest.json.
A listed file that is absent or unreadable (permission denied, broken symbolic link, a folder named like
the file) fails its own object only (others are still written; exit status 1) unless allow_missing=true,
which prepares what is there and lists the rest in the report. Refused: labels that are not whole numbers,
split lists that repeat an id or share ids between train and test, and objects with a stray point or
vertex so far out (e.g. at 1e30) that scaling into the unit sphere would squash the rest into the centre.

Point reduction (``sampling``): ``fps`` (farthest point sampling, as Pointcept's ModelNet recipes),
``random`` (uniform subset) or ``first`` (the first ``points`` rows of the source, as the official
PointNet++ loader does with ``modelnet40_normal_resampled``: ``np.loadtxt(fn, delimiter=',')[0:npoints]``
in charlesq34/pointnet2 ``modelnet_dataset.py``). The choice is recorded in the manifest's ``options``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from .common import (
    InputUnreadable,
    Option,
    OutputFolder,
    PrepError,
    Report,
    ShardJob,
    ShardResult,
    check_shard_jobs,
    input_key,
    input_problem,
    prep_command,
    read_input,
    read_text_input,
    require_folder,
    run_shard_jobs,
    sha256_file,
)

PREPARER_VERSION = "1.0"

#: Official class lists (alphabetical, as modelnet{40,10}_shape_names.txt); label = index.
MODELNET40_CLASSES = (
    "airplane bathtub bed bench bookshelf bottle bowl car chair cone cup curtain desk door dresser flower_pot "
    "glass_box guitar keyboard lamp laptop mantel monitor night_stand person piano plant radio range_hood sink "
    "sofa stairs stool table tent toilet tv_stand vase wardrobe xbox"
).split()
MODELNET10_CLASSES = "bathtub bed chair desk dresser monitor night_stand sofa table toilet".split()
SPLITS = ("train", "test")

OPTIONS: dict[str, Option] = {
    "num_classes": Option(40, "40 for ModelNet40, 10 for ModelNet10 (set by the dataset name)", int, (40, 10)),
    "source": Option("auto", "raw format to read; auto recognises the folder layout", str,
                     ("auto", "off", "normal_resampled", "ply_hdf5_2048")),
    "points": Option(1024, "points kept per object; 0 keeps every point of the source "
                     "(surface_points for meshes, 10000 for normal_resampled, 2048 for ply_hdf5_2048)", int),
    "sampling": Option("fps", "how points are reduced to `points`: fps = farthest point sampling (Pointcept), "
                       "random = uniform random subset, first = the first `points` rows of the source (the official "
                       "PointNet++ loader of modelnet40_normal_resampled)", str, ("fps", "random", "first")),
    "surface_points": Option(10000, "points drawn on each mesh surface (off source) before reduction", int),
    "normals": Option(True, "store unit normals (from the mesh faces or the source files)", bool),
    "normalize": Option(True, "centre each object at its centroid and scale it into the unit sphere", bool),
    "seed": Option(0, "seed of surface sampling and subsampling (per object: derived from seed and the name)", int),
    "allow_missing": Option(False, "prepare only the listed files that are present and readable and report the "
                            "rest (absent, unreadable, broken links), instead of failing on them", bool),
    "shard_size": Option(1024, "objects per output shard (one unit of work, skipped when already done)", int),
}

_OFF_HEAD = re.compile(r"^OFF\s*(\d+)\s+(\d+)(?:\s+(\d+))?\s*$")

#: A point (or mesh vertex) farther from the object's median than this many median distances is a stray
#: value (e.g. a vertex at 1e30): scaling into the unit sphere would squash the rest into the centre.
#: Real objects stay far below it (the real ModelNet40 samples tried: at most ~3).
SPREAD_LIMIT = 1e4


# ----------------------------------------------------------------------------------------- readers
def read_off(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(vertices [V,3] float64, triangles [T,3] int64) of an OFF mesh; polygons are fan-triangulated.

    Accepts ``OFF`` on its own line or glued to the counts ("OFF1234 5678 0"), comments (#) and blank
    lines. Raises PrepError naming the file and the field for anything else.
    """
    path = Path(path)
    try:
        text = read_input(path).decode("ascii", errors="strict")
    except UnicodeDecodeError as err:
        raise PrepError(f"non-ASCII byte at offset {err.start}", path, "header", "OFF meshes are ASCII text") from None
    lines = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines or not lines[0].startswith("OFF"):
        first = lines[0][:40] if lines else "<empty file>"
        raise PrepError(f"first line is {first!r}, expected 'OFF'", path, "header",
                        "re-download the mesh; only ASCII OFF files are accepted")
    m = _OFF_HEAD.match(lines[0])
    if m:  # malformed-but-common header: counts glued to OFF
        counts, body = m.groups(), lines[1:]
    elif lines[0] == "OFF" and len(lines) > 1:
        parts = lines[1].split()
        if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts):
            raise PrepError(f"counts line {lines[1][:40]!r} is not 'V F [E]'", path, "counts", "repair the header")
        counts, body = parts, lines[2:]
    else:
        raise PrepError(f"header {lines[0][:40]!r} is not 'OFF' or 'OFF<V> <F> <E>'", path, "header",
                        "repair the header (COFF/NOFF/binary OFF are not supported)")
    nv, nf = int(counts[0]), int(counts[1])
    if nv == 0 or nf == 0:
        raise PrepError(f"empty mesh ({nv} vertices, {nf} faces)", path, "counts", "drop or replace this mesh")
    if len(body) < nv + nf:
        raise PrepError(f"header announces {nv} vertices + {nf} faces but the file has {len(body)} data lines",
                        path, "counts", "the file is truncated; re-download it")
    verts = faces = None
    try:  # fast path: plain "x y z" vertices and "3 a b c" triangles (nearly every ModelNet file)
        v = np.array(" ".join(body[:nv]).split(), dtype=np.float64)
        f = np.array(" ".join(body[nv:nv + nf]).split(), dtype=np.int64)
        if v.size == 3 * nv and f.size == 4 * nf and (f[::4] == 3).all():
            verts, faces = v.reshape(nv, 3), f.reshape(nf, 4)[:, 1:]
    except ValueError:
        pass  # the careful path below names the bad line
    if verts is not None and faces is not None:
        return _validate_mesh(path, verts, faces, nv)
    try:
        vert_rows = [ln.split() for ln in body[:nv]]
        if any(len(r) < 3 for r in vert_rows):
            bad = next(i for i, r in enumerate(vert_rows) if len(r) < 3)
            raise PrepError(f"vertex {bad} has {len(vert_rows[bad])} values, expected 3", path, "vertices",
                            "repair the mesh")
        verts = np.array([r[:3] for r in vert_rows], dtype=np.float64)
    except ValueError as err:
        raise PrepError(f"unreadable vertex value ({err})", path, "vertices", "repair the mesh") from None
    tris = []
    try:
        for i, ln in enumerate(body[nv:nv + nf]):
            vals = ln.split()
            k = int(vals[0])
            if k < 3 or len(vals) < k + 1:
                raise PrepError(f"face {i} has {k} corners and {len(vals) - 1} indices", path, "faces", "repair the mesh")
            idx = [int(v) for v in vals[1:k + 1]]
            tris.extend((idx[0], idx[j], idx[j + 1]) for j in range(1, k - 1))  # fan triangulation
    except ValueError as err:
        raise PrepError(f"unreadable face index ({err})", path, "faces", "repair the mesh") from None
    return _validate_mesh(path, verts, np.array(tris, dtype=np.int64).reshape(-1, 3), nv)


def _validate_mesh(path: Path, verts: np.ndarray, faces: np.ndarray, nv: int) -> tuple[np.ndarray, np.ndarray]:
    if not np.isfinite(verts).all():
        bad = int((~np.isfinite(verts)).any(1).sum())
        raise PrepError(f"{bad} vertices have NaN or inf coordinates", path, "vertices", "repair the mesh")
    if faces.size and (faces.min() < 0 or faces.max() >= nv):
        raise PrepError(f"face indices span {faces.min()}..{faces.max()} but there are {nv} vertices", path, "faces",
                        "repair the mesh")
    return verts, faces


def sample_surface(verts: np.ndarray, faces: np.ndarray, n: int, rng: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points uniformly on the mesh surface (area-weighted) and the unit normal of their triangle.

    Returns (points [n,3], normals [n,3]) in float64. Degenerate (zero-area) triangles are never picked.
    """
    a, b, c = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    cross = np.cross(b - a, c - a)
    dbl_area = np.linalg.norm(cross, axis=1)
    total = dbl_area.sum()
    if not np.isfinite(total) or total <= 0:
        raise ValueError("mesh has zero surface area")
    cdf = np.cumsum(dbl_area)
    tri = np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right").clip(max=len(faces) - 1)
    u, v = rng.random(n), rng.random(n)
    flip = u + v > 1  # fold the unit square onto the triangle: uniform barycentric coordinates
    u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
    pts = a[tri] + u[:, None] * (b[tri] - a[tri]) + v[:, None] * (c[tri] - a[tri])
    normals = cross[tri] / dbl_area[tri, None]
    return pts, normals


def read_normal_txt(path: str | Path) -> np.ndarray:
    """[n,6] float64 rows ``x,y,z,nx,ny,nz`` of a modelnet40_normal_resampled file."""
    path = Path(path)
    rows = read_input(path).decode("ascii", errors="replace").split()
    if not rows:
        raise PrepError("file is empty", path, "rows", "re-download it")
    for i, r in enumerate(rows):
        if r.count(",") != 5:
            raise PrepError(f"line {i + 1} has {r.count(',') + 1} comma-separated values, expected 6 "
                            "(x,y,z,nx,ny,nz)", path, "rows", "re-download it")
    try:
        arr = np.array(",".join(rows).split(","), dtype=np.float64).reshape(-1, 6)
    except ValueError as err:
        raise PrepError(f"unreadable number ({err})", path, "rows", "re-download it") from None
    return arr


# -------------------------------------------------------------------------------------- processing
def _sample_rng(seed: int, name: str) -> np.random.Generator:
    # per-object stream: results do not depend on sharding, order or worker count
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def check_spread(points: np.ndarray, path: Path, what: str, field: str, index: np.ndarray | None = None) -> None:
    """PrepError when one of ``points`` [n,3] lies more than :data:`SPREAD_LIMIT` median distances from
    the median point (``index`` maps rows to the ids named in the message, e.g. mesh vertex numbers)."""
    if points.shape[0] < 2:
        return
    with np.errstate(over="ignore", invalid="ignore"):
        dist = np.linalg.norm(points - np.median(points, axis=0), axis=1)
    med = float(np.median(dist))
    far = int(np.argmax(np.where(np.isnan(dist), np.inf, dist)))
    if not dist[far] <= SPREAD_LIMIT * med:
        ratio = "infinitely many" if med == 0 else f"{dist[far] / med:.3g}"
        where = ", ".join(f"{v:.6g}" for v in points[far])
        raise PrepError(f"{what} {int(index[far]) if index is not None else far} at ({where}) lies {ratio} median "
                        f"distances from the object's median point (limit {SPREAD_LIMIT:g}); scaling into the unit "
                        "sphere would squash the rest of the object into its centre", path, field,
                        f"remove the stray {what} (repair the file) or drop this object")


def _finish(name: str, path: Path, coord: np.ndarray, normal: np.ndarray | None, label: int,
            options: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Validate, reduce to ``points`` and normalise one object; PrepError on bad values."""
    if coord.shape[0] == 0:
        raise PrepError("no points", path, "coord", "drop or replace this object")
    if not np.isfinite(coord).all():
        bad = int((~np.isfinite(coord)).any(1).sum())
        raise PrepError(f"{bad} points have NaN or inf coordinates", path, "coord", "repair or drop this object")
    check_spread(coord, path, "point", "coord")
    if normal is not None:
        norm = np.linalg.norm(normal, axis=1)
        bad = ~np.isfinite(norm) | (norm < 1e-6)
        if bad.any():
            raise PrepError(f"{int(bad.sum())} normals are zero, NaN or inf", path, "normal",
                            "repair the file or prepare with normals=false")
        normal = normal / norm[:, None]
    n = options["points"]
    if n and coord.shape[0] > n:
        if options["sampling"] == "fps":
            import torch  # noqa: PLC0415 - only the fps path needs torch

            from pcbench.ops import farthest_point_sample  # noqa: PLC0415

            start = int(rng.integers(coord.shape[0]))
            sel = farthest_point_sample(torch.from_numpy(coord), n=n, start=start).numpy()
        elif options["sampling"] == "first":
            sel = np.arange(n)
        else:
            sel = np.sort(rng.choice(coord.shape[0], n, replace=False))
        coord = coord[sel]
        normal = normal[sel] if normal is not None else None
    if options["normalize"]:
        coord = coord - coord.mean(0)
        radius = np.sqrt((coord ** 2).sum(1).max())
        if radius > 0:
            coord = coord / radius
    out = {"coord": coord.astype(np.float32)}
    if options["normals"]:
        if normal is None:
            raise PrepError("the source has no normals", path, "normal", "prepare with normals=false")
        out["normal"] = normal.astype(np.float32)
    out["label"] = np.array(label, dtype=np.int64)
    return out


def process_job(job: ShardJob, raw: Path, options: dict[str, Any]) -> ShardResult:
    """Convert one chunk of objects (payload: list of (name, relpath, label)) or one ply_hdf5 file."""
    if job.payload["source"] == "ply_hdf5_2048":
        return _process_ply_h5(job, raw, options)
    samples, names, failed, skipped, labels, counts = [], [], [], [], [], []
    for name, rel, label in job.payload["items"]:
        path = raw / rel
        rng = _sample_rng(options["seed"], name)
        try:
            if job.payload["source"] == "off":
                verts, faces = read_off(path)
                used = np.unique(faces)  # an unreferenced stray vertex never reaches the surface samples
                check_spread(verts[used], path, "vertex", "vertices", used)
                try:
                    coord, normal = sample_surface(verts, faces, options["surface_points"], rng)
                except ValueError as err:
                    raise PrepError(str(err), path, "faces", "drop or replace this mesh") from None
            else:
                arr = read_normal_txt(path)
                coord, normal = arr[:, :3], arr[:, 3:]
            sample = _finish(name, path, coord, normal if options["normals"] else None, label, options, rng)
        except InputUnreadable as err:
            (skipped if options["allow_missing"] else failed).append((name, str(err)))
            continue
        except PrepError as err:
            failed.append((name, str(err)))
            continue
        samples.append(sample)
        names.append(name)
        labels.append(label)
        counts.append(int(sample["coord"].shape[0]))
    return ShardResult(samples, names, failed, info={"labels": labels, "counts": counts}, skipped=skipped)


def _id2file(h5_path: Path) -> Path | None:
    # the release ships ply_data_<split>_<k>_id2file.json with "class/class_0001.ply" per row
    m = re.match(r"ply_data_(train|test)(\d+)\.h5$", h5_path.name)
    return h5_path.with_name(f"ply_data_{m.group(1)}_{m.group(2)}_id2file.json") if m else None


def _ply_names(h5_path: Path, n: int) -> list[str]:
    js = _id2file(h5_path)
    if js is not None and js.is_file():
        try:
            ids = json.loads(js.read_text())
            if len(ids) == n:
                return [Path(str(s)).stem for s in ids]
        except (json.JSONDecodeError, TypeError):
            pass
    return [f"{h5_path.stem}#{i:05d}" for i in range(n)]


def _process_ply_h5(job: ShardJob, raw: Path, options: dict[str, Any]) -> ShardResult:
    import h5py  # noqa: PLC0415

    path = raw / job.inputs[0]
    keep: dict[int, int] = job.payload["label_map"]  # source label -> output label (ModelNet10 subset)
    samples, names, failed, labels, counts, warnings = [], [], [], [], [], []
    problem = input_problem(path)
    if problem is not None and problem != "not found":
        raise InputUnreadable(f"cannot read ({problem})", path, None, "restore the file or its read permission")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise PrepError(f"not a readable HDF5 file ({err})", path, None, "re-download it") from None
    with f:
        _check_ply_h5(f, path, options["normals"])
        data = f["data"][()]
        lab = f["label"][()].reshape(-1)
        nrm = f["normal"][()] if options["normals"] else None
    if lab.dtype.kind == "f":
        warnings.append(str(PrepError(f"stored as {lab.dtype}, not an integer type: whole numbers are read as "
                                      "labels, any other value fails its object", path, "label",
                                      "use the official files (label uint8)")))
    ids = _ply_names(path, len(data))
    n_classes = len(MODELNET40_CLASSES)
    for i in range(len(data)):
        name = ids[i]
        value = lab[i].item()
        if not float(value).is_integer() or not 0 <= int(value) < n_classes:
            failed.append((name, str(PrepError(f"row {i}: label {value!r} is not a class index 0..{n_classes - 1}",
                                               path, "label", "re-download the file"))))
            continue
        li = int(value)
        if li not in keep:
            continue
        try:
            rng = _sample_rng(options["seed"], name)
            sample = _finish(name, path, data[i].astype(np.float64),
                             None if nrm is None else nrm[i].astype(np.float64), keep[li], options, rng)
        except PrepError as err:
            failed.append((name, f"row {i}: {err}"))
            continue
        samples.append(sample)
        names.append(name)
        labels.append(keep[li])
        counts.append(int(sample["coord"].shape[0]))
    return ShardResult(samples, names, failed, info={"labels": labels, "counts": counts}, warnings=warnings)


def _check_ply_h5(f: Any, path: Path, normals: bool) -> None:
    need = ["data", "label"] + (["normal"] if normals else [])
    for k in need:
        if k not in f:
            fix = "prepare with normals=false" if k == "normal" else "use the official modelnet40_ply_hdf5_2048 files"
            raise PrepError(f"key {k!r} missing (keys: {sorted(f.keys())})", path, k, fix)
    d = f["data"]
    if d.ndim != 3 or d.shape[2] != 3:
        raise PrepError(f"shape {d.shape}, expected (N, P, 3)", path, "data", "use the official files")
    if f["label"].shape[0] != d.shape[0] or f["label"].size != d.shape[0]:
        raise PrepError(f"shape {f['label'].shape}, expected ({d.shape[0]},) or ({d.shape[0]}, 1)", path, "label",
                        "use the official files")
    if f["label"].dtype.kind not in "iuf":
        raise PrepError(f"dtype {f['label'].dtype}, expected an integer type", path, "label", "use the official files")
    if normals and f["normal"].shape != d.shape:
        raise PrepError(f"shape {f['normal'].shape}, expected {d.shape} like data", path, "normal",
                        "use the official files or normals=false")


# ------------------------------------------------------------------------------------ raw discovery
def _classes(options: dict[str, Any]) -> list[str]:
    return list(MODELNET40_CLASSES if options["num_classes"] == 40 else MODELNET10_CLASSES)


def _find_source(raw: Path, options: dict[str, Any]) -> tuple[str, Path]:
    """(source kind, folder holding it) for raw=; PrepError listing what was looked for."""
    nc = options["num_classes"]
    want = options["source"]
    require_folder(raw, "give raw= the folder holding the ModelNet files")
    # the official folder names first, so that e.g. ModelNet10/ is not taken for modelnet40
    preferred = [raw / f"ModelNet{nc}", raw / "modelnet40_normal_resampled", raw / "modelnet40_ply_hdf5_2048"]
    others = sorted(p for p in raw.iterdir() if p.is_dir() and p not in preferred)
    cands = [raw] + [p for p in preferred if p.is_dir()] + others

    def kind(d: Path) -> str | None:
        if any(d.glob("modelnet*_shape_names.txt")) or any(d.glob(f"modelnet{nc}_train.txt")):
            return "normal_resampled"
        if any(d.glob("ply_data_*.h5")):
            return "ply_hdf5_2048"
        if any(os.path.isdir(d / c / s) for c in _classes(options) for s in SPLITS):
            return "off"
        return None

    for d in cands:
        k = kind(d)
        if k is not None and (want in ("auto", k)):
            return k, d
    raise PrepError(
        f"no ModelNet{nc} source recognised{'' if want == 'auto' else f' of kind {want}'}", raw, "raw",
        f"point raw= at ModelNet{nc}/ (<class>/train/*.off), modelnet40_normal_resampled/ or "
        "modelnet40_ply_hdf5_2048/ (or their parent folder)")


def _read_list(path: Path, what: str = "list") -> list[str]:
    text = read_text_input(path, what, "restore the official file (UTF-8 text, one entry per line)")
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def _check_class_names(path: Path, classes: list[str]) -> list[str]:
    if not path.is_file():
        return []
    got = _read_list(path, "class name list")
    if got != classes:
        return [str(PrepError(f"class names {got[:5]}... differ from the official ModelNet{len(classes)} list",
                              path, "classes", "use the official shape_names file"))]
    return []


def _list_problems(lists: dict[str, tuple[Path, list[str]]]) -> list[str]:
    """Repeated ids within a split list and ids shared by two lists (train/test leakage)."""
    problems = []
    for split, (path, ids) in lists.items():
        reps = sorted(k for k, c in Counter(ids).items() if c > 1)
        if reps:
            problems.append(str(PrepError(f"{len(reps)} id(s) listed more than once, e.g. {', '.join(reps[:5])}",
                                          path, split, "restore the official list (each id once)")))
    names = list(lists)  # train before test
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            both = sorted(set(lists[a][1]) & set(lists[b][1]))
            if both:
                problems.append(str(PrepError(
                    f"{len(both)} id(s) are in both the {a} and the {b} list ({a}/{b} leakage), e.g. {', '.join(both[:5])}",
                    lists[b][0], b, f"restore the official {lists[a][0].name} and {lists[b][0].name}")))
    return problems


def _plan(raw: Path, options: dict[str, Any]) -> tuple[str, Path, dict[str, list[tuple[str, str, int]]],
                                                       list[tuple[str, str]], list[str]]:
    """Discover the source: (kind, root, {split: [(name, relpath, label)]}, [(absent or unreadable input,
    reason)], problems that stop preparation)."""
    kind, root = _find_source(raw, options)
    classes = _classes(options)
    nc = options["num_classes"]
    items: dict[str, list[tuple[str, str, int]]] = {s: [] for s in SPLITS}
    missing: list[tuple[str, str]] = []
    problems: list[str] = []
    if kind == "normal_resampled":
        problems += _check_class_names(root / f"modelnet{nc}_shape_names.txt", classes)
        lists = {}
        for split in SPLITS:
            lst = root / f"modelnet{nc}_{split}.txt"
            if not lst.is_file():
                problems.append(str(PrepError("split list missing", lst, split,
                                              f"copy modelnet{nc}_{split}.txt from the official release into {root}")))
                continue
            lists[split] = (lst, _read_list(lst, "split list"))
        problems += _list_problems(lists)
        for split, (lst, ids) in lists.items():
            for shape_id in dict.fromkeys(ids):
                cls = shape_id.rsplit("_", 1)[0]
                if cls not in classes:
                    problems.append(str(PrepError(f"id {shape_id!r} has unknown class {cls!r}", lst, split,
                                                  "use the official list")))
                    continue
                rel = f"{cls}/{shape_id}.txt"
                why = input_problem(root / rel)
                if why is None:
                    items[split].append((shape_id, rel, classes.index(cls)))
                elif why == "not found":
                    missing.append((rel, why))
                else:  # present but unreadable: its sample fails (or is skipped) when read, by itself
                    items[split].append((shape_id, rel, classes.index(cls)))
    elif kind == "off":
        for cls in classes:
            for split in SPLITS:
                d = root / cls / split
                if not os.path.isdir(d):
                    missing.append((f"{cls}/{split}/", "folder not found"))
                    continue
                try:  # pathlib's glob skips an unreadable folder silently; its objects must not vanish
                    with os.scandir(d) as it:
                        found = sorted(e.name for e in it if e.name.endswith(".off"))
                except OSError as err:
                    missing.append((f"{cls}/{split}/", f"folder unreadable ({(err.strerror or str(err)).lower()})"))
                    continue
                items[split] += [(Path(n).stem, f"{cls}/{split}/{n}", classes.index(cls)) for n in found]
    else:
        problems += _check_class_names(root / "shape_names.txt", MODELNET40_CLASSES)
        for split in SPLITS:
            files = sorted(root.glob(f"ply_data_{split}*.h5"), key=lambda p: (len(p.name), p.name))
            if not files:
                missing.append((f"ply_data_{split}*.h5", "not found"))
            items[split] = [(p.stem, p.name, -1) for p in files]
    return kind, root, items, missing, problems


def _metadata_files(root: Path, kind: str, nc: int) -> list[Path]:
    if kind == "normal_resampled":
        names = [f"modelnet{nc}_shape_names.txt", f"modelnet{nc}_train.txt", f"modelnet{nc}_test.txt"]
    elif kind == "ply_hdf5_2048":
        names = ["shape_names.txt", *sorted(p.name for p in root.glob("ply_data_*_id2file.json"))]
    else:
        names = []
    return [root / n for n in names if (root / n).is_file()]


def _check_options(options: dict[str, Any]) -> None:
    for key in ("points", "surface_points", "shard_size"):
        if options[key] < (0 if key == "points" else 1):
            raise PrepError(f"{key}={options[key]} is out of range", None, key,
                            f"give {key} >= {0 if key == 'points' else 1}")


def _jobs(kind: str, root: Path, items: dict[str, list[tuple[str, str, int]]], options: dict[str, Any]
          ) -> list[ShardJob]:
    classes = _classes(options)
    jobs: list[ShardJob] = []
    for split in SPLITS:
        if kind == "ply_hdf5_2048":
            label_map = {MODELNET40_CLASSES.index(c): i for i, c in enumerate(classes)}
            for k, (_, rel, _) in enumerate(items[split]):
                ids = _id2file(root / rel)
                jobs.append(ShardJob(f"{split}/{k:05d}", split, f"{split}/shard_{k:05d}.h5",
                                     [rel] + ([ids.name] if ids is not None and ids.is_file() else []),
                                     {"source": kind, "label_map": label_map}))
            continue
        its = items[split]
        step = options["shard_size"]
        for k in range(0, max(len(its), 1), step):
            chunk = its[k:k + step]
            jobs.append(ShardJob(f"{split}/{k // step:05d}", split, f"{split}/shard_{k // step:05d}.h5",
                                 [rel for _, rel, _ in chunk], {"source": kind, "items": chunk}))
    return jobs


def check(raw: Path, options: dict[str, Any], workers: int = 1, progress: bool | None = None) -> list[str]:
    """Every problem :func:`prepare` would meet, without writing: the layout, the lists, and each object
    read and converted as in preparation (absent or unreadable inputs count unless allow_missing=true)."""
    try:
        _check_options(options)
        kind, root, items, missing, problems = _plan(Path(raw), options)
    except PrepError as err:
        return [str(err)]
    if problems:  # preparation would refuse to start; converting the objects would add nothing
        return problems
    if missing and not options["allow_missing"]:
        by_dir: dict[str, list[str]] = {}
        for m, why in missing:
            by_dir.setdefault(m.split("/", 1)[0], []).append(f"{m} ({why})")
        for d, ms in sorted(by_dir.items()):
            problems.append(f"{root / d}: {len(ms)} listed input(s) absent or unreadable, e.g. {', '.join(ms[:3])} "
                            "(fix: add them, or prepare with allow_missing=true)")
    for split, its in items.items():
        if not its:
            problems.append(f"{root}: split {split!r} has no readable inputs")
    return problems + check_shard_jobs(process_job, root, options, _jobs(kind, root, items, options), workers,
                            desc=f"modelnet{options['num_classes']}", progress=progress)


# ------------------------------------------------------------------------------------------ prepare
def prepare(raw: Path, out: Path, options: dict[str, Any], workers: int = 1) -> Report:
    """Prepare ModelNet{40,10} from raw= into out= (see the module docstring); resumable and atomic."""
    t0 = time.perf_counter()
    raw, out = Path(raw), Path(out)
    _check_options(options)
    kind, root, items, missing, problems = _plan(raw, options)
    if problems:
        raise PrepError("raw folder not usable:\n  " + "\n  ".join(problems), raw, None,
                        "fix the files listed above (pcbench-prep ... --check lists every problem)")
    dataset = f"modelnet{options['num_classes']}"
    classes = _classes(options)
    report = Report(dataset=dataset, out=str(out))
    if missing:
        if options["allow_missing"]:
            report.missing = [f"{m} ({why})" for m, why in missing]
        else:
            report.failed += [(m, str(PrepError(f"listed input {why}", root / m, None,
                                                "add it, or prepare with allow_missing=true")))
                              for m, why in missing]
    jobs = _jobs(kind, root, items, options)
    command = prep_command(dataset, raw, out, {k: v for k, v in options.items() if k != "num_classes"}, OPTIONS)
    with OutputFolder(out, dataset, command) as folder:
        folder.claim(j.output for j in jobs)
        records = run_shard_jobs(process_job, root, out, options, jobs, workers, report, desc=dataset,
                                 salt=PREPARER_VERSION, before_write=folder.begin_writes)
        short = [(n, c) for r in records for n, c in zip(r["names"], r["info"]["counts"], strict=True)
                 if options["points"] and c < options["points"]]
        if short:
            report.warnings.append(f"{len(short)} objects have fewer than points={options['points']} points and keep "
                                   f"all they have, e.g. {short[0][0]} ({short[0][1]})")
        manifest = _manifest(dataset, raw, root, out, kind, options, classes, jobs, records, command)
        for meta in _metadata_files(root, kind, options["num_classes"]):  # lists and names decide labels too
            manifest["inputs"][input_key(meta, raw)] = sha256_file(meta)
        report.seconds = time.perf_counter() - t0
        manifest["validation"] = report.to_dict()
        folder.commit(manifest, report, complete=len(records) == len(jobs), units=[j.key for j in jobs])
    return report


def _manifest(dataset: str, raw: Path, root: Path, out: Path, kind: str, options: dict[str, Any],
              classes: list[str], jobs: list[ShardJob], records: list[dict[str, Any]], command: str
              ) -> dict[str, Any]:
    """Manifest assembled from the unit records (so skipped units count exactly like fresh ones)."""
    by_key = {r["unit"]: r for r in records}
    splits: dict[str, Any] = {}
    stats: dict[str, dict[str, int]] = {}
    inputs: dict[str, str] = {}
    outputs: dict[str, str] = {}
    for job in jobs:
        rec = by_key.get(job.key)
        sp = splits.setdefault(job.split, {"files": [], "num_samples": 0, "num_points": []})
        st = stats.setdefault(job.split, dict.fromkeys(classes, 0))
        if rec is None:
            continue
        inputs.update({input_key(root / k, raw): v for k, v in rec["inputs"].items() if v is not None})
        outputs.update(rec["outputs"])
        n = len(rec["names"])
        sp["files"].append({"path": job.output, "num_samples": n, "num_points": rec["info"]["counts"]})
        sp["num_samples"] += n
        sp["num_points"] += rec["info"]["counts"]
        for lab in rec["info"]["labels"]:
            st[classes[lab]] += 1
    for sp in splits.values():  # summarise the per-object counts
        c = np.asarray(sp.pop("num_points"), dtype=np.int64)
        sp["points_per_sample"] = ({"min": int(c.min()), "max": int(c.max()), "total": int(c.sum())}
                                   if c.size else {"min": 0, "max": 0, "total": 0})
    return {
        "dataset": dataset,
        "task": "classification",
        "preparer_version": PREPARER_VERSION,
        "command": command,
        "raw": str(raw),
        "source": kind,
        "options": options,
        "sampling": SAMPLING_NOTES[options["sampling"]] if options["points"] else "every point of the source kept",
        "classes": classes,
        "label_map": {c: i for i, c in enumerate(classes)},
        "keys": ["coord", "normal", "label"] if options["normals"] else ["coord", "label"],
        "splits": splits,
        "inputs": inputs,
        "outputs": outputs,
        "label_stats": stats,
        "validation": {},
    }


#: What each ``sampling`` choice does, recorded in the manifest beside the options.
SAMPLING_NOTES = {
    "fps": "farthest point sampling from a random start per object (seeded), as Pointcept's ModelNet recipes",
    "random": "uniform random subset without replacement per object (seeded), in source order",
    "first": "the first `points` rows of the source, as the official PointNet++ loader "
             "(charlesq34/pointnet2 modelnet_dataset.py: point_set[0:npoints])",
}
