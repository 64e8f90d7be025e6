"""Data pipeline throughput: preparation (objects/s) and data loading with transforms (samples/s).

Usage: ``python -m benchmarks.bm_data [--quick] [--out bench_out/data] [--workers 2]``. Writes
``data.json`` (rows + environment) and ``data.md``. Inputs are the synthetic official-format files of
``data_prep.synthetic_objects`` (what the tests check) plus the real ModelNet samples when present.

Each section is a function ``(quick, work_dir, workers) -> list[Row]`` listed in :data:`SECTIONS`;
scene datasets (ScanNet, scenes/s) add their own section function there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.bm_scannet import bm_scenes

Row = dict[str, Any]


def _row(stage: str, case: str, items: int, seconds: float, unit: str, note: str = "") -> Row:
    return {"stage": stage, "case": case, "items": items, "seconds": round(seconds, 4),
            "throughput": round(items / seconds, 2) if seconds > 0 else float("inf"), "unit": unit, "note": note}


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    res = fn()
    return res, time.perf_counter() - t0


# ------------------------------------------------------------------------------------ preparation
def prep_objects(quick: bool, work: Path, workers: int) -> list[Row]:
    """ModelNet (txt, off meshes, ply h5) and ScanObjectNN preparation from synthetic raw files."""
    from data_prep import modelnet, scanobjectnn
    from data_prep import synthetic_objects as S
    from data_prep.common import parse_options
    from pcbench.testing import clouds

    per_class = (4, 2) if quick else (16, 4)  # x 5 shapes x (train, test)
    raw = work / "raw"
    S.write_modelnet_normal_resampled(raw, *per_class, seed=0, points=10000)
    S.write_modelnet_off(raw / "off", *per_class, seed=0, num_classes=40)
    S.write_modelnet_ply_hdf5(raw, *per_class, seed=0)
    S.write_scanobjectnn(raw / "so", *per_class, seed=0, variants=("PB_T50_RS",))
    n_obj = 5 * sum(per_class)
    rows: list[Row] = []
    cases = [
        ("modelnet40 normal_resampled 10k->1024 fps", raw, {"source": "normal_resampled"}),
        ("modelnet40 normal_resampled 10k->1024 random", raw, {"source": "normal_resampled", "sampling": "random"}),
        ("modelnet40 off meshes, 10k surface->1024 fps", raw / "off", {"allow_missing": True}),
        ("modelnet40 ply_hdf5_2048 ->1024 fps", raw, {"source": "ply_hdf5_2048"}),
    ]
    for w in sorted({1, workers}):
        for case, src, opts in cases:
            out = work / f"out_{len(rows)}"
            o = parse_options(modelnet.OPTIONS, {"shard_size": max(n_obj // (4 * w), 1), **opts})
            rep, sec = _timed(lambda src=src, out=out, o=o, w=w: modelnet.prepare(src, out, o, w))
            assert rep.samples == n_obj, rep.summary()
            rows.append(_row("prepare", f"{case}, workers={w}", rep.samples, sec, "objects/s",
                             "includes worker start-up" if w > 1 else ""))
            _, sec = _timed(lambda src=src, out=out, o=o, w=w: modelnet.prepare(src, out, o, w))
            rows.append(_row("prepare", f"{case}, re-run (all skipped), workers={w}", rep.samples, sec, "objects/s"))
        out = work / f"out_so_{w}"
        rep, sec = _timed(lambda out=out, w=w: scanobjectnn.prepare(raw / "so", out,
                                                                    parse_options(scanobjectnn.OPTIONS, {}), w))
        rows.append(_row("prepare", f"scanobjectnn PB_T50_RS 2048 pts, workers={w}", rep.samples, sec, "objects/s"))
    real = clouds.shared_data_dir()
    if real is not None and (real / "modelnet40").is_dir():
        o = parse_options(modelnet.OPTIONS, {"allow_missing": True})
        rep, sec = _timed(lambda: modelnet.prepare(real / "modelnet40", work / "real", o, 1))
        rows.append(_row("prepare", "REAL modelnet40 normal_resampled samples 10k->1024 fps, workers=1",
                         rep.samples, sec, "objects/s", "10 real files of the official release"))
    return rows


# ------------------------------------------------------------------------------------ data loading
def load_objects(quick: bool, work: Path, workers: int) -> list[Row]:
    """DataLoader throughput over prepared ModelNet/ScanObjectNN with the usual training transforms."""
    import torch
    from torch.utils.data import DataLoader

    from data_prep import modelnet, scanobjectnn
    from data_prep import synthetic_objects as S
    from data_prep.common import parse_options
    from pcbench.data import ModelNetDataset, ScanObjectNNDataset, collate, seed_worker
    from pcbench.data import transforms as T

    per_class = (8, 2) if quick else (60, 10)
    raw = work / "raw_load"
    S.write_modelnet_ply_hdf5(raw, *per_class, seed=1)
    S.write_scanobjectnn(raw / "so", *per_class, seed=1, variants=("PB_T50_RS",))
    mn = work / "mn_load"
    modelnet.prepare(raw, mn, parse_options(modelnet.OPTIONS, {"source": "ply_hdf5_2048", "points": 0}), 1)
    so = work / "so_load"
    scanobjectnn.prepare(raw / "so", so, parse_options(scanobjectnn.OPTIONS, {}), 1)
    pipelines = {
        "none": None,
        "train (random 1024, rotate z, scale, jitter, translate)": T.Compose([
            T.FixedPoints(1024, "random"), T.RandomRotate("z"), T.RandomScale((0.8, 1.25), anisotropic=True),
            T.RandomJitter(0.01, 0.05), T.RandomTranslate(0.1)]),
        "fps 1024 + so3 rotate": T.Compose([T.FixedPoints(1024, "fps"), T.RandomRotate("so3")]),
    }
    rows: list[Row] = []
    for ds_name, make in (("modelnet40 (2048 pts stored)", lambda t: ModelNetDataset(mn, "train", transform=t)),
                          ("scanobjectnn PB_T50_RS", lambda t: ScanObjectNNDataset(so, "train", transform=t))):
        for pname, t in pipelines.items():
            for w in sorted({0, workers}):
                ds = make(t)
                dl = DataLoader(ds, batch_size=32, shuffle=True, num_workers=w, collate_fn=collate,
                                worker_init_fn=seed_worker if w else None, persistent_workers=w > 0,
                                generator=torch.Generator().manual_seed(0))
                n = 0
                for b in dl:  # warm-up epoch: page cache, worker start
                    n += b.num_clouds
                t0 = time.perf_counter()
                n = epochs = 0
                while epochs < 1 or time.perf_counter() - t0 < 0.5:  # whole epochs, at least 0.5 s
                    for b in dl:
                        n += b.num_clouds
                    epochs += 1
                rows.append(_row("load", f"{ds_name}, transforms={pname}, workers={w}, batch=32", n,
                                 time.perf_counter() - t0, "samples/s",
                                 f"{epochs} warm epoch(s) after one warm-up, persistent workers, includes collate"))
    return rows


#: Benchmark sections in run order.
SECTIONS: list[Callable[[bool, Path, int], list[Row]]] = [prep_objects, load_objects, bm_scenes]


def markdown(rows: list[Row], env: dict[str, Any]) -> str:
    """Rows as a Markdown table (throughput per stage and case)."""
    lines = ["## data pipeline throughput", "",
             f"torch threads={env.get('threads')}, cpu={env.get('cpu')} x{env.get('cpu_count')}, "
             f"load average at the end={env.get('loadavg')}, commit={env.get('git_commit')}", "",
             "| stage | case | items | seconds | throughput | note |", "|---|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['case']} | {r['items']} | {r['seconds']:.3f} | "
                     f"{r['throughput']:.1f} {r['unit']} | {r['note']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run every section and write data.json + data.md."""
    p = argparse.ArgumentParser(prog="bm_data", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small inputs (about a minute on 2 cores)")
    p.add_argument("--out", default="bench_out/data", help="folder for data.json and data.md")
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 4), help="processes for the parallel rows")
    args = p.parse_args(argv)
    from benchmarks.harness import environment

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="pcbench_bm_data_"))
    rows: list[Row] = []
    try:
        for section in SECTIONS:
            got = section(args.quick, work, args.workers)
            for r in got:
                print(f"{r['stage']:8s} {r['throughput']:10.1f} {r['unit']:10s} {r['case']}", flush=True)
            rows += got
    finally:
        shutil.rmtree(work, ignore_errors=True)
    env = environment()
    env["loadavg"] = [round(x, 2) for x in os.getloadavg()]  # other processes share the cores: say so
    (out / "data.json").write_text(json.dumps({"environment": env, "quick": args.quick, "rows": rows}, indent=1))
    (out / "data.md").write_text(markdown(rows, env))
    print(f"wrote {out / 'data.json'} and {out / 'data.md'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
