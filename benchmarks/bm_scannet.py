"""ScanNet pipeline throughput (scenes/s): preparation of synthetic and real-size scenes, and loading.

A section for ``benchmarks/bm_data.py`` (``SECTIONS.append(bm_scenes)``); also runnable alone:
``python -m benchmarks.bm_scannet [--quick] [--workers 2]`` prints the rows as a Markdown table.
Inputs: rooms of ``data_prep.synthetic_scannet`` (what the tests check) and, when the shared real
sample is present, scene0000_00 itself plus links to it under new scene ids ("real-size": 81,369
vertices, 153,587 faces each), since only one real scene is available.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Row = dict[str, Any]


def _row(stage: str, case: str, items: int, seconds: float, note: str = "") -> Row:
    # same fields as benchmarks.bm_data rows (not imported: bm_data imports this module)
    return {"stage": stage, "case": case, "items": items, "seconds": round(seconds, 4),
            "throughput": round(items / seconds, 2) if seconds > 0 else float("inf"), "unit": "scenes/s",
            "note": note}


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    res = fn()
    return res, time.perf_counter() - t0


def _linked_real_scenes(real: Path, raw: Path, count: int) -> None:
    """``count`` scenes that are symlinks to the real scene0000_00 files, with tsv and split lists."""
    from data_prep import scannet

    src = real / "scans" / "scene0000_00"
    names = [f"scene{k:04d}_00" for k in range(count)]
    for s in names:
        d = raw / "scans" / s
        d.mkdir(parents=True, exist_ok=True)
        for p in scannet.scene_files(src, "scene0000_00").values():
            (d / p.name.replace("scene0000_00", s)).symlink_to(p)
    shutil.copy(real / scannet.TSV_NAME, raw / scannet.TSV_NAME)
    (raw / "scannetv2_train.txt").write_text("\n".join(names) + "\n")
    (raw / "scannetv2_val.txt").write_text("")
    (raw / "scannetv2_test.txt").write_text("")


def bm_scenes(quick: bool, work: Path, workers: int) -> list[Row]:
    """Preparation and loading rows for ScanNet (synthetic rooms; real-size scenes when the sample exists)."""
    import torch
    from torch.utils.data import DataLoader

    from data_prep import scannet
    from data_prep import synthetic_scannet as syn
    from pcbench.data import collate
    from pcbench.data import transforms as T
    from pcbench.data.scannet import ScanNetDataset
    from pcbench.testing import clouds

    work = Path(work)
    rows: list[Row] = []
    n_syn = 8 if quick else 40
    raw = work / "scannet_syn_raw"
    (_, sec) = _timed(lambda: syn.generate(raw, train=n_syn - n_syn // 4, val=n_syn // 4, test=0, seed=0))
    rows.append(_row("generate", f"synthetic ScanNet rooms (~2.6k vertices), {n_syn} scenes", n_syn, sec,
                     "official raw files written"))
    for w in sorted({1, workers}):
        out = work / f"scannet_syn_out_{w}"
        rep, sec = _timed(lambda out=out, w=w: scannet.prepare(raw, out, {"shard_size": 4}, w, progress=False))
        assert rep.ok and rep.samples == n_syn, rep.summary()
        rows.append(_row("prepare", f"scannet synthetic rooms, workers={w}", rep.samples, sec))
        rep, sec = _timed(lambda out=out, w=w: scannet.prepare(raw, out, {"shard_size": 4}, w, progress=False))
        rows.append(_row("prepare", f"scannet synthetic rooms, re-run (all skipped), workers={w}", rep.samples, sec))
    real = clouds.shared_data_dir()
    if real is None or not (real / "scannet" / "scans" / "scene0000_00").is_dir():
        return rows
    real = real / "scannet"
    rep, sec = _timed(lambda: scannet.prepare(real, work / "scannet_real_out", {"scenes": "scene0000_00"}, 1,
                                              progress=False))
    rows.append(_row("prepare", "REAL scene0000_00 (81,369 vertices), workers=1", rep.samples, sec,
                     "includes tsv parsing and the labels.ply cross-check"))
    n_real = 4 if quick else 16
    linked = work / "scannet_linked_raw"
    _linked_real_scenes(real, linked, n_real)
    for w in sorted({1, workers}):
        out = work / f"scannet_linked_out_{w}"
        rep, sec = _timed(lambda out=out, w=w: scannet.prepare(linked, out, {"shard_size": 2}, w, progress=False))
        assert rep.ok and rep.samples == n_real, rep.summary()
        rows.append(_row("prepare", f"real-size scenes (links to scene0000_00), workers={w}", rep.samples, sec))
    prepared = work / "scannet_linked_out_1"
    pipelines = {
        "none": None,
        "train (rotate z, scale, colour auto-contrast, GridSample 0.02)": T.Compose([
            T.RandomRotate("z"), T.RandomScale((0.9, 1.1)), T.ChromaticAutoContrast(),
            T.GridSample(0.02, "train")]),
    }
    for pname, t in pipelines.items():
        for w in sorted({0, min(workers, 2)}):
            ds = ScanNetDataset(prepared, "train", transform=t)
            dl = DataLoader(ds, batch_size=2, num_workers=w, collate_fn=collate,
                            generator=torch.Generator().manual_seed(0))
            for _ in dl:  # warm-up epoch: page cache, worker start
                pass
            t0 = time.perf_counter()
            n = sum(b.num_clouds for b in dl)
            rows.append(_row("load", f"scannet real-size scenes, transforms={pname}, workers={w}, batch=2", n,
                             time.perf_counter() - t0, "second epoch (warm), includes collate"))
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run :func:`bm_scenes` alone and print a Markdown table."""
    p = argparse.ArgumentParser(prog="bm_scannet", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small inputs")
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 4), help="processes for the parallel rows")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="pcbench_bm_scannet_"))
    try:
        rows = bm_scenes(args.quick, work, args.workers)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("| stage | case | scenes | seconds | scenes/s | note |\n|---|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['case']} | {r['items']} | {r['seconds']:.3f} | {r['throughput']:.2f} | {r['note']} |")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
