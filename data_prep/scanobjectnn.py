"""ScanObjectNN preparer: the official h5 release (15 classes, 2048 points per object) to ragged shards.

Raw layout (raw= may point at ``h5_files/`` or its parent)::

    h5_files/main_split/{training,test}_objectdataset[_<suffix>].h5       (with background points)
    h5_files/main_split_nobg/{training,test}_objectdataset[_<suffix>].h5  (background removed)

with keys ``data`` (N,2048,3) float32, ``label`` (N,) integer and ``mask`` (N,2048) (-1 = background).
Named variants map to files as in the official README (hkust-vgd/scanobjectnn):

    OBJ_BG    main_split/*_objectdataset.h5            PB_T25    main_split/*_objectdataset_augmented25_norot.h5
    OBJ_ONLY  main_split_nobg/*_objectdataset.h5       PB_T25_R  main_split/*_objectdataset_augmented25rot.h5
    PB_T50_R  main_split/*_objectdataset_augmentedrot.h5
    PB_T50_RS main_split/*_objectdataset_augmentedrot_scale75.h5

``split=split1..split4`` picks the other official random splits (same file names in ``split<k>[_nobg]/``).
Class names come from ``shape_names_ext.txt`` (raw= or a parent folder) or the built-in official list;
label = line index. Output per object: ``coord`` float32 [n,3], ``mask`` int8 [n] (1 = object point,
0 = background), ``label`` int64 and, with ``normals=estimate``, ``normal`` float32 [n,3], in
``out/{train,test}/shard_00000.h5`` plus manifest.json. A float ``mask`` is refused (only -1 marks
background, so values such as 0.0/1.0 would turn every point into foreground); float labels are read
only when they are whole numbers, with a warning.

Normals (``normals=estimate``; the release has none, ModelNet recipes use them): open3d's
``PointCloud.estimate_normals`` (PCA of the ``normals_k`` nearest neighbours, a scale-free neighbourhood,
since the release is not normalised), computed on all 2048 points before any subsampling, then oriented
away from the centroid of the object points (mask != -1; all points when there are none). Why this
orientation rather than open3d's ``orient_normals_consistent_tangent_plane``: it is decided per point,
so it cannot propagate a wrong flip across the holes, thin parts and background gaps of partial scans,
it does not depend on point order, and it gives object points the outward convention of ModelNet's
normals. Background points follow the same rule, so their sign carries no meaning. The method and its
parameters are recorded in the manifest (``normals``).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import (
    Option,
    OutputFolder,
    PrepError,
    Report,
    ShardJob,
    ShardResult,
    check_shard_jobs,
    input_key,
    prep_command,
    read_text_input,
    require_folder,
    run_shard_jobs,
    sha256_file,
)

PREPARER_VERSION = "1.0"

#: shape_names_ext.txt of the official release; the h5 label is the line index.
CLASSES = ["bag", "bin", "box", "cabinet", "chair", "desk", "display", "door", "shelf", "table", "bed", "pillow",
           "sink", "sofa", "toilet"]

#: variant -> (folder suffix, file suffix) as in the official README.
VARIANTS: dict[str, tuple[str, str]] = {
    "OBJ_BG": ("", ""),
    "OBJ_ONLY": ("_nobg", ""),
    "PB_T25": ("", "_augmented25_norot"),
    "PB_T25_R": ("", "_augmented25rot"),
    "PB_T50_R": ("", "_augmentedrot"),
    "PB_T50_RS": ("", "_augmentedrot_scale75"),
}
SPLIT_FILES = {"train": "training", "test": "test"}
NUM_POINTS = 2048

OPTIONS: dict[str, Option] = {
    "variant": Option("PB_T50_RS", "benchmark variant (file mapping in the help text above)", str,
                      tuple(VARIANTS)),
    "split": Option("main_split", "official train/test split folder", str,
                    ("main_split", "split1", "split2", "split3", "split4")),
    "points": Option(0, "points kept per object (0 keeps all 2048)", int),
    "sampling": Option("fps", "how points are reduced to `points`: farthest point sampling or uniform random", str,
                       ("fps", "random")),
    "normalize": Option(False, "centre each object and scale it into the unit sphere (the release is not)", bool),
    "normals": Option("none", "none, or estimate = unit normals by open3d from the normals_k nearest neighbours, "
                      "oriented away from the object's centroid (see above); stored as `normal`", str,
                      ("none", "estimate")),
    "normals_k": Option(30, "neighbours per point for normals=estimate", int),
    "seed": Option(0, "seed of the subsampling (per object: derived from seed and the object index)", int),
}


def _h5_root(raw: Path) -> Path:
    return raw / "h5_files" if (raw / "h5_files").is_dir() else raw


def variant_files(raw: Path, options: dict[str, Any]) -> dict[str, Path]:
    """{split: h5 path} of the chosen variant and split folder."""
    folder_sfx, file_sfx = VARIANTS[options["variant"]]
    folder = _h5_root(Path(raw)) / f"{options['split']}{folder_sfx}"
    return {s: folder / f"{f}_objectdataset{file_sfx}.h5" for s, f in SPLIT_FILES.items()}


def class_names(raw: Path) -> tuple[list[str], Path | None]:
    """Class names from shape_names_ext.txt in raw= or up to two parents, else the built-in list."""
    raw = Path(raw).resolve()
    for d in [raw, *list(raw.parents)[:2]]:
        for cand in (d / "shape_names_ext.txt", d / "training_data" / "shape_names_ext.txt"):
            if cand.is_file():
                text = read_text_input(cand, "class name list", "use the official shape_names_ext.txt")
                names = [ln.strip() for ln in text.splitlines() if ln.strip()]
                if len(names) != len(CLASSES):
                    raise PrepError(f"{len(names)} class names, expected {len(CLASSES)}", cand, "classes",
                                    "use the official shape_names_ext.txt")
                return names, cand
    return list(CLASSES), None


def _open_checked(path: Path) -> Any:
    """Open an official h5 and validate keys, shapes and dtypes; PrepError naming the field."""
    import h5py  # noqa: PLC0415

    if not path.is_file():
        raise PrepError("file missing", path, None,
                        "download h5_files.zip from the ScanObjectNN site and point raw= at h5_files/ or its parent")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise PrepError(f"not a readable HDF5 file ({err})", path, None, "re-download it") from None
    try:
        for k in ("data", "label", "mask"):
            if k not in f:
                raise PrepError(f"key {k!r} missing (keys: {sorted(f.keys())})", path, k,
                                "use the official ScanObjectNN h5 files (keys data, label, mask)")
        d, lab, m = f["data"], f["label"], f["mask"]
        if d.ndim != 3 or d.shape[2] != 3:
            raise PrepError(f"shape {d.shape}, expected (N, {NUM_POINTS}, 3)", path, "data", "use the official files")
        if d.dtype.kind != "f":
            raise PrepError(f"dtype {d.dtype}, expected float32", path, "data", "use the official files")
        n, p = d.shape[:2]
        if lab.size != n or lab.ndim not in (1, 2):
            raise PrepError(f"shape {lab.shape}, expected ({n},)", path, "label", "use the official files")
        if lab.dtype.kind not in "iuf":
            raise PrepError(f"dtype {lab.dtype}, expected an integer type", path, "label", "use the official files")
        if m.shape != (n, p):
            raise PrepError(f"shape {m.shape}, expected ({n}, {p}) like data", path, "mask", "use the official files")
        if m.dtype.kind not in "iu":
            raise PrepError(f"dtype {m.dtype}, expected an integer type (-1 = background, anything else = object); "
                            "reading other values as object points would make every point foreground", path, "mask",
                            "use the official files")
    except BaseException:
        f.close()
        raise
    return f


def _rng(seed: int, name: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def estimate_normals(coord: np.ndarray, k: int, centre: np.ndarray | None = None) -> np.ndarray:
    """Unit normals [n,3] float64 of a cloud [n,3]: open3d's PCA over the ``k`` nearest neighbours of each
    point, flipped to point away from ``centre`` (default: the cloud's centroid)."""
    from pcbench._deps import require_open3d  # noqa: PLC0415 - heavy import only when normals are asked for

    o3d = require_open3d()
    pts = np.ascontiguousarray(coord, dtype=np.float64)
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts))
    pcd.estimate_normals(o3d.geometry.KDTreeSearchParamKNN(knn=int(k)))
    c = pts.mean(0) if centre is None else np.asarray(centre, dtype=np.float64)
    pcd.orient_normals_towards_camera_location(c)  # n . (c - p) >= 0: towards the centre ...
    return -np.asarray(pcd.normals)  # ... so the negation points away from it


