"""Synthetic result records that follow the trainer's metrics.json schema: several models, datasets, seeds,
protocols, a failed cell."""

from __future__ import annotations

import random
from typing import Any

from pcbench.bench.record import record_from_metrics

HOST = {"torch_version": "2.13.0+cpu", "cuda_version": None, "device_name": "Test CPU @ 2.0GHz",
        "cpu_model": "Test CPU @ 2.0GHz", "num_threads": 2, "allocator": "glibc default", "hostname": "testhost",
        "python_version": "3.11.2"}


def split_metrics(rng: random.Random, num_classes: int, level: float) -> dict[str, Any]:
    """A metric dict with per-class arrays around ``level`` (fractions in [0, 1])."""
    iou = [min(1.0, max(0.0, level - 0.15 + rng.random() * 0.2)) for _ in range(num_classes)]
    acc = [min(1.0, v + 0.1) for v in iou]
    return {"oa": min(1.0, level + 0.1), "macc": sum(acc) / num_classes, "miou": sum(iou) / num_classes,
            "iou_per_class": iou, "acc_per_class": acc}


def metrics_json(rng: random.Random, *, seed: int, level: float, num_classes: int, vote: bool,
                 test_selected: bool, has_test: bool = True) -> dict[str, Any]:
    """A dict shaped like the trainer's metrics.json."""
    m: dict[str, Any] = {
        "val": split_metrics(rng, num_classes, level + 0.02),
        "test": split_metrics(rng, num_classes, level) if has_test else {},
        "best_epoch": 7, "selected_on": "val", "epochs": 10, "steps": 400,
        "train_samples_per_s": 50.0 + 10 * rng.random(), "eval_samples_per_s": 200.0 + 10 * rng.random(),
        "peak_memory_mib": 900.0, "params": 1_000_000, "wall_s": 120.0 + rng.random(), "seed": seed,
        "config_sha256": f"{seed:064x}", "dataset_manifest_sha256": "ab" * 32, "pcbench_version": "0.1.0",
        "git_commit": "0123abc", "torch_version": "2.13.0+cpu", "device": "cpu",
    }
    if vote:
        m["test_vote"] = split_metrics(rng, num_classes, level + 0.005)
    if test_selected:
        m["test_selected"] = split_metrics(rng, num_classes, level + 0.01)
    return m


MODELS = {  # name -> (task, level, params, train samples/s)
    "pointnet2_ssg_cls": ("cls", 0.80, 1_475_688, 120.0),
    "pct_cls": ("cls", 0.83, 2_876_136, 60.0),
    "ptv3_seg": ("seg", 0.55, 46_167_572, 2.0),
    "minkunet34c_seg": ("seg", 0.50, 37_856_052, 3.0),
}
DATASETS = {"modelnet40": ("cls", 40), "scannet20": ("seg", 20)}


def probe_dict(params: int, train_sps: float) -> dict[str, Any]:
    """A probe result shaped like pcbench.bench.probe.probe_efficiency's."""
    return {"params": params, "flops_per_sample": params * 1500.0, "train_samples_per_s": train_sps,
            "infer_samples_per_s": train_sps * 3, "latency_b1_ms": 1000.0 / (train_sps * 4),
            "train_peak_mib": 800.0, "infer_peak_mib": 200.0, "memory_method": "peak RSS increase",
            "device": "cpu", "device_name": HOST["device_name"], "num_threads": 2,
            "bf16_status": "ok", "bf16_samples_per_s": train_sps * 2.5, "bf16_speedup": 0.8,
            "bf16_score_delta": -0.001, "int8_status": "ok", "int8_samples_per_s": train_sps * 3.3,
            "int8_speedup": 1.1, "int8_score_delta": -0.004}


def synthetic_records(seeds: tuple[int, ...] = (0, 1, 2), suite: str = "test") -> list[dict[str, Any]]:
    """Records of every (model, dataset) pair of matching task x seeds, plus one failed cell."""
    rng = random.Random(0)
    out = []
    for model, (task, level, params, sps) in MODELS.items():
        for dataset, (dtask, ncls) in DATASETS.items():
            if dtask != task:
                continue
            for seed in seeds:
                m = metrics_json(rng, seed=seed, level=level + 0.01 * seed, num_classes=ncls, vote=task == "cls",
                                 test_selected=task == "cls", has_test=task == "cls")
                m["params"] = params
                config = {"model": {"name": model}, "data": {"name": dataset}, "seed": seed}
                out.append(record_from_metrics(
                    m, cell=f"{model}/{dataset}/seed={seed}", config=config, suite=suite, model=model,
                    dataset=dataset, task=task, recipe=f"{model}_{dataset}", host=HOST,
                    fidelity="reference" if model != "pct_cls" else "pcbench variant",
                    class_names=[f"class{i}" for i in range(ncls)], probe=probe_dict(params, sps),
                    started_at="2025-01-01T00:00:00+00:00", finished_at="2025-01-01T00:02:00+00:00",
                    run_dir=f"/runs/{model}/{dataset}/{seed}"))
    out.append(record_from_metrics(
        None, cell="ptv1_cls/modelnet40/seed=0", config={"model": {"name": "ptv1_cls"}, "seed": 0}, suite=suite,
        model="ptv1_cls", dataset="modelnet40", task="cls", status="failed", host=HOST,
        error="RuntimeError: CUDA out of memory", log_path="/runs/ptv1_cls/modelnet40/0/train.log"))
    return out
