"""Synthetic ScanNet rooms written in the exact official raw layout (the quickstart data and test fixtures).

Each room is a floor, four walls and furniture-like boxes and cylinders (bed, table, chairs, cabinet,
refrigerator, trash can, box, pillow, rug and one unannotated clutter box), meshed as small triangle
grids. Files per scene, as ScanNet v2 ships them: ``<scene>_vh_clean_2.ply`` (binary little-endian,
x y z float, red green blue alpha uchar, faces ``list uchar int``), ``<scene>_vh_clean_2.labels.ply``
(+ ``label`` ushort = nyu40 id), ``<scene>_vh_clean_2.0.010000.segs.json`` (params, sceneId,
segIndices), ``<scene>.aggregation.json`` (``Aggregator.v2``, ``scannet.`` ids, segGroups) and
``<scene>.txt`` (``axisAlignment`` + a few camera keys). Test scenes go to ``scans_test/`` with mesh,
segs and a txt without ``axisAlignment`` (as in the official test set). The tsv holds the official rows
of the categories used (17 columns, CRLF, empty fields and the ``refridgerator`` spelling kept).

The mesh is stored in a "scan" frame: the room is built axis-aligned and moved by the inverse of the
scene's ``axisAlignment``, so applying the matrix gives back the axis-aligned room. Everything is a
function of ``seed``: the same seed gives byte-identical files. Files are written in place (this is a
fixture generator, not a preparer): regenerate into a fresh folder after an interruption.

Usage: ``python -m data_prep.synthetic_scannet out=<folder> [train=4 val=2 test=1 seed=0]``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TSV_HEADER = ("id", "raw_category", "category", "count", "nyu40id", "eigen13id", "nyuClass", "nyu40class",
              "eigen13class", "ModelNet40", "ModelNet10", "ShapeNetCore55", "synsetoffset", "wnsynsetid",
              "wnsynsetkey", "mpcat40", "mpcat40index")
# Official rows of ScanNet v2's scannetv2-labels.combined.tsv for the categories used here (verbatim values).
TSV_ROWS = (
    "1\twall\twall\t8277\t1\t12\twall\twall\tWall\t\t\t\t\tn04546855\twall.n.01\twall\t1",
    "2\tchair\tchair\t4646\t5\t4\tchair\tchair\tChair\tchair\tchair\tchair\t3001627\tn03001627\tchair.n.01\tchair\t3",
    "3\tfloor\tfloor\t1553\t2\t5\tfloor\tfloor\tFloor\t\t\t\t\tn03365592\tfloor.n.01\tfloor\t2",
    "4\ttable\ttable\t1170\t7\t10\ttable\ttable\tTable\ttable\ttable\ttable\t4379243\tn04379243\ttable.n.02\ttable\t5",
    "56\ttrash can\ttrash can\t1090\t39\t6\tgarbage bin\totherfurniture\tFurniture\t\t\ttrash_bin\t2747177\t"
    "n02747177\tashcan.n.01\tobjects\t39",
    "13\tpillow\tpillow\t937\t18\t7\tpillow\tpillow\tObjects\t\t\tpillow\t3938244\tn03938244\tpillow.n.01\tcushion\t8",
    "26\tbox\tbox\t775\t29\t7\tbox\tbox\tObjects\t\t\t\t\tn02883344\tbox.n.01\tobjects\t39",
    "7\tcabinet\tcabinet\t731\t3\t6\tcabinet\tcabinet\tFurniture\t\t\tcabinet\t2933112\tn02933112\tcabinet.n.01\t"
    "cabinet\t7",
    "11\tbed\tbed\t370\t4\t1\tbed\tbed\tBed\tbed\tbed\tbed\t2818832\tn02818832\tbed.n.01\tbed\t11",
    "27\trefrigerator\trefrigerator\t154\t24\t6\trefridgerator\trefridgerator\tFurniture\t\t\t\t\tn04070727\t"
    "refrigerator.n.01\tappliances\t37",
    "61\trug\trug\t7\t40\t7\trug\totherprop\tObjects\t\t\t\t\tn04118021\trug.n.01\tfloor\t2",
)
NYU40 = {row.split("\t")[1]: int(row.split("\t")[4]) for row in TSV_ROWS}
SEGS_PARAMS = {"kThresh": "0.0001", "segMinVerts": "20", "minPoints": "750", "maxPoints": "30000",
               "thinThresh": "0.05", "flatThresh": "0.001", "minLength": "0.02", "maxLength": "1"}
COLORS = {"wall": (200, 196, 186), "floor": (120, 98, 76), "bed": (90, 110, 170), "table": (150, 110, 70),
          "chair": (60, 60, 60), "cabinet": (170, 150, 120), "refrigerator": (230, 230, 235),
          "trash can": (40, 120, 60), "box": (180, 140, 90), "pillow": (240, 240, 240), "rug": (150, 40, 40),
          "clutter": (128, 128, 128)}


@dataclass
class _Builder:
    """Accumulates mesh patches; each patch is tiled into segments, each part belongs to one object."""

    coord: list[np.ndarray] = field(default_factory=list)
    faces: list[np.ndarray] = field(default_factory=list)
    seg: list[np.ndarray] = field(default_factory=list)
    obj: list[np.ndarray] = field(default_factory=list)
    n: int = 0

    def patch(self, origin, u, v, step: float, obj: int, tile: int = 4) -> None:
        """Grid over the parallelogram ``origin + s*u + t*v`` (s, t in [0,1]) with spacing about ``step``."""
        origin, u, v = (np.asarray(a, np.float64) for a in (origin, u, v))
        nu = max(1, int(round(np.linalg.norm(u) / step)))
        nv = max(1, int(round(np.linalg.norm(v) / step)))
        s, t = np.meshgrid(np.arange(nu + 1) / nu, np.arange(nv + 1) / nv, indexing="ij")
        pts = origin + s.reshape(-1, 1) * u + t.reshape(-1, 1) * v
        idx = np.arange((nu + 1) * (nv + 1)).reshape(nu + 1, nv + 1)
        a, b, c, d = idx[:-1, :-1].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel(), idx[:-1, 1:].ravel()
        tris = np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)])
        # segment = tile of grid cells; its id is the smallest global vertex index in it (ids are arbitrary ints)
        ti, tj = np.meshgrid(np.arange(nu + 1) // tile, np.arange(nv + 1) // tile, indexing="ij")
        key = (ti * (nv // tile + 2) + tj).ravel()
        first = {}
        for i, k in enumerate(key):
            first.setdefault(int(k), self.n + i)
        self._add(pts, tris, np.array([first[int(k)] for k in key]), obj)

    def cylinder(self, center, radius: float, height: float, step: float, obj: int) -> None:
        """Open side wall plus a top cap (triangle fan) of an upright cylinder standing on ``center``."""
        cx, cy, cz = center
        nt = max(8, int(round(2 * np.pi * radius / step)))
        nz = max(1, int(round(height / step)))
        th = np.arange(nt) * 2 * np.pi / nt
        z = cz + np.arange(nz + 1) * height / nz
        pts = np.stack([np.repeat(cx + radius * np.cos(th), nz + 1), np.repeat(cy + radius * np.sin(th), nz + 1),
                        np.tile(z, nt)], 1)
        idx = np.arange(nt * (nz + 1)).reshape(nt, nz + 1)
        nxt = np.roll(idx, -1, axis=0)
        a, b, c, d = idx[:, :-1].ravel(), nxt[:, :-1].ravel(), nxt[:, 1:].ravel(), idx[:, 1:].ravel()
        tris = np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)])
        half = np.repeat((np.arange(nt) >= nt // 2).astype(np.int64), nz + 1)  # two segments: two halves
        self._add(pts, tris, self.n + np.where(half == 0, 0, (nt // 2) * (nz + 1)), obj)
        ring = np.stack([cx + radius * np.cos(th), cy + radius * np.sin(th), np.full(nt, cz + height)], 1)
        cap = np.concatenate([[[cx, cy, cz + height]], ring])
        fan = np.stack([np.zeros(nt, np.int64), 1 + np.arange(nt), 1 + (np.arange(nt) + 1) % nt], 1)
        self._add(cap, fan, np.full(nt + 1, self.n), obj)

    def box(self, lo, hi, step: float, obj: int) -> None:
        """Top and four sides of an axis-aligned box (no bottom, as a scanned object resting on the floor)."""
        (x0, y0, z0), (x1, y1, z1) = lo, hi
        dx, dy, dz = x1 - x0, y1 - y0, z1 - z0
        self.patch((x0, y0, z1), (dx, 0, 0), (0, dy, 0), step, obj)
        self.patch((x0, y0, z0), (dx, 0, 0), (0, 0, dz), step, obj)
        self.patch((x0, y1, z0), (0, 0, dz), (dx, 0, 0), step, obj)
        self.patch((x0, y0, z0), (0, 0, dz), (0, dy, 0), step, obj)
        self.patch((x1, y0, z0), (0, dy, 0), (0, 0, dz), step, obj)

    def _add(self, pts, tris, seg, obj) -> None:
        self.coord.append(np.asarray(pts, np.float64))
        self.faces.append(np.asarray(tris, np.int64) + self.n)
        self.seg.append(np.asarray(seg, np.int64))
        self.obj.append(np.full(len(pts), obj, np.int64))
        self.n += len(pts)


@dataclass
class Room:
    """A generated room: the mesh in the scan frame, the segmentation, the objects and the ground truth."""

    scene: str
    coord: np.ndarray  # [N,3] float32, scan frame (what the ply holds)
    aligned: np.ndarray  # [N,3] float64, the axis-aligned room
    color: np.ndarray  # [N,3] uint8
    faces: np.ndarray  # [F,3] int64
    seg: np.ndarray  # [N] int64 segment ids
    vertex_object: np.ndarray  # [N] object index into ``objects`` (-1 = not annotated)
    objects: list[str]  # raw category per object
    axis_alignment: np.ndarray  # [4,4]

    @property
    def nyu40(self) -> np.ndarray:
        """Ground-truth nyu40 id per vertex (0 = not annotated)."""
        table = np.array([NYU40[c] for c in self.objects] + [0])
        return table[self.vertex_object]


def make_room(scene: str, rng: np.random.Generator) -> Room:
    """Build one random room of a few thousand vertices."""
    b = _Builder()
    objects: list[str] = []

    def new(label: str) -> int:
        objects.append(label)
        return len(objects) - 1

    w, d, h = rng.uniform(4.0, 6.0), rng.uniform(3.0, 5.0), rng.uniform(2.4, 2.8)
    b.patch((0, 0, 0), (w, 0, 0), (0, d, 0), 0.25, new("floor"))
    for origin, u in (((0, 0, 0), (w, 0, 0)), ((w, 0, 0), (0, d, 0)), ((w, d, 0), (-w, 0, 0)), ((0, d, 0), (0, -d, 0))):
        b.patch(origin, u, (0, 0, h), 0.3, new("wall"))

    def spot(sx: float, sy: float) -> tuple[float, float]:
        return rng.uniform(0.2, w - sx - 0.2), rng.uniform(0.2, d - sy - 0.2)

    x, y = spot(2.0, 1.6)
    b.box((x, y, 0), (x + 2.0, y + 1.6, 0.5), 0.15, new("bed"))
    b.box((x + 0.2, y + 0.3, 0.5), (x + 0.7, y + 1.3, 0.65), 0.08, new("pillow"))
    tx, ty = spot(1.2, 0.8)
    b.box((tx, ty, 0.7), (tx + 1.2, ty + 0.8, 0.75), 0.1, new("table"))
    for _ in range(int(rng.integers(1, 3))):
        cx, cy = spot(0.45, 0.45)
        b.box((cx, cy, 0), (cx + 0.45, cy + 0.45, 0.45), 0.1, new("chair"))
    for label, size in (("cabinet", (0.6, 0.5, 1.0)), ("refrigerator", (0.7, 0.7, 1.8)), ("box", (0.4, 0.3, 0.3))):
        if label in ("cabinet", "box") or rng.random() < 0.6:
            bx, by = spot(size[0], size[1])
            b.box((bx, by, 0), (bx + size[0], by + size[1], size[2]), 0.12, new(label))
    px, py = spot(0.5, 0.5)
    b.cylinder((px + 0.2, py + 0.2, 0.0), 0.18, 0.5, 0.08, new("trash can"))
    rx, ry = spot(1.5, 1.0)
    b.box((rx, ry, 0.0), (rx + 1.5, ry + 1.0, 0.01), 0.2, new("rug"))
    qx, qy = spot(0.3, 0.3)
    b.box((qx, qy, 0), (qx + 0.3, qy + 0.3, 0.25), 0.1, -1)  # clutter nobody annotated

    aligned = np.concatenate(b.coord)
    vobj = np.concatenate(b.obj)
    base = np.array([COLORS[objects[o]] if o >= 0 else COLORS["clutter"] for o in range(-1, len(objects))])
    shade = rng.normal(0.0, 6.0, size=(len(aligned), 3))
    color = np.clip(base[vobj + 1] + shade, 0, 255).round().astype(np.uint8)
    theta = rng.uniform(-np.pi, np.pi)
    c, s = np.cos(theta), np.sin(theta)
    mat = np.array([[c, -s, 0, -w / 2], [s, c, 0, -d / 2], [0, 0, 1, rng.uniform(-0.1, 0.1)], [0, 0, 0, 1]])
    mat = np.round(mat, 6)  # the official txt prints 6 decimals; keep file and truth identical
    inv = np.linalg.inv(mat)
    scan = (aligned @ inv[:3, :3].T + inv[:3, 3]).astype(np.float32)
    aligned = scan.astype(np.float64) @ mat[:3, :3].T + mat[:3, 3]  # truth = what the stored file aligns to
    return Room(scene, scan, aligned, color, np.concatenate(b.faces), np.concatenate(b.seg), vobj, objects, mat)


# ------------------------------------------------------------------------------------------ writers
def _write_ply(path: Path, room: Room, labels: np.ndarray | None) -> None:
    """Binary little-endian PLY with ScanNet's exact header (packed records; plyfile writes lists row by row)."""
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1"),
              ("alpha", "u1")]
    if labels is not None:
        fields.append(("label", "<u2"))
    vert = np.zeros(len(room.coord), dtype=fields)
    for i, k in enumerate("xyz"):
        vert[k] = room.coord[:, i]
    for i, k in enumerate(("red", "green", "blue")):
        vert[k] = room.color[:, i]
    vert["alpha"] = 255
    if labels is not None:
        vert["label"] = labels
    face = np.zeros(len(room.faces), dtype=[("n", "u1"), ("v", "<i4", (3,))])
    face["n"] = 3
    face["v"] = room.faces
    ply_type = {"<f4": "float", "u1": "uchar", "<u2": "ushort"}
    header = ["ply", "format binary_little_endian 1.0",
              "comment MLIB generated" if labels is not None else "comment VCGLIB generated",
              f"element vertex {len(vert)}", *(f"property {ply_type[t]} {k}" for k, t in fields),
              f"element face {len(face)}", "property list uchar int vertex_indices", "end_header"]
    path.write_bytes("\n".join(header).encode("ascii") + b"\n" + vert.tobytes() + face.tobytes())