def process_job(job: ShardJob, raw: Path, options: dict[str, Any]) -> ShardResult:
    """Convert one official h5 file (one split) into one shard; bad objects are reported, others kept."""
    path = raw / job.inputs[0]
    num_classes = job.payload["num_classes"]
    with _open_checked(path) as f:
        data = f["data"][()]
        label = f["label"][()].reshape(-1)
        mask = f["mask"][()]
    samples, names, failed, labels, warnings = [], [], [], [], []
    if label.dtype.kind == "f":
        warnings.append(str(PrepError(f"stored as {label.dtype}, not an integer type: whole numbers are read as "
                                      "labels, any other value fails its object", path, "label",
                                      "use the official files")))
    for i in range(len(data)):
        name = f"{job.split}_{i:05d}"
        li = label[i].item()
        if not float(li).is_integer() or not 0 <= int(li) < num_classes:
            failed.append((name, str(PrepError(f"row {i}: label {li!r} outside 0..{num_classes - 1}", path, "label",
                                               "use the official files"))))
            continue
        coord = data[i].astype(np.float64)
        if not np.isfinite(coord).all():
            bad = int((~np.isfinite(coord)).any(1).sum())
            failed.append((name, str(PrepError(f"row {i}: {bad} points have NaN or inf coordinates", path, "data",
                                               "re-download the file"))))
            continue
        fg = (mask[i] != -1).astype(np.int8)
        normal = None
        if options["normals"] == "estimate":
            obj = coord[fg == 1] if fg.any() else coord
            normal = estimate_normals(coord, options["normals_k"], obj.mean(0))
        n = options["points"]
        if n and coord.shape[0] > n:
            rng = _rng(options["seed"], name)
            if options["sampling"] == "fps":
                import torch  # noqa: PLC0415

                from pcbench.ops import farthest_point_sample  # noqa: PLC0415

                sel = farthest_point_sample(torch.from_numpy(coord), n=n,
                                            start=int(rng.integers(coord.shape[0]))).numpy()
            else:
                sel = np.sort(rng.choice(coord.shape[0], n, replace=False))
            coord, fg = coord[sel], fg[sel]
            normal = normal[sel] if normal is not None else None
        if options["normalize"]:
            coord = coord - coord.mean(0)
            r = np.sqrt((coord ** 2).sum(1).max())
            coord = coord / r if r > 0 else coord
        sample = {"coord": coord.astype(np.float32), "mask": fg}
        if normal is not None:
            sample["normal"] = normal.astype(np.float32)
        sample["label"] = np.array(int(li), dtype=np.int64)
        samples.append(sample)
        names.append(name)
        labels.append(int(li))
    return ShardResult(samples, names, failed, info={"labels": labels,
                                                     "counts": [int(s["coord"].shape[0]) for s in samples],
                                                     "foreground": [int(s["mask"].sum()) for s in samples]},
                       warnings=warnings)


