"""ScanNet v2 preparer: official ``scans/`` layout -> ragged HDF5 shards + ``manifest.json``.

Inputs (official names): ``scans/<scene>/`` (test scenes may also sit in ``scans_test/<scene>/``) with
``<scene>_vh_clean_2.ply`` (mesh), ``<scene>_vh_clean_2.0.010000.segs.json`` (over-segmentation),
``<scene>.aggregation.json`` (segGroups = instances with a raw category), ``<scene>_vh_clean_2.labels.ply``
(per-vertex label, used only as a cross-check) and ``<scene>.txt`` (``axisAlignment``);
``scannetv2-labels.combined.tsv`` (at the raw root or in ``tasks/``) and the split lists
``scannetv2_{train,val,test}.txt`` (raw root or ``Tasks/Benchmark/``, as in the ScanNet repository).
The benchmark class tables (ids and names) are packaged in ``data_prep/meta/scannet{20,200}_ids.txt``.

Labels come from segs + aggregation + tsv, as the official benchmark scripts derive them:
``raw category -> tsv row -> nyu40id`` gives ScanNet20 (the 20 benchmark nyu40 ids -> 0..19) and
``raw category -> tsv id`` gives ScanNet200 (the 200 benchmark ids -> 0..199); everything else is
ignore (-1). ``instance`` is the segGroup ``objectId`` (-1 = none), kept for every group, also those
whose category is unknown or outside a label set. Where segGroups overlap, the later
group wins (as in the official export scripts) and the overlap is counted in the report. Raw categories
missing from the tsv (e.g. ScanNet v1's ``trashcan``/``dishrack``) map to ignore and are listed.

Versions: real copies mix ScanNet v1 and v2 files (the public scene0000_00 sample has a v2 mesh and
scene txt but v1 annotations whose ``labels.ply`` holds v1 label ids). Each scene's report says what
was detected from the aggregation (``appId``, ``scannet.`` id prefix), the scene txt (``axisAlignment``
present or not) and the labels.ply value ranges (agreement with the aggregation read as nyu40 ids or
as v1 ids through the v1 tsv ``scannet-labels.combined.tsv`` when it is found), and lists the
disagreements and invalid ids (e.g. the values 50 and 149 seen in some v2 labels.ply) instead of
silently trusting either source.

Axis alignment (option ``axis_align``, default false): the benchmark scores per-vertex labels, so the
frame is a modelling choice. By default coordinates stay in the mesh frame, as in Pointcept's ScanNet
preprocessing (its alignment code is commented out), because scenes without an ``axisAlignment`` line
(v1 scene files, and the test scenes: votenet's and mmdetection3d's ``load_scannet_data.py`` note "test
set data doesn't have align_matrix") would otherwise sit in a different frame from the rest. The 4x4
matrix of every scene is stored per scene (``axis_alignment``, NaN where absent) so it can be applied
later (``ScanNetDataset(axis_align=True)``); ``axis_align=true`` applies it at preparation, like
ScanNet's own ScanNet200 preprocessing script and votenet (coords and normals), and lists the scenes
that had none (left unaligned, where those scripts use the identity).

Output: ``<split>/<split>_<k>.h5`` shards of ``shard_size`` scenes in the ragged format of
:func:`data_prep.common.write_ragged_h5` with per-scene keys ``coord`` [N,3] float32, ``color`` [N,3]
uint8, ``normal`` [N,3] float32 (area-weighted vertex normals of the mesh faces, unit length; zero for
vertices on no face), ``label20``/``label200`` [N] int16, ``instance`` [N] int32, ``nyu40`` [N] int16
(0 = none), ``axis_alignment`` [4,4] float64 and ``aligned`` (0-d bool). An ``out=`` folder holds one
preparation: shards that the current options do not produce (left by an earlier run with other
``splits``/``scenes``/``shard_size``) are deleted, so every shard on disk is listed in the manifest.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.common import (
    DoneLog,
    InputUnreadable,
    Option,
    OutputFolder,
    PrepError,
    Report,
    atomic_write,
    hash_files,
    input_key,
    input_problem,
    parallel_map,
    parse_options,
    prep_command,
    read_input,
    read_text_input,
    require_folder,
    sha256_file,
    write_ragged_h5,
)

DATASET = "scannet"
#: Bump when the prepared values change for the same inputs (forces finished shards to be redone).
PREPARER_VERSION = "1.0"
IGNORE_INDEX = -1
META_DIR = Path(__file__).resolve().parent / "meta"
SPLITS = ("train", "val", "test")
TSV_NAME = "scannetv2-labels.combined.tsv"
V1_TSV_NAME = "scannet-labels.combined.tsv"
SCENE_RE = re.compile(r"^scene\d{4}_\d{2}$")

OPTIONS: dict[str, Option] = {
    "axis_align": Option(False, "apply each scene's axisAlignment matrix to coords and normals (the matrix "
                                "is stored per scene either way)", bool),
    "splits": Option("train,val,test", "comma-separated official splits to prepare (train, val, test)"),
    "scenes": Option("all", "'all' = every scene of the chosen split lists; 'present' = only those whose "
                            "folder exists; or a comma-separated list of scene ids"),
    "allow_missing": Option(False, "with scenes=all, skip (and report) listed scenes whose folder is absent "
                                   "or whose files cannot be read, instead of failing them", bool),
    "shard_size": Option(16, "scenes per HDF5 shard (unit of resumable work; bounds memory per worker)", int),
    "v1_tsv": Option("", "path of ScanNet v1's scannet-labels.combined.tsv to read v1 labels.ply ids "
                         "(default: looked up in raw/ and raw/v1_extras/)"),
    "check_labels_ply": Option(True, "cross-check the per-vertex labels.ply against segs+aggregation and "
                                     "report disagreements", bool),
}

SCENE_KEYS = ("coord", "color", "normal", "label20", "label200", "instance", "nyu40", "axis_alignment", "aligned")


# ------------------------------------------------------------------------------------- class tables
@dataclass(frozen=True)
class ClassSet:
    """One benchmark label set: ``source_ids[i]`` (nyu40 or tsv id) is train label ``i`` named ``names[i]``."""

    name: str
    source_ids: tuple[int, ...]
    names: tuple[str, ...]

    def lut(self, size: int) -> np.ndarray:
        """int16 look-up table [size]: source id -> train label, IGNORE_INDEX elsewhere."""
        lut = np.full(size, IGNORE_INDEX, dtype=np.int16)
        ids = np.asarray(self.source_ids, dtype=np.int64)
        ok = ids < size
        lut[ids[ok]] = np.nonzero(ok)[0].astype(np.int16)
        return lut


@functools.cache
def class_set(name: str) -> ClassSet:
    """The packaged ScanNet20 (``"scannet20"``) or ScanNet200 (``"scannet200"``) class table."""
    if name not in ("scannet20", "scannet200"):
        raise ValueError(f"class set {name!r} is unknown; use 'scannet20' or 'scannet200'")
    path = META_DIR / f"{name}_ids.txt"
    ids, names = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#"):
            continue
        idx, src, label = line.split("\t")
        if int(idx) != len(ids):
            raise PrepError(f"train ids must be 0..K-1 in order, got {idx} at position {len(ids)}", path, "train id")
        ids.append(int(src))
        names.append(label)
    return ClassSet(name, tuple(ids), tuple(names))


@dataclass
class LabelTable:
    """``scannetv2-labels.combined.tsv``: raw category -> (tsv id, nyu40 id), with the official names kept."""

    path: str
    sha256: str
    raw_to_id: dict[str, int]
    raw_to_nyu40: dict[str, int]
    nyu40_names: dict[int, str]  # official nyu40class spelling (e.g. 'refridgerator')


TSV_REQUIRED = ("id", "raw_category", "nyu40id", "nyu40class")


def read_label_table(path: str | os.PathLike) -> LabelTable:
    """Parse the v2 label tsv (CRLF, empty fields tolerated); PrepError naming the row and column on bad values."""
    path = Path(path)
    if not path.is_file():
        raise PrepError("label map not found", path, None,
                        f"copy {TSV_NAME} from the ScanNet download (tasks/{TSV_NAME}) to the raw folder")
    text = read_text_input(path, "label map", f"restore the official {TSV_NAME} of ScanNet v2")
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t")
    header = reader.fieldnames or []
    if "raw_category" not in header and "category" in header and "nyu40id" in header:
        raise PrepError("this is the ScanNet v1 label map (no raw_category column)", path, "header",
                        f"use ScanNet v2's {TSV_NAME}; a v1 map may be passed as v1_tsv=<path> for v1 labels.ply ids")
    missing = [c for c in TSV_REQUIRED if c not in header]
    if missing:
        raise PrepError(f"columns {missing} missing (header has {header})", path, "header",
                        f"use the official {TSV_NAME} of ScanNet v2")
    raw_to_id: dict[str, int] = {}
    raw_to_nyu40: dict[str, int] = {}
    nyu40_names: dict[int, str] = {}
    for row_no, row in enumerate(reader, start=2):
        raw = row["raw_category"]
        try:
            tid = int(row["id"])
            nyu = int(row["nyu40id"])
        except (TypeError, ValueError):
            raise PrepError(f"line {row_no}: id={row['id']!r} nyu40id={row['nyu40id']!r} are not integers", path,
                            "id/nyu40id", "restore the official file") from None
        if not 0 <= nyu <= 40:
            raise PrepError(f"line {row_no}: nyu40id={nyu} outside 0..40", path, "nyu40id", "restore the official file")
        # the first row of a raw category wins, as in the official scripts' pandas lookup (``.iloc[0]``)
        raw_to_id.setdefault(raw, tid)
        raw_to_nyu40.setdefault(raw, nyu)
        nyu40_names.setdefault(nyu, row["nyu40class"])
    if not raw_to_id:
        raise PrepError("no rows", path, None, "restore the official file")
    return LabelTable(str(path), sha256_file(path), raw_to_id, raw_to_nyu40, nyu40_names)


def read_v1_label_table(path: str | os.PathLike) -> dict[int, int]:
    """ScanNet v1 ``scannet-labels.combined.tsv``: v1 label id -> nyu40 id (0 where the field is empty)."""
    path = Path(path)
    text = read_text_input(path, "v1 label map", f"give ScanNet v1's {V1_TSV_NAME} as distributed (UTF-8)")
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t")
    if not {"id", "category", "nyu40id"} <= set(reader.fieldnames or []):
        raise PrepError(f"not a ScanNet v1 label map (header {reader.fieldnames})", path, "header",
                        f"give ScanNet v1's {V1_TSV_NAME} (columns id, category, nyu40id)")
    out = {0: 0}
    for row_no, row in enumerate(reader, start=2):
        try:
            out[int(row["id"])] = int(row["nyu40id"]) if row["nyu40id"] else 0
        except ValueError:
            raise PrepError(f"line {row_no}: id={row['id']!r} nyu40id={row['nyu40id']!r}", path, "id/nyu40id",
                            "restore the official v1 file") from None
    return out


# --------------------------------------------------------------------------------------- raw readers
@dataclass
class Mesh:
    """Vertices and triangles of a ``_vh_clean_2.ply``."""

    coord: np.ndarray  # [N,3] float32
    color: np.ndarray  # [N,3] uint8
    faces: np.ndarray  # [F,3] int64


def _read_ply(path: Path, what: str):
    from plyfile import PlyData, PlyParseError  # noqa: PLC0415

    why = input_problem(path)
    if why == "not found":
        raise PrepError(f"{what} not found", path, None, "re-download the scene (download-scannet.py)")
    if why is not None:
        read_input(path)  # raises InputUnreadable with the reason and the fix
    try:
        try:
            return PlyData.read(str(path), known_list_len={"face": {"vertex_indices": 3}})
        except PlyParseError as err:
            if "unexpected list length" not in str(err):
                raise
            return PlyData.read(str(path), mmap=False)
    except PlyParseError as err:
        elem = getattr(getattr(err, "element", None), "name", None)
        prop = getattr(getattr(err, "prop", None), "name", None)
        fld = ".".join(p for p in (elem, prop) if p) or "header"
        raise PrepError(f"corrupt or truncated PLY ({err})", path, fld,
                        "re-download the file; its size or header does not match the data") from None
    except OSError as err:
        if getattr(err, "errno", None) is not None:  # the file system refused (permission, I/O error)
            read_input(path)
        raise PrepError(f"unreadable PLY ({err})", path, None, "re-download the file") from None
    except (ValueError, EOFError) as err:
        raise PrepError(f"unreadable PLY ({err})", path, None, "re-download the file") from None


def _vertex_fields(ply, path: Path, names: Sequence[str]) -> list[np.ndarray]:
    try:
        vert = ply["vertex"]
    except KeyError:
        raise PrepError("no 'vertex' element", path, "vertex", "re-download the file") from None
    have = [p.name for p in vert.properties]
    missing = [n for n in names if n not in have]
    if missing:
        raise PrepError(f"vertex properties {missing} missing (file has {have})", path,
                        "vertex." + missing[0], "use the official ScanNet file")
    return [np.asarray(vert[n]) for n in names]


def read_mesh(path: str | os.PathLike) -> Mesh:
    """Read a ScanNet mesh ply; PrepError naming file and field on missing/corrupt data, NaN/inf, empty or bad faces."""
    path = Path(path)
    ply = _read_ply(path, "mesh")
    x, y, z, r, g, b = _vertex_fields(ply, path, ("x", "y", "z", "red", "green", "blue"))
    coord = np.stack([x, y, z], axis=1).astype(np.float32)
    color = np.stack([r, g, b], axis=1)
    if color.dtype != np.uint8:
        raise PrepError(f"colour properties have dtype {color.dtype}, expected uchar", path, "vertex.red",
                        "use the official ScanNet mesh")
    n = coord.shape[0]
    if n == 0:
        raise PrepError("empty mesh (0 vertices)", path, "element vertex", "re-download the scene")
    bad = ~np.isfinite(coord)
    if bad.any():
        rows, cols = np.nonzero(bad)
        raise PrepError(f"{len(np.unique(rows))} vertices have NaN/inf coordinates (first: vertex {rows[0]})",
                        path, "vertex." + "xyz"[cols[0]], "re-download the scene; the mesh is damaged")
    if "face" not in [e.name for e in ply.elements]:
        raise PrepError("no 'face' element (normals need triangles)", path, "face", "use the official mesh")
    fdata = ply["face"].data
    if "vertex_indices" not in fdata.dtype.names:
        raise PrepError(f"face properties {fdata.dtype.names} lack vertex_indices", path, "face.vertex_indices",
                        "use the official mesh")
    fv = fdata["vertex_indices"]
    if fv.dtype == object:  # variable-length lists (slow path): ScanNet meshes are triangles only
        lens = np.fromiter((len(f) for f in fv), dtype=np.int64, count=len(fv))
        if (lens != 3).any():
            i = int(np.nonzero(lens != 3)[0][0])
            raise PrepError(f"face {i} has {lens[i]} vertices, expected triangles", path, "face.vertex_indices",
                            "use the official triangle mesh")
        fv = np.stack(fv) if len(fv) else np.zeros((0, 3), np.int64)
    faces = np.asarray(fv, dtype=np.int64).reshape(-1, 3)
    if faces.size and (faces.min() < 0 or faces.max() >= n):
        raise PrepError(f"face indices span {faces.min()}..{faces.max()} but there are {n} vertices", path,
                        "face.vertex_indices", "re-download the scene; the mesh is damaged")
    return Mesh(coord, np.ascontiguousarray(color), faces)


def read_labels_ply(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(coord [N,3] float32, label [N] int64)`` of a ``_vh_clean_2.labels.ply``."""
    path = Path(path)
    ply = _read_ply(path, "labels ply")
    x, y, z, label = _vertex_fields(ply, path, ("x", "y", "z", "label"))
    return np.stack([x, y, z], axis=1).astype(np.float32), label.astype(np.int64)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if input_problem(path) == "not found":
        raise PrepError(f"{what} not found", path, None, "re-download the scene (download-scannet.py)")
    try:
        data = json.loads(read_input(path).decode("utf-8"))  # CRLF (v1 files) is plain JSON whitespace
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PrepError(f"unreadable JSON ({err})", path, None, "re-download the file") from None
    if not isinstance(data, dict):
        raise PrepError(f"expected a JSON object, got {type(data).__name__}", path, None, "re-download the file")
    return data