def write_scene(scene_dir: Path, room: Room, annotated: bool = True, alignment: bool = True) -> None:
    """Write one room's official files into ``scene_dir`` (test scenes: ``annotated=False``)."""
    s = room.scene
    scene_dir.mkdir(parents=True, exist_ok=True)
    _write_ply(scene_dir / f"{s}_vh_clean_2.ply", room, None)
    segs = {"params": SEGS_PARAMS, "sceneId": f"scannet.{s}", "segIndices": room.seg.tolist()}
    (scene_dir / f"{s}_vh_clean_2.0.010000.segs.json").write_text(json.dumps(segs))
    lines = []
    if alignment:
        lines.append("axisAlignment = " + " ".join(f"{v:.6f}" for v in room.axis_alignment.ravel()) + " ")
    lines += ["colorHeight = 968", "colorWidth = 1296", "depthHeight = 480", "depthWidth = 640",
              "fx_color = 1170.187988", "fy_color = 1170.187988", "sceneType = Bedroom / Hotel"]
    (scene_dir / f"{s}.txt").write_text("\n".join(lines) + "\n")
    if not annotated:
        return
    _write_ply(scene_dir / f"{s}_vh_clean_2.labels.ply", room, room.nyu40.astype(np.uint16))
    groups = []
    for oi, label in enumerate(room.objects):
        segs_of = sorted(set(room.seg[room.vertex_object == oi].tolist()))
        groups.append({"id": oi, "objectId": oi, "segments": segs_of, "label": label})
    agg = {"sceneId": f"scannet.{s}", "appId": "Aggregator.v2", "segGroups": groups,
           "segmentsFile": f"scannet.{s}_vh_clean_2.0.010000.segs.json"}
    (scene_dir / f"{s}.aggregation.json").write_text(json.dumps(agg, indent=1))