def _check_options(options: dict[str, Any]) -> None:
    if options["points"] < 0:
        raise PrepError(f"points={options['points']} is negative", None, "points", "give 0 (all) or a positive count")
    if options["normals_k"] < 3:
        raise PrepError(f"normals_k={options['normals_k']} is too small", None, "normals_k",
                        "give at least 3 neighbours (a plane needs 3 points; 30 is the default)")


def _plan(raw: Path, options: dict[str, Any]) -> tuple[list[str], Path | None, list[ShardJob], list[tuple[str, Path]]]:
    """(classes, class-name file, jobs of the present split files, [(split, missing file)]); PrepError when
    raw= is unusable or holds none of the chosen variant's files (then nothing is touched)."""
    raw = require_folder(raw, "give raw= the h5_files folder or its parent")
    classes, names_file = class_names(raw)
    jobs, missing = [], []
    for split, path in variant_files(raw, options).items():
        if not path.is_file():
            missing.append((split, path))
            continue
        jobs.append(ShardJob(split, split, f"{split}/shard_00000.h5", [path.relative_to(raw).as_posix()],
                             {"num_classes": len(classes)}))
    if not jobs:
        raise PrepError(f"none of the {options['variant']} files of split={options['split']} is here (looked for "
                        f"{', '.join(str(p) for _, p in missing)})", raw, "variant",
                        "check variant= and split= against the h5_files folder, or download the official h5_files")
    return classes, names_file, jobs, missing


