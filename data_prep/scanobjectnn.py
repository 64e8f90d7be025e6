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
0 = background) and ``label`` int64, in ``out/{train,test}/shard_00000.h5`` plus manifest.json.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import (
    Option,
    PrepError,
    PrepLock,
    Report,
    ShardJob,
    ShardResult,
    clean_stale_temps,
    prep_command,
    remove_stale_shards,
    run_shard_jobs,
    sha256_file,
    write_manifest,
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
                names = [ln.strip() for ln in cand.read_text(encoding="utf-8").splitlines() if ln.strip()]
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
    except BaseException:
        f.close()
        raise
    return f


def _rng(seed: int, name: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def process_job(job: ShardJob, raw: Path, options: dict[str, Any]) -> ShardResult:
    """Convert one official h5 file (one split) into one shard; bad objects are reported, others kept."""
    path = raw / job.inputs[0]
    num_classes = job.payload["num_classes"]
    with _open_checked(path) as f:
        data = f["data"][()]
        label = f["label"][()].reshape(-1)
        mask = f["mask"][()]
    samples, names, failed, labels = [], [], [], []
    for i in range(len(data)):
        name = f"{job.split}_{i:05d}"
        li = label[i]
        if float(li) != int(li) or not 0 <= int(li) < num_classes:
            failed.append((name, str(PrepError(f"row {i}: label {li} outside 0..{num_classes - 1}", path, "label",
                                               "use the official files"))))
            continue
        coord = data[i].astype(np.float64)
        if not np.isfinite(coord).all():
            bad = int((~np.isfinite(coord)).any(1).sum())
            failed.append((name, str(PrepError(f"row {i}: {bad} points have NaN or inf coordinates", path, "data",
                                               "re-download the file"))))
            continue
        fg = (mask[i] != -1).astype(np.int8)
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
        if options["normalize"]:
            coord = coord - coord.mean(0)
            r = np.sqrt((coord ** 2).sum(1).max())
            coord = coord / r if r > 0 else coord
        samples.append({"coord": coord.astype(np.float32), "mask": fg, "label": np.array(int(li), dtype=np.int64)})
        names.append(name)
        labels.append(int(li))
    return ShardResult(samples, names, failed, info={"labels": labels,
                                                     "counts": [int(s["coord"].shape[0]) for s in samples],
                                                     "foreground": [int(s["mask"].sum()) for s in samples]})


def check(raw: Path, options: dict[str, Any]) -> list[str]:
    """Problems with the chosen variant's files (missing, unreadable, wrong keys/shapes/dtypes); writes nothing."""
    problems = []
    try:
        class_names(raw)
    except PrepError as err:
        problems.append(str(err))
    if not Path(raw).is_dir():
        return [str(PrepError("folder not found", raw, "raw", "give raw= the h5_files folder or its parent"))]
    for path in variant_files(Path(raw), options).values():
        try:
            _open_checked(path).close()
        except PrepError as err:
            problems.append(str(err))
    return problems


def prepare(raw: Path, out: Path, options: dict[str, Any], workers: int = 1) -> Report:
    """Prepare the chosen ScanObjectNN variant from raw= into out=; resumable and atomic."""
    t0 = time.perf_counter()
    raw, out = Path(raw), Path(out)
    if options["points"] < 0:
        raise PrepError(f"points={options['points']} is negative", None, "points", "give 0 (all) or a positive count")
    if not raw.is_dir():
        raise PrepError("folder not found", raw, "raw", "give raw= the h5_files folder or its parent")
    classes, names_file = class_names(raw)
    files = variant_files(raw, options)
    report = Report(dataset="scanobjectnn", out=str(out))
    jobs = []
    for split, path in files.items():
        if not path.is_file():
            report.failed.append((split, str(PrepError("file missing", path, None,
                                                       "download the official h5_files and check variant=/split="))))
            continue
        jobs.append(ShardJob(split, split, f"{split}/shard_00000.h5", [path.relative_to(raw).as_posix()],
                             {"num_classes": len(classes)}))
    out.mkdir(parents=True, exist_ok=True)
    with PrepLock(out):
        clean_stale_temps(out)
        remove_stale_shards(out, jobs)
        records = run_shard_jobs(process_job, raw, out, options, jobs, workers, report, desc="scanobjectnn",
                                 salt=PREPARER_VERSION)
        splits, stats, inputs, outputs = {}, {}, {}, {}
        for rec in records:
            split = rec["split"]
            info = rec["info"]
            inputs.update(rec["inputs"])
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
            inputs["shape_names_ext.txt"] = sha256_file(names_file)
        report.seconds = time.perf_counter() - t0
        write_manifest(out, {
            "dataset": "scanobjectnn",
            "task": "classification",
            "preparer_version": PREPARER_VERSION,
            "command": prep_command("scanobjectnn", raw, out, options, OPTIONS),
            "options": options,
            "classes": classes,
            "label_map": {c: i for i, c in enumerate(classes)},
            "keys": ["coord", "mask", "label"],
            "splits": splits,
            "inputs": inputs,
            "outputs": outputs,
            "label_stats": stats,
            "validation": report.to_dict(),
        })
    return report