def write_tsv(path: Path) -> None:
    """The tsv subset with the official header, CRLF line ends and empty fields."""
    path.write_bytes(("\r\n".join(["\t".join(TSV_HEADER), *TSV_ROWS]) + "\r\n").encode())


def generate(root: str | Path, train: int = 4, val: int = 2, test: int = 1, seed: int = 0) -> dict[str, list[str]]:
    """Write ``train + val + test`` synthetic rooms with tsv and split lists under ``root``; returns the splits."""
    root = Path(root)
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    k = 0
    for split, count in (("train", train), ("val", val), ("test", test)):
        for _ in range(count):
            scene = f"scene{k:04d}_00"
            room = make_room(scene, np.random.default_rng([seed, k]))
            sub = "scans_test" if split == "test" else "scans"
            write_scene(root / sub / scene, room, annotated=split != "test", alignment=split != "test")
            splits[split].append(scene)
            k += 1
    write_tsv(root / "scannetv2-labels.combined.tsv")
    for split, scenes in splits.items():
        (root / f"scannetv2_{split}.txt").write_text("".join(f"{s}\n" for s in scenes))
    return splits


def room_for(scene: str, seed: int = 0) -> Room:
    """Regenerate the in-memory room (with ground truth) that :func:`generate` wrote as ``scene``."""
    k = int(scene[5:9])
    return make_room(scene, np.random.default_rng([seed, k]))


