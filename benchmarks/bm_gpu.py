"""Device benchmark: every model's train / inference throughput and peak memory, and the neighbour ops, on one GPU.

Usage, on a machine with a CUDA GPU (one command):

    python -m benchmarks.bm_gpu --out bench_out/gpu

For every model config (``conf/model/*_{cls,seg}.yaml``) a worker subprocess builds the model at its paper batch
size and point count (the first ``conf/experiment`` recipe that uses it: ``trainer.device_batch_size`` clouds of
``data.num_points`` / ``data.train_max_points`` points; models without a recipe get the stated default) and, in
fp32, bf16 and fp16 (autocast; fp16 with a GradScaler, as ``pcbench.train``), times ``train`` (forward,
cross-entropy, backward, AdamW step) and ``infer`` (eval, no_grad) and records ``torch.cuda.max_memory_allocated``
per row. Beside a model, the published throughput where a source gives one (``PUBLISHED``: measured elsewhere, on
other hardware, so shown, never divided by). Then the ops (kNN, ball query, FPS, kernel map, serialization) at an
object batch and a scene. Writes ``gpu.json`` and ``gpu.md`` under ``--out``, with the GPU's name.

``--smoke``: tiny sizes on the CPU (device ``cpu (smoke)``), seconds per model, the same JSON / Markdown schema;
peak memory is then the worker's peak RSS. Without CUDA and without ``--smoke`` the command exits with a message.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks.harness import run_json_worker
from pcbench.io import write_text

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
PRECISIONS = ("fp32", "bf16", "fp16")
MODES = ("train", "infer")

#: Published throughputs, with their source. PointNeXt's model zoo (guochengqian/PointNeXt docs/modelzoo.md @
#: f9eac280b082b0d3210305f04ef6da4fbb1d038b): "TP: Throughput (instance per second) measured using an NVIDIA Tesla
#: V100 32GB GPU and a 32 core Intel Xeon @ 2.80GHz CPU"; ScanObjectNN "Throughput is measured with 128 x 1024
#: points"; its "PointNet++" row (1.5M params, i.e. the single-scale classifier) lists 1872 in both the
#: ScanObjectNN and the ModelNet40 table. Its other rows (PointNet, DGCNN, PointMLP, PointNeXt) are not pcbench
#: models; no other source read for this file states a throughput for a pcbench model.
PUBLISHED: dict[str, dict[str, Any]] = {
    "pointnet2_ssg_cls": {
        "samples_per_s": 1872.0, "mode": "infer", "batch": 128, "points": 1024, "gpu": "Tesla V100 32GB",
        "source": "guochengqian/PointNeXt docs/modelzoo.md @ f9eac280b082b0d3210305f04ef6da4fbb1d038b "
                  "(PointNet++ row, ScanObjectNN and ModelNet40 tables)",
    },
}

#: Sizes of models that no conf/experiment recipe uses (batch per device, points per cloud, why).
DEFAULT_SIZES = {
    "cls": (32, 1024, "no recipe in conf/experiment: ModelNet40's 1024 points (data.num_points), batch 32"),
    "seg": (2, 102400, "no recipe in conf/experiment: the ScanNet training crop (data.train_max_points), batch 2"),
}
SMOKE_SIZES = {"cls": (2, 128), "seg": (1, 512)}

#: Rows left out on purpose, with the reason shown in the table.
SKIP = {"pct_seg": "global offset attention is O(n^2): a 100k-point scene needs ~40 GB per attention map"}


# ------------------------------------------------------------------------------------------------ sizes
def model_configs() -> list[str]:
    """Every model config name (``conf/model/*_{cls,seg}.yaml``), sorted."""
    return [p.stem for p in sorted((CONF / "model").glob("*.yaml")) if p.stem.endswith(("_cls", "_seg"))]


def paper_size(config: str) -> tuple[int, int, str]:
    """(clouds per device, points per cloud, source) of the first conf/experiment recipe using ``config``."""
    from pcbench.train import compose  # noqa: PLC0415 - hydra is slow to import; the worker never needs it

    task = "cls" if config.endswith("_cls") else "seg"
    for path in sorted((CONF / "experiment").glob("*.yaml")):
        if f"override /model: {config}\n" not in path.read_text():
            continue
        cfg = compose([f"experiment={path.stem}"])
        batch = int(cfg.trainer.device_batch_size or cfg.trainer.batch_size)
        points = int(cfg.data.num_points if task == "cls" else cfg.data.train_max_points)
        return batch, points, f"conf/experiment/{path.name}"
    return DEFAULT_SIZES[task]


# ------------------------------------------------------------------------------------------------ worker
def _peak_mib(device: Any) -> float:
    import torch  # noqa: PLC0415

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux: the process's peak RSS


def _reset_peak(device: Any) -> None:
    import torch  # noqa: PLC0415

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _model_inputs(task: str, batch: int, points: int, device: Any) -> tuple[Any, Any, int]:
    """(PointBatch, labels, classes): object clouds for classifiers, synthetic rooms for segmentation."""
    import torch  # noqa: PLC0415

    from pcbench.ops import PointBatch, lengths2offset  # noqa: PLC0415
    from pcbench.testing.clouds import object_batch, scan_like_scene  # noqa: PLC0415

    g = torch.Generator().manual_seed(0)
    if task == "cls":
        coord, offset = object_batch(batch, points)
    else:
        coord = torch.cat([scan_like_scene(points, seed=i) for i in range(batch)])
        offset = lengths2offset(torch.full((batch,), points, dtype=torch.long))
    feat = torch.rand(coord.shape[0], 3, generator=g)
    n_cls = 40 if task == "cls" else 20
    labels = torch.randint(0, n_cls, (batch if task == "cls" else coord.shape[0],), generator=g)
    return PointBatch(coord, feat, offset).to(device), labels.to(device), n_cls


def _time_ms(call: Any, warmup: int, repeats: int) -> list[float]:
    from benchmarks.harness import time_fn  # noqa: PLC0415 - imports torch

    return time_fn(call, repeats=repeats, warmup=warmup)


def model_worker(ns: argparse.Namespace) -> dict[str, Any]:
    """Every (precision, mode) row of one model in this process: samples/s and peak memory per row."""
    import torch  # noqa: PLC0415
    from omegaconf import OmegaConf  # noqa: PLC0415

    from pcbench.models import build_model, model_task  # noqa: PLC0415

    device = torch.device(ns.device)
    cfg = OmegaConf.load(CONF / "model" / f"{ns.config}.yaml")
    task = model_task(cfg)
    batch, labels, n_cls = _model_inputs(task, ns.batch, ns.points, device)
    torch.manual_seed(0)
    model = build_model(cfg, in_channels=3, num_classes=n_cls).to(device)
    rows = []
    for precision in ns.precisions.split(","):
        for mode in MODES:
            row: dict[str, Any] = {"precision": precision, "mode": mode}
            _reset_peak(device)
            try:
                call = _model_step(model, mode, precision, batch, labels, device)
                ms = _time_ms(call, ns.warmup, ns.repeats)
            except (RuntimeError, ValueError, NotImplementedError) as err:  # OOM, an op without this dtype
                row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:160]}"
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                rows.append(row)
                continue
            med = statistics.median(ms)
            row.update(median_ms=med, samples_per_s=ns.batch / (med / 1e3), peak_memory_mib=_peak_mib(device),
                       times_ms=ms)
            rows.append(row)
    return {"config": ns.config, "task": task, "params": sum(p.numel() for p in model.parameters()),
            "batch": ns.batch, "points_per_cloud": ns.points, "rows": rows}


def _model_step(model: Any, mode: str, precision: str, batch: Any, labels: Any, device: Any) -> Any:
    """One timed call: ``train`` = autocast forward, cross-entropy, (scaled) backward, AdamW step; ``infer`` =
    eval + no_grad autocast forward."""
    import torch  # noqa: PLC0415

    from pcbench.train.evaluation import autocast_context  # noqa: PLC0415

    if mode == "infer":
        model.eval()

        def infer() -> None:
            with torch.no_grad(), autocast_context(device, precision):
                model(batch)
        return infer
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def train() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast_context(device, precision):
            loss = torch.nn.functional.cross_entropy(model(batch).float(), labels)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return train


def op_worker(ns: argparse.Namespace) -> dict[str, Any]:
    """The neighbour ops at an object batch and a scene (fp32 coordinates): median ms and peak memory."""
    import torch  # noqa: PLC0415

    from pcbench.ops import (  # noqa: PLC0415
        ball_query,
        farthest_point_sample,
        kernel_map,
        knn,
        sample_offset,
        serialize,
        voxelize,
    )
    from pcbench.testing.clouds import object_batch, scan_like_scene  # noqa: PLC0415

    device = torch.device(ns.device)
    obj_b, obj_n = (2, 128) if ns.smoke else (32, 1024)
    scene_n = 1024 if ns.smoke else 100_000
    coord, offset = object_batch(obj_b, obj_n)
    clouds = {f"object {obj_b}x{obj_n}": (coord.to(device), offset.to(device)),
              f"scene 1x{scene_n}": (scan_like_scene(scene_n, seed=0).to(device),
                                     torch.tensor([scene_n], device=device))}
    rows = []
    for case, (xyz, off) in clouds.items():
        # the PointNet++ / PTv1 neighbourhoods and a quarter-rate FPS; PTv3's 2 cm grid for kernel map / serialize
        sampled = farthest_point_sample(xyz, off, ratio=0.25)
        q_off = sample_offset(off, ratio=0.25)
        vox = voxelize(xyz, 0.02, off)[0]
        grid = vox[:, 1:] - vox[:, 1:].amin(0)
        vox_off = torch.cumsum(torch.bincount(vox[:, 0], minlength=off.numel()), 0)
        ops = {
            "knn k=16": lambda xyz=xyz, off=off: knn(xyz, xyz, 16, off, off),
            "ball_query r=0.1 k=32": lambda xyz=xyz, off=off, s=sampled, qo=q_off: ball_query(
                xyz[s], xyz, 0.1, 32, qo, off),
            "fps ratio=0.25": lambda xyz=xyz, off=off: farthest_point_sample(xyz, off, ratio=0.25),
            "kernel_map k=3 @2cm": lambda v=vox: kernel_map(v, v, 3, 1),
            "serialize z @2cm": lambda g=grid, o=vox_off: serialize(g, o, "z"),
        }
        for name, fn in ops.items():
            _reset_peak(device)
            ms = _time_ms(fn, ns.warmup, ns.repeats)
            rows.append({"op": name, "case": case, "points": int(xyz.shape[0]), "voxels": int(vox.shape[0]),
                         "median_ms": statistics.median(ms), "peak_memory_mib": _peak_mib(device), "times_ms": ms})
    return {"rows": rows}


# ------------------------------------------------------------------------------------------------ driver
def device_name(smoke: bool) -> str:
    """The GPU's name (``torch.cuda.get_device_name``), or ``cpu (smoke)``."""
    import torch  # noqa: PLC0415

    return "cpu (smoke)" if smoke else torch.cuda.get_device_name(0)


def _worker_cmd(ns: argparse.Namespace, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "benchmarks.bm_gpu", "--worker", "--device", ns.device, "--repeats",
           str(ns.repeats), "--warmup", str(ns.warmup), "--precisions", ns.precisions, *extra]
    return cmd + (["--smoke"] if ns.smoke else [])


def markdown(record: dict[str, Any]) -> str:
    """The record as Markdown: model rows with the published figure beside them, then the op rows."""
    env = record["environment"]
    lines = [f"## GPU benchmark: {record['device']}", "",
             "| model | batch x points | precision | mode | samples/s | peak MiB | published samples/s |",
             "|---|---|---|---|---:|---:|---|"]
    for m in record["models"]:
        pub = PUBLISHED.get(m["config"])
        size = f"{m.get('batch', '-')} x {m.get('points_per_cloud', '-')}"
        if m.get("error"):
            lines.append(f"| {m['config']} | {size} | - | - | {m['error']} | - | - |")
            continue
        for r in m["rows"]:
            pub_txt = (f"{pub['samples_per_s']:g} ({pub['gpu']}, {pub['batch']} x {pub['points']}, [1])"
                       if pub and r["mode"] == pub["mode"] and r["precision"] == "fp32" else "")
            if r.get("error"):
                lines.append(f"| {m['config']} | {size} | {r['precision']} | {r['mode']} | failed: {r['error']} "
                             f"| - | {pub_txt} |")
                continue
            lines.append(f"| {m['config']} | {size} | {r['precision']} | {r['mode']} | {r['samples_per_s']:.4g} | "
                         f"{r['peak_memory_mib']:.0f} | {pub_txt} |")
    lines += ["", "| op | case | points | median ms | peak MiB |", "|---|---|---:|---:|---:|"]
    for r in record["ops"]:
        if r.get("error"):
            lines.append(f"| {r['op']} | {r['case']} | - | failed: {r['error']} | - |")
            continue
        lines.append(f"| {r['op']} | {r['case']} | {r['points']} | {r['median_ms']:.2f} | "
                     f"{r['peak_memory_mib']:.0f} |")
    sources = sorted({m["size_source"] for m in record["models"] if m.get("size_source")})
    lines += ["", f"Device {record['device']}; torch {env.get('torch')}, commit {env.get('git_commit')}, "
              f"{env.get('time')}. Median of {record['repeats']} timed calls after {record['warmup']} warm-ups; one "
              "fresh process per model. train = autocast forward + cross-entropy + backward + AdamW step (fp16 with "
              "a GradScaler); infer = eval + no_grad. Peak memory: "
              + ("the worker's peak RSS (CPU smoke run)." if record["device"] == "cpu (smoke)"
                 else "torch.cuda.max_memory_allocated per row."),
              "", "Sizes from: " + "; ".join(sources) + ".",
              "", "[1] " + "; ".join(f"{k}: {v['source']}" for k, v in PUBLISHED.items())
              + ". Measured on other hardware: shown beside ours, never divided by (no ratio across runs)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point: one worker process per model, one for the ops; writes gpu.json and gpu.md."""
    p = argparse.ArgumentParser(prog="bm_gpu", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, same outputs (the test)")
    p.add_argument("--only", default="", help="comma-separated model configs (default: every *_cls / *_seg)")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated subset of fp32,bf16,fp16")
    p.add_argument("--no-ops", action="store_true", help="leave out the op rows")
    p.add_argument("--out", type=Path, default=Path("bench_out/gpu"), help="folder for gpu.json / gpu.md")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per row (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per worker before it is reported as failed")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--points", type=int, help=argparse.SUPPRESS)
    p.add_argument("--ops", action="store_true", help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.worker:
        if ns.smoke:
            import torch  # noqa: PLC0415

            torch.set_num_threads(1)
        print(json.dumps(op_worker(ns) if ns.ops else model_worker(ns)), flush=True)
        return 0
    import torch  # noqa: PLC0415

    if not ns.smoke and not torch.cuda.is_available():
        raise SystemExit("bm_gpu: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine, "
                         "or pass --smoke for the CPU check of the outputs")
    if ns.smoke:
        ns.device, ns.repeats, ns.warmup = "cpu", min(ns.repeats, 1), min(ns.warmup, 1)
    bad = set(ns.precisions.split(",")) - set(PRECISIONS)
    if bad:
        raise SystemExit(f"--precisions names unknown precisions {sorted(bad)}; use a subset of {list(PRECISIONS)}")
    configs = model_configs()
    only = {s.strip() for s in ns.only.split(",") if s.strip()}
    if only - set(configs):
        raise SystemExit(f"--only names unknown configs {sorted(only - set(configs))}; known: {configs}")
    from benchmarks.harness import environment  # noqa: PLC0415

    record: dict[str, Any] = {"title": "gpu", "device": device_name(ns.smoke), "environment": environment(),
                              "smoke": ns.smoke, "precisions": ns.precisions.split(","), "repeats": ns.repeats, "warmup": ns.warmup,
                              "published": PUBLISHED, "models": [], "ops": [], "complete": False}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if ns.smoke:  # one thread: the smoke run checks the outputs, and shares the machine with the test suite
        env["OMP_NUM_THREADS"] = "1"

    def write() -> None:
        ns.out.mkdir(parents=True, exist_ok=True)
        write_text(ns.out / "gpu.json", json.dumps(record, indent=2))
        write_text(ns.out / "gpu.md", markdown(record))

    for config in [c for c in configs if not only or c in only]:
        task = "cls" if config.endswith("_cls") else "seg"
        batch, points, source = paper_size(config)
        if ns.smoke:
            batch, points = SMOKE_SIZES[task]
            source = f"--smoke: {batch} x {points} (paper size {source})"
        entry: dict[str, Any] = {"config": config, "task": task, "batch": batch, "points_per_cloud": points,
                                 "size_source": source}
        if config in SKIP and not ns.smoke:
            entry["error"] = f"skipped: {SKIP[config]}"
        else:
            result, error = run_json_worker(_worker_cmd(ns, "--config", config, "--batch", str(batch), "--points",
                                                        str(points)), env, ns.timeout)
            entry.update(result or {"error": error})
        record["models"].append(entry)
        print(f"{config:<22} {batch} x {points}: " + (entry.get("error") or ", ".join(
            f"{r['precision']} {r['mode']} {r.get('samples_per_s', float('nan')):.4g}/s" for r in entry["rows"])),
            flush=True)
        write()  # partial results survive an interrupted run
    if not ns.no_ops:
        result, error = run_json_worker(_worker_cmd(ns, "--ops"), env, ns.timeout)
        record["ops"] = result["rows"] if result else [{"op": "all", "case": "-", "error": error}]
    record["complete"] = True
    write()
    print(markdown(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