def _missing_error(path: Path) -> PrepError:
    return PrepError("file missing", path, None, "download the official h5_files and check variant=/split=")


def check(raw: Path, options: dict[str, Any], workers: int = 1, progress: bool | None = None) -> list[str]:
    """Every problem :func:`prepare` would meet, without writing: the class names, the chosen variant's
    files (missing, unreadable, wrong keys/shapes/dtypes) and every object read and converted."""
    try:
        _check_options(options)
        _, _, jobs, missing = _plan(Path(raw), options)
    except PrepError as err:
        return [str(err)]
    problems = [str(_missing_error(p)) for _, p in missing]
    return problems + check_shard_jobs(process_job, Path(raw), options, jobs, workers, desc="scanobjectnn",
                                       progress=progress)


def normals_note(options: dict[str, Any]) -> dict[str, Any] | str:
    """What ``normals=`` did, for the manifest."""
    if options["normals"] != "estimate":
        return "none (the release has no normals)"
    return {"method": "open3d.geometry.PointCloud.estimate_normals: PCA of the k nearest neighbours",
            "neighbourhood": {"type": "knn", "k": options["normals_k"]},
            "computed_on": f"all {NUM_POINTS} points of the object as released, before subsampling and normalisation",
            "orientation": "away from the centroid of the object points (mask != -1; all points if none)"}


def prepare(raw: Path, out: Path, options: dict[str, Any], workers: int = 1) -> Report:
    """Prepare the chosen ScanObjectNN variant from raw= into out=; resumable and atomic."""
    t0 = time.perf_counter()
    raw, out = Path(raw), Path(out)
    _check_options(options)
    classes, names_file, jobs, missing = _plan(raw, options)
    report = Report(dataset="scanobjectnn", out=str(out))
    report.failed += [(split, str(_missing_error(path))) for split, path in missing]
    command = prep_command("scanobjectnn", raw, out, options, OPTIONS)
    with OutputFolder(out, "scanobjectnn", command) as folder:
        folder.claim(j.output for j in jobs)
        records = run_shard_jobs(process_job, raw, out, options, jobs, workers, report, desc="scanobjectnn",
                                 salt=PREPARER_VERSION, before_write=folder.begin_writes)
        splits, stats, inputs, outputs = {}, {}, {}, {}
        for rec in records:
            split = rec["split"]
            info = rec["info"]
            inputs.update({k: v for k, v in rec["inputs"].items() if v is not None})
            outputs.update(rec["outputs"])
            path = next(iter(rec["outputs"]))
            splits[split] = {"files": [{"path": path, "num_samples": len(rec["names"]),
                                        "num_points": info["counts"]}],
                             "num_samples": len(rec["names"]),
                             "background_fraction": (1 - sum(info["foreground"]) / max(sum(info["counts"]), 1))}
            st = stats.setdefault(split, dict.fromkeys(classes, 0))
            for lab in info["labels"]:
                st[classes[lab]] += 1
        if names_file is not None:
            inputs[input_key(names_file, raw.resolve())] = sha256_file(names_file)
        report.seconds = time.perf_counter() - t0
        manifest = {
            "dataset": "scanobjectnn",
            "task": "classification",
            "preparer_version": PREPARER_VERSION,
            "command": command,
            "raw": str(raw),
            "options": options,
            "normals": normals_note(options),
            "classes": classes,
            "label_map": {c: i for i, c in enumerate(classes)},
            "keys": ["coord", "mask", "normal", "label"] if options["normals"] == "estimate" else ["coord", "mask", "label"],
            "splits": splits,
            "inputs": inputs,
            "outputs": outputs,
            "label_stats": stats,
            "validation": report.to_dict(),
        }
        folder.commit(manifest, report, complete=not missing and len(records) == len(jobs), units=[j.key for j in jobs])
    return report