def read_segs(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """``(segIndices [N] int64, other keys)`` of a ``*.segs.json``."""
    path = Path(path)
    data = _read_json(path, "over-segmentation")
    if "segIndices" not in data:
        raise PrepError(f"key segIndices missing (keys {sorted(data)})", path, "segIndices", "re-download the file")
    values = data["segIndices"]
    try:
        seg = np.asarray(values)
    except (TypeError, ValueError, OverflowError):
        raise PrepError("segIndices is not a list of integers", path, "segIndices", "re-download the file") from None
    if seg.ndim != 1:
        raise PrepError(f"segIndices has shape {seg.shape}, expected a flat list", path, "segIndices",
                        "re-download the file")
    if seg.size and seg.dtype.kind not in "iu":
        # a float (3.0 or 3.5) would be truncated silently into another segment id
        bad = next(i for i, v in enumerate(values) if isinstance(v, bool) or not isinstance(v, int))
        raise PrepError(f"segIndices[{bad}] = {values[bad]!r} is not an integer", path, "segIndices",
                        "re-download the file")
    seg = seg.astype(np.int64)
    if seg.size and seg.min() < 0:
        bad = int(np.argmax(seg < 0))
        raise PrepError(f"segIndices[{bad}] = {int(seg[bad])} is negative", path, "segIndices", "re-download the file")
    return seg, {k: v for k, v in data.items() if k != "segIndices"}


@dataclass
class Group:
    """One aggregation segGroup."""

    id: int
    object_id: int
    segments: np.ndarray
    label: str


def read_aggregation(path: str | os.PathLike) -> tuple[list[Group], dict[str, Any]]:
    """``(segGroups, header keys)`` of a ``<scene>.aggregation.json``."""
    path = Path(path)
    data = _read_json(path, "aggregation")
    if not isinstance(data.get("segGroups"), list):
        raise PrepError("key segGroups missing or not a list", path, "segGroups", "re-download the file")
    groups = []
    for i, g in enumerate(data["segGroups"]):
        try:
            groups.append(Group(int(g["id"]), int(g["objectId"]), np.asarray(g["segments"], dtype=np.int64).ravel(),
                                str(g["label"])))
        except (KeyError, TypeError, ValueError) as err:
            raise PrepError(f"segGroups[{i}] is malformed ({type(err).__name__}: {err})", path,
                            f"segGroups[{i}]", "each group needs id, objectId, segments and label") from None
    return groups, {k: v for k, v in data.items() if k != "segGroups"}


def read_scene_meta(path: str | os.PathLike) -> tuple[dict[str, str], np.ndarray | None]:
    """``(key = value pairs, axisAlignment 4x4 float64 or None)`` of a ``<scene>.txt``."""
    path = Path(path)
    if input_problem(path) == "not found":
        raise PrepError("scene meta file not found", path, None, "re-download the scene's <scene>.txt")
    pairs = {}
    for line in read_input(path).decode("utf-8", errors="replace").splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            pairs[k.strip()] = v.strip()
    mat = None
    if "axisAlignment" in pairs:
        try:
            vals = [float(t) for t in pairs["axisAlignment"].split()]
        except ValueError:
            vals = []
        if len(vals) != 16 or not all(math.isfinite(v) for v in vals):
            raise PrepError(f"axisAlignment must be 16 finite numbers, got {pairs['axisAlignment'][:80]!r}", path,
                            "axisAlignment", "re-download the scene's <scene>.txt")
        mat = np.asarray(vals, dtype=np.float64).reshape(4, 4)
    return pairs, mat


def alignment_problem(mat: np.ndarray, tol: float = 1e-3) -> str | None:
    """Why a 4x4 ``axisAlignment`` is not a rigid transform (rotation + translation), or None.

    An all-zero or scaled matrix would collapse or distort the scene (e.g. every coordinate 0).
    """
    rot = mat[:3, :3]
    if not np.allclose(mat[3], [0, 0, 0, 1], atol=tol):
        return f"last row is {mat[3].tolist()}, expected [0, 0, 0, 1]"
    err = float(np.abs(rot.T @ rot - np.eye(3)).max())
    if err > tol:
        return f"the 3x3 part is not a rotation (|R^T R - I| = {err:.3g})"
    if np.linalg.det(rot) < 0:
        return "the 3x3 part is a reflection (determinant -1)"
    return None


# ----------------------------------------------------------------------------------------- geometry
def vertex_normals(coord: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals [N,3] float32 (sum of the unnormalised face normals of each vertex).

    Vertices on no face (or only on degenerate faces) get (0, 0, 0).
    """
    v = coord.astype(np.float64)
    n = v.shape[0]
    if faces.size == 0:
        return np.zeros((n, 3), np.float32)
    fn = np.cross(v[faces[:, 1]] - v[faces[:, 0]], v[faces[:, 2]] - v[faces[:, 0]])  # |fn| = 2 * area
    flat = faces.reshape(-1)
    acc = np.empty((n, 3), np.float64)
    for c in range(3):  # bincount is a vectorised scatter-add, far faster than np.add.at
        acc[:, c] = np.bincount(flat, weights=np.repeat(fn[:, c], 3), minlength=n)
    norm = np.linalg.norm(acc, axis=1, keepdims=True)
    out = np.divide(acc, norm, out=np.zeros_like(acc), where=norm > 0)
    return out.astype(np.float32)


def apply_alignment(coord: np.ndarray, normal: np.ndarray, mat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply a 4x4 rigid ``mat`` to coords (float64 maths, float32 out) and its rotation to normals."""
    rot, t = mat[:3, :3], mat[:3, 3]
    c = (coord.astype(np.float64) @ rot.T + t).astype(np.float32)
    nr = normal.astype(np.float64) @ rot.T
    norm = np.linalg.norm(nr, axis=1, keepdims=True)
    nr = np.divide(nr, norm, out=np.zeros_like(nr), where=norm > 0)
    return c, nr.astype(np.float32)


# ------------------------------------------------------------------------------------------- labels
@dataclass
class SceneLabels:
    """Per-vertex labels derived from segs + aggregation + tsv, and what was noticed on the way."""

    nyu40: np.ndarray  # int16, 0 = none
    tsv_id: np.ndarray  # int32, 0 = none
    label20: np.ndarray  # int16
    label200: np.ndarray  # int16
    instance: np.ndarray  # int32
    unknown_categories: dict[str, int] = field(default_factory=dict)  # raw label -> vertices
    overlap_vertices: int = 0
    unmatched_segments: int = 0
    duplicate_object_ids: list[int] = field(default_factory=list)


def scene_labels(seg_indices: np.ndarray, groups: Sequence[Group], table: LabelTable) -> SceneLabels:
    """Per-vertex ScanNet20/200 labels and instance ids from the over-segmentation and the segGroups."""
    n = seg_indices.shape[0]
    uniq, inv = np.unique(seg_indices, return_inverse=True)
    # group index per compact segment; later groups overwrite earlier ones (official export behaviour)
    owner = np.full(uniq.shape[0], -1, dtype=np.int64)
    hits = np.zeros(uniq.shape[0], dtype=np.int64)
    unmatched = 0
    for gi, g in enumerate(groups):
        segs = np.unique(g.segments)
        pos = np.searchsorted(uniq, segs)
        found = (pos < uniq.shape[0]) & (uniq[np.minimum(pos, uniq.shape[0] - 1)] == segs)
        unmatched += int((~found).sum())
        owner[pos[found]] = gi
        hits[pos[found]] += 1
    g_nyu = np.array([table.raw_to_nyu40.get(g.label, 0) for g in groups] + [0], dtype=np.int16)
    g_tid = np.array([table.raw_to_id.get(g.label, 0) for g in groups] + [0], dtype=np.int32)
    g_obj = np.array([g.object_id for g in groups] + [IGNORE_INDEX], dtype=np.int32)
    vg = owner[inv]  # -1 -> the appended "none" entry
    nyu40 = g_nyu[vg]
    tsv_id = g_tid[vg]
    instance = g_obj[vg]
    label20 = class_set("scannet20").lut(41)[nyu40]
    lut200 = class_set("scannet200").lut(max(max(class_set("scannet200").source_ids), int(tsv_id.max(initial=0))) + 1)
    label200 = lut200[tsv_id]
    unknown: Counter[str] = Counter()
    vcount = np.bincount(vg[vg >= 0], minlength=len(groups))
    for gi, g in enumerate(groups):
        if g.label not in table.raw_to_id:
            unknown[g.label] += int(vcount[gi])
    obj_counts = Counter(g.object_id for g in groups)
    return SceneLabels(
        nyu40=nyu40, tsv_id=tsv_id, label20=label20, label200=label200, instance=instance,
        unknown_categories=dict(unknown), overlap_vertices=int((hits[inv] > 1).sum()) if n else 0,
        unmatched_segments=unmatched, duplicate_object_ids=sorted(o for o, c in obj_counts.items() if c > 1))


def detect_version(agg_header: Mapping[str, Any] | None, segs_header: Mapping[str, Any] | None,
                   meta: Mapping[str, str] | None, has_alignment: bool | None) -> dict[str, Any]:
    """What the scene's files say about their ScanNet release (the mesh itself is the same in v1 and v2)."""
    evidence = []
    annotation = "none"
    if agg_header is not None:
        app = str(agg_header.get("appId", ""))
        sid = str(agg_header.get("sceneId", ""))
        sfile = str(agg_header.get("segmentsFile", ""))
        evidence.append(f"aggregation appId={app!r} sceneId={sid!r} segmentsFile={sfile!r}")
        v2 = app.endswith(".v2") or sid.startswith("scannet.") or sfile.startswith("scannet.")
        v1 = app.endswith(".v1") or (bool(sid) and not sid.startswith("scannet."))
        annotation = "v2" if v2 and not v1 else "v1" if v1 and not v2 else "unknown"
    if segs_header is not None and "sceneId" in segs_header:
        evidence.append(f"segs sceneId={segs_header['sceneId']!r}")
    meta_v = "absent"
    if meta is not None:
        meta_v = "v2 (has axisAlignment)" if has_alignment else "v1 or test scene (no axisAlignment)"
        if "sceneType" in meta:
            evidence.append(f"sceneType={meta['sceneType']!r}")
    return {"annotation": annotation, "scene_meta": meta_v, "evidence": evidence}


def cross_check_labels_ply(ply_label: np.ndarray, derived: SceneLabels, v1_map: Mapping[int, int] | None,
                           annotation: str) -> dict[str, Any]:
    """Compare labels.ply with the segs+aggregation labels under the v2 (nyu40) and v1 (v1 id) readings."""
    nyu = derived.nyu40.astype(np.int64)
    res: dict[str, Any] = {"values": f"{int(ply_label.min())}..{int(ply_label.max())}",
                           "distinct": int(np.unique(ply_label).size)}
    agree_nyu = float((ply_label == nyu).mean())
    res["agreement_as_nyu40"] = round(agree_nyu, 6)
    agree_v1 = None
    if v1_map is not None:
        keys = np.array(sorted(v1_map), dtype=np.int64)
        vals = np.array([v1_map[k] for k in keys], dtype=np.int64)
        pos = np.clip(np.searchsorted(keys, ply_label), 0, len(keys) - 1)
        known = keys[pos] == ply_label
        mapped = np.where(known, vals[pos], -1)
        agree_v1 = float((mapped == nyu).mean())
        res["agreement_as_v1_ids"] = round(agree_v1, 6)
        res["unknown_v1_ids"] = sorted(int(v) for v in np.unique(ply_label[~known]))
    invalid_nyu = np.unique(ply_label[ply_label > 40])
    if agree_v1 is not None and agree_v1 > agree_nyu:
        res["interpretation"] = "ScanNet v1 label ids (through the v1 tsv)"
        disagree = mapped != nyu
    elif agree_v1 is None and invalid_nyu.size and annotation == "v1":
        res["interpretation"] = "ScanNet v1 label ids (v1 tsv not found: values not checkable)"
        disagree = None
    else:
        res["interpretation"] = "nyu40 ids (ScanNet v2)"
        disagree = ply_label != nyu
        res["invalid_nyu40_values"] = {int(v): int((ply_label == v).sum()) for v in invalid_nyu}
    if disagree is not None:
        res["disagreeing_vertices"] = int(disagree.sum())
        pairs = Counter(zip(ply_label[disagree].tolist(), nyu[disagree].tolist(), strict=True))
        res["top_disagreements"] = [{"labels_ply": a, "derived_nyu40": b, "vertices": c}
                                    for (a, b), c in pairs.most_common(10)]
    return res


# ---------------------------------------------------------------------------------------- the scene
def scene_files(scene_dir: Path, scene: str) -> dict[str, Path]:
    """Official file names of one scene folder."""
    return {
        "mesh": scene_dir / f"{scene}_vh_clean_2.ply",
        "labels_ply": scene_dir / f"{scene}_vh_clean_2.labels.ply",
        "segs": scene_dir / f"{scene}_vh_clean_2.0.010000.segs.json",
        "aggregation": scene_dir / f"{scene}.aggregation.json",
        "meta": scene_dir / f"{scene}.txt",
    }


def required_files(split: str, options: Mapping[str, Any]) -> tuple[str, ...]:
    """Which scene files a split needs (test scenes carry no annotations)."""
    req = ["mesh"] if split == "test" else ["mesh", "segs", "aggregation"]
    if options.get("axis_align"):
        req.append("meta")
    return tuple(req)


def process_scene(scene_dir: Path, scene: str, split: str, table: LabelTable, options: Mapping[str, Any],
                  v1_map: Mapping[int, int] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read, check and convert one scene: ``(arrays keyed like SCENE_KEYS, scene report)``."""
    files = scene_files(scene_dir, scene)
    for key in required_files(split, options):
        why = input_problem(files[key])
        if why == "not found":
            raise PrepError(f"required {key} file not found", files[key], None,
                            "re-download the scene (download-scannet.py) or drop it from the split list")
        if why is not None:
            read_input(files[key])  # InputUnreadable naming the reason
    mesh = read_mesh(files["mesh"])
    n = mesh.coord.shape[0]
    normal = vertex_normals(mesh.coord, mesh.faces)
    report: dict[str, Any] = {"split": split, "num_points": n, "num_faces": int(mesh.faces.shape[0]),
                              "vertices_on_no_face": int((np.abs(normal).sum(1) == 0).sum()), "warnings": []}
    meta = mat = None
    if input_problem(files["meta"]) != "not found":
        meta, mat = read_scene_meta(files["meta"])
        why = None if mat is None else alignment_problem(mat)
        if why is not None:
            if options.get("axis_align"):
                raise PrepError(f"axisAlignment is not a rigid transform: {why}", files["meta"], "axisAlignment",
                                "restore the scene's <scene>.txt, or prepare with axis_align=false")
            report["warnings"].append(f"axisAlignment is not a rigid transform ({why}): stored as absent (NaN)")
            mat = None
    agg_header = segs_header = None
    labels = None
    if input_problem(files["segs"]) != "not found" or split != "test":
        seg, segs_header = read_segs(files["segs"])
        if seg.shape[0] != n:
            raise PrepError(f"segIndices has {seg.shape[0]} entries but the mesh has {n} vertices", files["segs"],
                            "segIndices", "use the segs.json that belongs to this _vh_clean_2.ply")
    if split != "test":  # test scenes have no public annotations
        groups, agg_header = read_aggregation(files["aggregation"])
        labels = scene_labels(seg, groups, table)
        report.update(num_instances=len(groups), unknown_categories=labels.unknown_categories,
                      overlap_vertices=labels.overlap_vertices, unmatched_segments=labels.unmatched_segments,
                      unannotated_vertices=int((labels.instance < 0).sum()))
        if labels.duplicate_object_ids:
            report["warnings"].append(f"objectIds used by several segGroups: {labels.duplicate_object_ids}")
    report["version"] = detect_version(agg_header, segs_header, meta, mat is not None)
    for what, header, key in (("aggregation", agg_header, "sceneId"), ("segs", segs_header, "sceneId")):
        sid = str((header or {}).get(key, ""))
        # v2 ids carry a "scannet." prefix and segs ids may end in "_vh_clean_2": compare the scene part only
        if sid and SCENE_RE.match(sid.removeprefix("scannet.")[:12]) and sid.removeprefix("scannet.")[:12] != scene:
            report["warnings"].append(f"{what} file says sceneId={sid!r}, which is not {scene}: files of two "
                                      "scenes mixed up?")
    if labels is not None and options.get("check_labels_ply", True):
        if input_problem(files["labels_ply"]) != "not found":
            pcoord, plabel = read_labels_ply(files["labels_ply"])
            if plabel.shape[0] != n:
                raise PrepError(f"labels ply has {plabel.shape[0]} vertices but the mesh has {n}",
                                files["labels_ply"], "element vertex",
                                "use the labels.ply that belongs to this _vh_clean_2.ply")
            dmax = float(np.abs(pcoord - mesh.coord).max())
            if dmax > 1e-5:
                report["warnings"].append(f"labels.ply vertices differ from the mesh by up to {dmax:.3g}")
            report["labels_ply"] = cross_check_labels_ply(plabel, labels, v1_map, report["version"]["annotation"])
        else:
            report["labels_ply"] = {"interpretation": "absent (cross-check skipped)"}
            report["warnings"].append(f"{files['labels_ply'].name} not found: labels not cross-checked")
    coord = mesh.coord
    aligned = False
    if options.get("axis_align"):
        if mat is not None:
            coord, normal = apply_alignment(coord, normal, mat)
            aligned = True
        else:
            report["warnings"].append("no axisAlignment in the scene txt: left unaligned")
    report["aligned"] = aligned
    if labels is None:
        ign16 = np.full(n, IGNORE_INDEX, np.int16)
        labels = SceneLabels(np.zeros(n, np.int16), np.zeros(n, np.int32), ign16, ign16.copy(),
                             np.full(n, IGNORE_INDEX, np.int32))
    arrays = {
        "coord": coord, "color": mesh.color, "normal": normal, "label20": labels.label20,
        "label200": labels.label200, "instance": labels.instance, "nyu40": labels.nyu40,
        "axis_alignment": mat if mat is not None else np.full((4, 4), np.nan),
        "aligned": np.asarray(aligned),
    }
    report["label20_counts"] = np.bincount(labels.label20[labels.label20 >= 0], minlength=20).tolist()
    report["label200_counts"] = np.bincount(labels.label200[labels.label200 >= 0], minlength=200).tolist()
    return arrays, report


# ------------------------------------------------------------------------------------ raw folder
def find_tsv(raw: Path) -> Path:
    """The v2 label tsv at the raw root or in ``tasks/`` (PrepError with the places looked at)."""
    cands = [raw / TSV_NAME, raw / "tasks" / TSV_NAME, raw / "Tasks" / TSV_NAME]
    for c in cands:
        if c.is_file():
            return c
    raise PrepError(f"label map not found (looked at {', '.join(str(c) for c in cands)})", raw, TSV_NAME,
                    f"copy tasks/{TSV_NAME} of the ScanNet v2 download into the raw folder")


def find_v1_tsv(raw: Path, option: str) -> Path | None:
    """The optional ScanNet v1 label map (option ``v1_tsv`` or ``raw/``, ``raw/v1_extras/``)."""
    if option:
        p = Path(option).expanduser()
        if not p.is_file():
            raise PrepError("v1 label map not found", p, "v1_tsv", f"give the path of ScanNet v1's {V1_TSV_NAME}")
        return p
    for c in (raw / V1_TSV_NAME, raw / "v1_extras" / V1_TSV_NAME):
        if c.is_file():
            return c
    return None


def find_split_list(raw: Path, split: str) -> Path:
    """``scannetv2_<split>.txt`` at the raw root or in ``Tasks/Benchmark/``."""
    name = f"scannetv2_{split}.txt"
    cands = [raw / name, raw / "Tasks" / "Benchmark" / name, raw / "tasks" / name]
    for c in cands:
        if c.is_file():
            return c
    raise PrepError(f"split list not found (looked at {', '.join(str(c) for c in cands)})", raw, name,
                    f"copy Tasks/Benchmark/{name} of the ScanNet repository into the raw folder")


def read_split_list(path: Path) -> list[str]:
    """Scene ids of a split list, validated (``sceneXXXX_XX`` per line, each id once)."""
    out = []
    first: dict[str, int] = {}
    text = read_text_input(path, "split list", "restore the official split list (UTF-8, one scene id per line)")
    for i, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if not s:
            continue
        if not SCENE_RE.match(s):
            raise PrepError(f"line {i}: {s[:40]!r} is not a scene id like scene0000_00", path, f"line {i}",
                            "restore the official split list")
        if s in first:
            raise PrepError(f"{s} is listed again (first on line {first[s]})", path, f"line {i}",
                            "restore the official split list (each scene once)")
        first[s] = i
        out.append(s)
    return out


def check_split_overlap(raw: Path) -> None:
    """PrepError when a scene is in two of the split lists found in raw= (train/val/test leakage)."""
    lists = {}
    for split in SPLITS:
        with contextlib.suppress(PrepError):
            path = find_split_list(raw, split)
            lists[split] = (path, set(read_split_list(path)))
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            if a in lists and b in lists and lists[a][1] & lists[b][1]:
                both = sorted(lists[a][1] & lists[b][1])
                raise PrepError(f"{len(both)} scene(s) are in both {lists[a][0].name} and {lists[b][0].name} "
                                f"({a}/{b} leakage), e.g. {', '.join(both[:5])}", lists[b][0], b,
                                "restore the official split lists")


def find_scene_dir(raw: Path, scene: str) -> Path | None:
    """``scans/<scene>`` or ``scans_test/<scene>`` (the official download keeps test scenes apart)."""
    for sub in ("scans", "scans_test"):
        d = raw / sub / scene
        if os.path.isdir(d):  # an unreadable folder still counts: its scene fails (or is skipped) by itself
            return d
    return None


@dataclass
class Plan:
    """Which scenes go where: ``{split: [(scene, folder)]}`` plus absent scenes."""

    splits: dict[str, list[tuple[str, Path]]]
    absent: list[tuple[str, str]]  # (scene, split)
    split_files: dict[str, Path]


def plan_scenes(raw: Path, opts: Mapping[str, Any]) -> Plan:
    """Resolve the ``splits``/``scenes`` options against the split lists and the scene folders."""
    wanted = [s.strip() for s in str(opts["splits"]).split(",") if s.strip()]
    bad = [s for s in wanted if s not in SPLITS]
    if bad or not wanted:
        raise PrepError(f"splits={opts['splits']!r} names unknown splits {bad}", None, "splits",
                        "use a comma-separated subset of train,val,test")
    split_files = {s: find_split_list(raw, s) for s in wanted}
    lists = {s: read_split_list(p) for s, p in split_files.items()}
    check_split_overlap(raw)
    sel = str(opts["scenes"]).strip()
    if sel not in ("all", "present"):
        chosen = [s.strip() for s in sel.split(",") if s.strip()]
        where = {sc: sp for sp, lst in lists.items() for sc in lst}
        unknown = [s for s in chosen if s not in where]
        if unknown:
            raise PrepError(f"scenes {unknown[:5]} are in none of the split lists {wanted}", None, "scenes",
                            "give scene ids from the chosen splits, or widen splits=")
        lists = {sp: [s for s in lst if s in set(chosen)] for sp, lst in lists.items()}
    plan: dict[str, list[tuple[str, Path]]] = {}
    absent = []
    for sp, lst in lists.items():
        plan[sp] = []
        for sc in lst:
            d = find_scene_dir(raw, sc)
            if d is None:
                if sel != "present":
                    absent.append((sc, sp))
            else:
                plan[sp].append((sc, d))
    return Plan(plan, absent, split_files)


# ------------------------------------------------------------------------------------------ workers
@dataclass
class ShardTask:
    """One unit of work: a shard of scenes of one split."""

    raw: str
    out: str
    split: str
    rel: str  # shard path relative to out
    scenes: list[tuple[str, str]]  # (scene, folder)
    options: dict[str, Any]
    tsv: str
    v1_tsv: str | None


@functools.cache
def _cached_table(path: str, mtime_ns: int) -> LabelTable:
    return read_label_table(path)


@functools.cache
def _cached_v1(path: str, mtime_ns: int) -> dict[int, int]:
    return read_v1_label_table(path)


def _abs(p: str | os.PathLike) -> Path:
    # absolute without resolving symlinks: a raw folder of links (e.g. to a read-only copy) keeps its layout
    return Path(os.path.abspath(p))




def _task_inputs(task: ShardTask, log: DoneLog) -> dict[str, dict[str, Any]]:
    raw = _abs(task.raw)
    paths = [_abs(task.tsv)] + ([_abs(task.v1_tsv)] if task.v1_tsv else [])
    for scene, folder in task.scenes:
        # present-but-unreadable files are hashed as errors, so fixing them (or their reading) redoes the shard
        paths += [_abs(p) for p in scene_files(Path(folder), scene).values() if input_problem(p) != "not found"]
    cache = log.input_cache(task.rel)
    inside = [p for p in paths if p.is_relative_to(raw)]
    inputs = hash_files(inside, raw, cache)
    for p in paths:
        if not p.is_relative_to(raw):
            key = input_key(p, raw)
            inputs[key] = next(iter(hash_files([p], p.parent, {p.name: cache.get(key, {})}).values()))
    return inputs


def _unit_options(task: ShardTask) -> dict[str, Any]:
    return {**task.options, "scene_list": [s for s, _ in task.scenes], "preparer_version": PREPARER_VERSION}


def skipped_shard(task: ShardTask) -> dict[str, Any] | None:
    """The summary of ``task`` when it is finished with the same inputs and options, else None."""
    t0 = time.perf_counter()
    log = DoneLog(task.out)
    if log.record(task.rel) is None:
        return None
    if not log.is_done(task.rel, _task_inputs(task, log), _unit_options(task)):
        return None
    rec = log.record(task.rel) or {}
    return {"rel": task.rel, "split": task.split, "skipped": True, "written": True, "scenes": rec.get("scenes", {}),
            "order": rec.get("order", []), "failed": [], "missing": [], "inputs": rec.get("inputs", {}),
            "outputs": rec.get("outputs", {}), "seconds": time.perf_counter() - t0}


def run_shard(task: ShardTask) -> dict[str, Any]:
    """Prepare (or skip, when done with the same inputs and options) one shard; returns its summary.

    A scene that fails (or, under allow_missing, has an unreadable file) is left out and named; a shard
    whose every scene was left out writes nothing, so an earlier shard at its path is never replaced
    by an empty one.
    """
    t0 = time.perf_counter()
    out = Path(task.out)
    log = DoneLog(out)
    done = skipped_shard(task)
    if done is not None:
        return done
    inputs = _task_inputs(task, log)
    unit_options = _unit_options(task)
    table = _cached_table(task.tsv, os.stat(task.tsv).st_mtime_ns)
    v1_map = _cached_v1(task.v1_tsv, os.stat(task.v1_tsv).st_mtime_ns) if task.v1_tsv else None
    arrays, names, reports, failed, missing = [], [], {}, [], []
    for scene, folder in task.scenes:
        try:
            arr, rep = process_scene(Path(folder), scene, task.split, table, task.options, v1_map)
        except InputUnreadable as err:
            (missing if task.options.get("allow_missing") else failed).append((scene, str(err)))
            continue
        except PrepError as err:
            failed.append((scene, str(err)))
            continue
        except Exception as err:  # noqa: BLE001 - an unexpected failure must not lose the shard's other scenes
            failed.append((scene, f"{type(err).__name__}: {err} (in {folder})"))
            continue
        arrays.append(arr)
        names.append(scene)
        reports[scene] = rep
    target = out / task.rel
    outputs: dict[str, str] = {}
    if arrays:
        with atomic_write(target) as tmp:
            write_ragged_h5(tmp, arrays, names, attrs={"dataset": DATASET, "split": task.split,
                                                       "preparer_version": PREPARER_VERSION,
                                                       "options": task.options})
        del arrays
        if not failed:  # a shard with failed scenes gets no record: the next run retries them
            rec = log.mark(task.rel, inputs, unit_options, [task.rel], extra={"scenes": reports, "order": names})
            outputs = rec["outputs"]
        else:
            outputs = {task.rel: sha256_file(target)}
    return {"rel": task.rel, "split": task.split, "skipped": False, "written": bool(outputs), "scenes": reports,
            "order": names, "failed": failed, "missing": missing,
            "inputs": {k: v["sha256"] for k, v in inputs.items()}, "outputs": outputs,
            "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------- entry points
def _make_tasks(raw: Path, out: Path, opts: Mapping[str, Any], plan: Plan, tsv: Path, v1: Path | None
                ) -> list[ShardTask]:
    size = int(opts["shard_size"])
    if size < 1:
        raise PrepError(f"shard_size={size} must be >= 1", None, "shard_size", "give a positive number of scenes")
    tasks = []
    for split, scenes in plan.splits.items():
        scenes = sorted(scenes)
        for k in range(0, len(scenes), size):
            chunk = scenes[k:k + size]
            tasks.append(ShardTask(str(raw), str(out), split, f"{split}/{split}_{k // size:04d}.h5",
                                   [(s, str(d)) for s, d in chunk], dict(opts), str(tsv),
                                   None if v1 is None else str(v1)))
    return tasks


def _prepare_plan(raw: Path, opts: Mapping[str, Any]) -> tuple[Path, LabelTable, Path | None, Plan]:
    """Everything a run needs before it touches out= (PrepError when raw= cannot be used)."""
    require_folder(raw, f"give the folder that holds scans/ and {TSV_NAME}")
    tsv = find_tsv(raw)
    table = read_label_table(tsv)
    v1 = find_v1_tsv(raw, str(opts["v1_tsv"]))
    if v1 is not None:
        read_v1_label_table(v1)  # fail early, before any worker starts
    return tsv, table, v1, plan_scenes(raw, opts)


def prepare(raw: str | os.PathLike, out: str | os.PathLike, options: Mapping[str, Any] | None = None,
            workers: int = 1, progress: bool | None = None) -> Report:
    """Prepare ScanNet from the official ``raw`` folder into ``out`` (idempotent, resumable, atomic)."""
    t0 = time.perf_counter()
    opts = parse_options(OPTIONS, dict(options or {}), DATASET)
    raw, out = Path(raw).expanduser().absolute(), Path(out).expanduser().absolute()
    report = Report(DATASET, str(out))
    tsv, table, v1, plan = _prepare_plan(raw, opts)
    for scene, split in plan.absent:
        if opts["allow_missing"]:
            report.missing.append(scene)
        else:
            report.failed.append((scene, f"{raw / 'scans' / scene}: scene folder not found (listed in "
                                         f"scannetv2_{split}.txt). Fix: download it, or pass "
                                         "allow_missing=true / scenes=present"))
    tasks = _make_tasks(raw, out, opts, plan, tsv, v1)
    with OutputFolder(out, DATASET, prep_command(DATASET, raw, out, opts, OPTIONS)) as folder:
        folder.claim(t.rel for t in tasks)
        results = []
        pending = []
        for task in tasks:  # finished shards are found here, so a fully done re-run starts no worker
            res = skipped_shard(task)
            if res is None:
                pending.append(task)
            else:
                results.append(res)
                report.skipped += 1
        if pending:
            folder.begin_writes()
        for task, res in parallel_map(run_shard, pending, workers=workers, desc="scannet shards", progress=progress):
            if isinstance(res, BaseException):
                for scene, _ in task.scenes:
                    report.failed.append((scene, f"shard {task.rel} failed: {res}"))
                continue
            report.failed += [tuple(f) for f in res["failed"]]
            report.missing += [f"{a} ({b})" for a, b in res["missing"]]
            if not res["written"]:
                continue
            results.append(res)
            if res["skipped"]:
                report.skipped += 1
            else:
                report.done += 1
        manifest = _build_manifest(raw, out, opts, plan, table, v1, results, report)
        report.seconds = time.perf_counter() - t0
        manifest["validation"].update(report.to_dict())
        folder.commit(manifest, report, complete=len(results) == len(tasks), units=[t.rel for t in tasks])
    return report


def _build_manifest(raw: Path, out: Path, opts: Mapping[str, Any], plan: Plan, table: LabelTable,
                    v1: Path | None, results: list[dict[str, Any]], report: Report) -> dict[str, Any]:
    c20, c200 = class_set("scannet20"), class_set("scannet200")
    results = sorted(results, key=lambda r: r["rel"])
    splits: dict[str, dict[str, Any]] = {s: {"files": [], "num_samples": 0, "scenes": []} for s in plan.splits}
    scenes: dict[str, dict[str, Any]] = {}
    stats20 = {s: np.zeros(20, np.int64) for s in plan.splits}
    stats200 = {s: np.zeros(200, np.int64) for s in plan.splits}
    inputs: dict[str, str] = {}
    outputs: dict[str, str] = {}
    versions: Counter[str] = Counter()
    version_scenes: dict[str, list[str]] = {}
    unknown: dict[str, dict[str, Any]] = {}
    ply_checks: dict[str, dict[str, Any]] = {}
    for res in results:
        inputs.update({k: v for k, v in res["inputs"].items() if v is not None})
        outputs.update(res["outputs"])
        if not res["order"]:
            continue
        sp = res["split"]
        splits[sp]["files"].append({"path": res["rel"], "num_samples": len(res["order"]), "scenes": list(res["order"])})
        for idx, scene in enumerate(res["order"]):
            rep = res["scenes"][scene]
            splits[sp]["num_samples"] += 1
            splits[sp]["scenes"].append(scene)
            stats20[sp] += np.asarray(rep["label20_counts"], np.int64)
            stats200[sp] += np.asarray(rep["label200_counts"], np.int64)
            scenes[scene] = {"split": sp, "file": res["rel"], "index": idx, "num_points": rep["num_points"],
                             "num_instances": rep.get("num_instances", 0), "aligned": rep["aligned"],
                             "annotation": rep["version"]["annotation"],
                             **{k: rep[k] for k in ("num_faces", "vertices_on_no_face", "unannotated_vertices",
                                                    "overlap_vertices", "unmatched_segments") if k in rep}}
            v = rep["version"]
            kind = f"annotation {v['annotation']}, scene meta {v['scene_meta']}"
            if "labels_ply" in rep:
                kind += f", labels.ply {rep['labels_ply']['interpretation']}"
                ply_checks[scene] = rep["labels_ply"]
            versions[kind] += 1
            version_scenes.setdefault(kind, []).append(scene)
            for cat, nv in rep.get("unknown_categories", {}).items():
                u = unknown.setdefault(cat, {"scenes": [], "vertices": 0})
                u["scenes"].append(scene)
                u["vertices"] += nv
            for w in rep["warnings"]:
                report.warnings.append(f"{scene}: {w}")
    report.samples = sum(s["num_samples"] for s in splits.values())
    if not report.samples:
        report.warnings.append("no scene was prepared: check splits=/scenes= and the scans/ folder")
    for kind, n in versions.most_common():
        ex = ", ".join(version_scenes[kind][:3])
        report.warnings.insert(0, f"detected {kind}: {n} scene(s) (e.g. {ex})")
    report.warnings.insert(0, f"label map {input_key(Path(table.path), raw)}: ScanNet v2 format (raw_category column, "
                              f"{len(table.raw_to_id)} raw categories)" + (
                                  f"; v1 label map {input_key(v1, raw)} used to read v1 labels.ply ids" if v1 else ""))
    for cat, u in sorted(unknown.items()):
        report.warnings.append(f"raw category {cat!r} is not in {TSV_NAME}: mapped to ignore "
                               f"({u['vertices']} vertices in {len(u['scenes'])} scene(s), e.g. {u['scenes'][0]})")
    for scene, chk in ply_checks.items():
        if chk.get("disagreeing_vertices"):
            report.warnings.append(f"{scene}: labels.ply ({chk['interpretation']}) disagrees with segs+aggregation "
                                   f"on {chk['disagreeing_vertices']} vertices")
        if chk.get("invalid_nyu40_values"):
            report.warnings.append(f"{scene}: labels.ply holds invalid nyu40 ids {chk['invalid_nyu40_values']}")
    inputs[input_key(Path(table.path), raw)] = table.sha256
    for p in plan.split_files.values():
        inputs[input_key(p, raw)] = sha256_file(p)
    display_changes = {table.nyu40_names[i]: n for i, n in zip(c20.source_ids, c20.names, strict=True)
                       if table.nyu40_names.get(i, n) != n}
    return {
        "dataset": DATASET,
        "preparer_version": PREPARER_VERSION,
        "command": prep_command(DATASET, raw, out, opts, OPTIONS),
        "options": dict(opts),
        "classes": list(c20.names),
        "ignore_index": IGNORE_INDEX,
        "label_sets": {
            "scannet20": {"key": "label20", "names": list(c20.names), "source": "nyu40id column",
                          "source_ids": list(c20.source_ids)},
            "scannet200": {"key": "label200", "names": list(c200.names), "source": "id column",
                           "source_ids": list(c200.source_ids)},
        },
        "raw_label_table": {"file": table.path, "sha256": table.sha256,
                            "nyu40class_official": {str(k): v for k, v in sorted(table.nyu40_names.items())},
                            "display_names_differing_from_official": display_changes},
        "v1_label_table": None if v1 is None else str(v1),
        "keys": list(SCENE_KEYS),
        "splits": splits,
        "scenes": scenes,
        "inputs": dict(sorted(inputs.items())),
        "outputs": dict(sorted(outputs.items())),
        "label_stats": {sp: dict(zip(c20.names, v.tolist(), strict=True)) for sp, v in stats20.items()},
        "label_stats_200": {sp: dict(zip(c200.names, v.tolist(), strict=True)) for sp, v in stats200.items()},
        "validation": {
            "detected_versions": {k: {"scenes": version_scenes[k], "count": n} for k, n in versions.items()},
            "unknown_categories": unknown,
            "labels_ply": ply_checks,
        },
    }


def _check_scene(item: tuple[str, str, str, str, str | None, dict[str, Any]]) -> str | None:
    """``--check`` of one scene: process it exactly as preparation would; the problem line or None."""
    folder, scene, split, tsv, v1_tsv, opts = item
    table = _cached_table(tsv, os.stat(tsv).st_mtime_ns)
    v1_map = _cached_v1(v1_tsv, os.stat(v1_tsv).st_mtime_ns) if v1_tsv else None
    try:
        process_scene(Path(folder), scene, split, table, opts, v1_map)
    except InputUnreadable as err:
        return None if opts.get("allow_missing") else str(err)
    except PrepError as err:
        return str(err)
    except Exception as err:  # noqa: BLE001 - report like preparation does, never stop the check
        return f"{scene}: {type(err).__name__}: {err} (in {folder})"
    return None


def check(raw: str | os.PathLike, options: Mapping[str, Any] | None = None, workers: int = 1,
          progress: bool | None = None) -> list[str]:
    """Every problem :func:`prepare` would meet (lists, label maps, absent scenes unless allow_missing=true,
    and each scene read, labelled and cross-checked as in preparation), without writing anything."""
    opts = parse_options(OPTIONS, dict(options or {}), DATASET)
    raw = Path(raw).expanduser().absolute()
    try:
        tsv, _, v1, plan = _prepare_plan(raw, opts)
    except PrepError as err:
        return [str(err)]
    problems: list[str] = []
    if not opts["allow_missing"]:
        problems += [f"{raw / 'scans' / s}: scene folder not found (listed in scannetv2_{sp}.txt)"
                     for s, sp in plan.absent]
    items = [(str(folder), scene, split, str(tsv), None if v1 is None else str(v1), dict(opts))
             for split, scenes in plan.splits.items() for scene, folder in scenes]
    for item, res in parallel_map(_check_scene, items, workers=workers, desc="checking scannet scenes",
                                  progress=progress):
        if isinstance(res, BaseException):
            problems.append(f"{item[1]}: {res}")
        elif res:
            problems.append(res)
    return problems


def bench_prepare_fn(raw: str | os.PathLike, work_dir: str | os.PathLike, options: Mapping[str, Any] | None = None,
                     workers: int = 1) -> Callable[[], Report]:
    """For ``benchmarks/bm_data.py``: a callable that prepares ``raw`` from scratch into a fresh folder
    under ``work_dir`` on every call (nothing skipped) and removes it afterwards; returns the Report."""
    import itertools  # noqa: PLC0415
    import shutil  # noqa: PLC0415

    counter = itertools.count()

    def run() -> Report:
        out = Path(work_dir) / f"scannet-bench-{os.getpid()}-{next(counter)}"
        try:
            report = prepare(raw, out, options, workers=workers, progress=False)
            if not report.ok:
                raise PrepError(f"benchmark preparation failed: {report.failed[:3]}", raw, None, "fix the raw folder")
            return report
        finally:
            shutil.rmtree(out, ignore_errors=True)

    return run