def main(argv: list[str] | None = None) -> int:
    """``python -m data_prep.synthetic_scannet out=DIR [train=4 val=2 test=1 seed=0]``."""
    args = dict(a.split("=", 1) for a in (sys.argv[1:] if argv is None else argv) if "=" in a)
    if "out" not in args or set(args) - {"out", "train", "val", "test", "seed"}:
        print(main.__doc__, file=sys.stderr)
        return 2
    splits = generate(args["out"], int(args.get("train", 4)), int(args.get("val", 2)), int(args.get("test", 1)),
                      int(args.get("seed", 0)))
    print(f"wrote {sum(map(len, splits.values()))} synthetic ScanNet scenes to {args['out']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def prepared_synthetic(folder: str | Path, train: int = 4, val: int = 2, test: int = 1, seed: int = 0,
                       **options) -> Path:
    """Quickstart/fixture helper: synthetic raw rooms in ``folder/raw`` prepared into ``folder/prepared``.

    Idempotent: the raw rooms are written once (a ``.complete`` marker guards against a half-written
    folder) and the preparer skips finished shards. Returns the prepared folder for ``ScanNetDataset``.
    """
    from data_prep import scannet  # noqa: PLC0415 - the generator itself does not need the preparer

    folder = Path(folder)
    raw, marker = folder / "raw", folder / "raw" / ".complete"
    key = f"train={train} val={val} test={test} seed={seed}"
    if not marker.is_file() or marker.read_text() != key:
        import shutil  # noqa: PLC0415

        shutil.rmtree(raw, ignore_errors=True)
        generate(raw, train, val, test, seed)
        marker.write_text(key)
    out = folder / "prepared"
    report = scannet.prepare(raw, out, options, workers=1, progress=False)
    if not report.ok:
        raise RuntimeError(f"preparing the synthetic rooms failed: {report.failed}")
    return out
