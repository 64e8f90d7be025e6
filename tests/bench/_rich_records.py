"""Synthetic records with everything issue 17 reads: resampling payloads (written by save_payload), a sweep,
ModelNet-C figures, load averages and split roles (kept apart from _records.py, which must not import numpy)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np

from pcbench.bench.record import record_from_metrics
from pcbench.bench.stats import ResamplePayload, save_payload
from tests.bench._records import HOST, metrics_json, probe_dict, synthetic_records

CORRUPTION_KINDS = ("jitter", "drop_global", "drop_local", "add_global", "add_local", "scale", "rotate")


def cls_payload(rng: np.random.Generator, accuracy: float, target: np.ndarray, num_classes: int) -> ResamplePayload:
    """A classifier's payload: each test sample correct with probability ``accuracy``."""
    right = rng.random(target.size) < accuracy
    wrong = (target + rng.integers(1, num_classes, target.size)) % num_classes
    return ResamplePayload.classification(target, np.where(right, target, wrong), num_classes)


def seg_payload(rng: np.random.Generator, accuracy: float, scenes: int, num_classes: int) -> ResamplePayload:
    """A segmenter's payload: per scene, points of each class mostly predicted right."""
    cm = np.zeros((scenes, num_classes, num_classes), dtype=np.int64)
    for i in range(scenes):
        for t in range(num_classes):
            n = int(rng.integers(50, 400))
            right = int(rng.binomial(n, accuracy))
            cm[i, t, t] = right
            np.add.at(cm[i, t], rng.integers(0, num_classes, n - right), 1)
    return ResamplePayload.segmentation(cm)


def corruption_figures(clean: float, drop: float) -> dict[str, Any]:
    """extra["corruptions"] of a classifier whose OA falls by ``drop`` per severity (fractions)."""
    out: dict[str, Any] = {k: [max(0.0, clean - drop * (s + 1) * (1 + 0.2 * j)) for s in range(5)]
                           for j, k in enumerate(CORRUPTION_KINDS)}
    out.update(clean_oa=clean, mce=0.9 + 2 * drop, relative_mce=0.8 + 3 * drop)
    return out


def _save(root: Path, rec: dict[str, Any], payload: ResamplePayload, relative: bool) -> None:
    run_dir = root / rec["result_id"]
    run_dir.mkdir(parents=True, exist_ok=True)
    sha = save_payload(run_dir / "resample_test.npz", payload)
    rec["run_dir"] = str(run_dir)
    rec["extra"] = {**(rec.get("extra") or {}),
                    "resample": {"path": "resample_test.npz" if relative else str(run_dir / "resample_test.npz"),
                                 "sha256": sha}}


def rich_records(root: Path, n_cls: int = 400, n_scenes: int = 12) -> list[dict[str, Any]]:
    """synthetic_records() plus: a payload per final evaluation (its recorded score is the payload's), split
    roles, ModelNet-C figures for the classifiers, one model probed on a busy machine, and a sweep of
    ``model.k`` (8, 16, 32; two seeds each) for dgcnn_cls whose rows at 16 and 32 are close."""
    rng = np.random.default_rng(0)
    recs = synthetic_records()
    target_cls = rng.integers(0, 40, n_cls)
    cls_acc = {"pointnet2_ssg_cls": 0.80, "pct_cls": 0.86}
    seg_acc = {"ptv3_seg": 0.75, "minkunet34c_seg": 0.70}
    for i, rec in enumerate(recs):
        if rec["status"] != "finished":
            continue
        extra = rec["extra"] = dict(rec.get("extra") or {})
        if rec["task"] == "cls":
            payload = cls_payload(rng, cls_acc[rec["model"]], target_cls, 40)
            rec["test"] = {**rec["test"], **payload.metrics()}
            extra["splits"] = {"train": "train", "val": "val", "test": "test", "final_role": "test"}
            extra["corruptions"] = corruption_figures(rec["test"]["oa"], 0.03 if rec["model"] == "pct_cls" else 0.05)
        else:
            payload = seg_payload(rng, seg_acc[rec["model"]], n_scenes, 20)
            rec["test"] = {**rec["val"], **payload.metrics()}
            extra["splits"] = {"train": "train", "val": "val", "test": "val", "final_role": "val"}
        if rec["model"] == "pct_cls":
            extra.update(load_avg=5.2, cpu_count=2)
        else:
            extra.update(load_avg=0.5, cpu_count=2)
        _save(root, rec, payload, relative=i % 2 == 0)
    for k, acc, sps in ((8, 0.70, 90.0), (16, 0.84, 60.0), (32, 0.845, 30.0)):
        for seed in (0, 1):
            payload = cls_payload(rng, acc, target_cls, 40)
            m = metrics_json(random.Random(k * 10 + seed), seed=seed, level=acc, num_classes=40, vote=False,
                             test_selected=False)
            m["test"] = {**m["test"], **payload.metrics()}
            m.update(params=1_800_000, sweep={"model.k": k},
                     splits={"train": "train", "val": "val", "test": "test", "final_role": "test"},
                     corruptions=corruption_figures(m["test"]["oa"], 0.04), load_avg=0.3, cpu_count=2)
            config = {"model": {"name": "dgcnn_cls", "k": k}, "data": {"name": "modelnet40"}, "seed": seed}
            rec = record_from_metrics(
                m, cell=f"dgcnn_cls/modelnet40/k={k}/seed={seed}", config=config, suite="test", model="dgcnn_cls",
                dataset="modelnet40", task="cls", recipe="dgcnn_cls_modelnet40", host=HOST, fidelity="reference",
                class_names=[f"class{i}" for i in range(40)], probe=probe_dict(1_800_000, sps),
                started_at="2025-01-01T00:00:00+00:00", finished_at="2025-01-01T00:02:00+00:00")
            _save(root, rec, payload, relative=True)
            recs.append(rec)
    return recs
