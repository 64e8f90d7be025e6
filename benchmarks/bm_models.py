"""Speed and memory of every model config (``conf/model/*_{cls,seg}.yaml``), each measurement in a fresh process.

Usage: ``python -m benchmarks.bm_models [--quick] [--only ptv1_cls,pct_cls] [--malloc both] [--compile]``.
For every config and case (object batch 16 x 1024 for classifiers, 16 x 4096 and the real ScanNet scene for
segmentation, batch-1 latency) and mode (``fwd``: eval + no_grad; ``fwd+bwd``: train mode, cross-entropy,
backward) a worker subprocess builds the model with ``pcbench.models.build_model(cfg, in_channels=3,
num_classes=...)``, runs 2 warm-up calls and the timed calls (median reported), and records the peak RSS of its
first call. Each worker runs under the glibc default allocator and/or the tuned setting (``harness.TUNED_MALLOC``).
Writes ``models.json`` and ``models.md`` under ``--out`` (rewritten after every row).

On a shared machine read samples/s next to the recorded CPU time and load average: when the cores are
oversubscribed, multi-threaded workers lose most of their time in OpenMP barriers (``--threads 1`` is then
the steadier measure).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from benchmarks.harness import TUNED_MALLOC, run_json_worker
from pcbench.io import write_text

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf" / "model"

# Rows left out on purpose, with the reason printed in the table.
SKIP: dict[tuple[str, str], str] = {
    ("pct_seg", "scene"): "global offset attention is O(n^2): ~1e13 FLOPs per forward on the 80k-point scene",
}


# ------------------------------------------------------------------------------------------------ worker
def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _inputs(case: str, task: str, quick: bool):
    """(PointBatch, labels, samples per call) for a case name like ``16x1024``, ``1x4096`` or ``scene``."""
    import torch  # noqa: PLC0415 - the parent process never imports torch

    from pcbench.ops import PointBatch, voxelize  # noqa: PLC0415
    from pcbench.testing.clouds import load_scannet_scene, object_batch, shared_data_dir  # noqa: PLC0415

    g = torch.Generator().manual_seed(0)
    if case == "scene":
        root = shared_data_dir()
        if root is None:
            raise FileNotFoundError("shared sample data not found (set PCBENCH_SHARED_DATA)")
        coord, color = load_scannet_scene(root / "scannet/scans/scene0000_00/scene0000_00_vh_clean_2.ply")
        _, inverse, counts = voxelize(coord, 0.02)  # 2 cm grid, first point per voxel
        first = torch.full((counts.numel(),), coord.shape[0], dtype=torch.long).scatter_reduce(
            0, inverse, torch.arange(coord.shape[0]), "amin")
        coord, feat = coord[first], color[first].float() / 255.0
        if quick:
            coord, feat = coord[:20000], feat[:20000]
        batch = PointBatch(coord, feat, torch.tensor([coord.shape[0]]))
        samples = 1
    else:
        b, n = (int(v) for v in case.split("x"))
        coord, offset = object_batch(b, n)
        feat = torch.nn.functional.normalize(torch.randn(coord.shape[0], 3, generator=g), dim=1)
        batch = PointBatch(coord, feat, offset)
        samples = b
    n_cls = 40 if task == "cls" else 20
    rows = batch.num_clouds if task == "cls" else batch.num_points
    labels = torch.randint(0, n_cls, (rows,), generator=g)
    return batch, labels, samples, n_cls


def worker(args: argparse.Namespace) -> dict[str, object]:
    """Measure one (config, case, mode) in this process; returns the result row."""
    import torch  # noqa: PLC0415
    from omegaconf import OmegaConf  # noqa: PLC0415

    from pcbench.models import build_model, model_task  # noqa: PLC0415
    from pcbench.ops._dispatch import dispatch_kind  # noqa: PLC0415
    from pcbench.train.config import compiled_tracing  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    path = CONF / f"{args.config}.yaml"
    cfg = OmegaConf.load(path)
    task = model_task(cfg)
    batch, labels, samples, n_cls = _inputs(args.case, task, args.quick)
    torch.manual_seed(0)
    model = build_model(cfg, in_channels=3, num_classes=n_cls)
    params = sum(p.numel() for p in model.parameters())
    call = _step_fn(model, args.mode, batch, labels)
    extra: dict[str, object] = {}
    if getattr(args, "census", False):
        extra = _graph_census(model, args.mode, batch)
        torch._dynamo.reset()
        call = _step_fn(model, args.mode, batch, labels)
    if args.compile:
        # eager, then inductor-compiled, in this process: the speed-up is a ratio of two measurements taken side
        # by side, never against another run.
        eager_ms = _timed(call, args.warmup, args.repeats)[0]
        # as trainer.compile=true (inductor) with trainer.compile_dynamic
        dynamic = {"auto": None, "true": True, "false": False}[args.compile_dynamic]
        compiled = _step_fn(torch.compile(model, dynamic=dynamic), args.mode, batch, labels)

        def call() -> None:  # traced as the trainer's compiled forward is
            with compiled_tracing():
                compiled()
        extra["eager_median_ms"] = statistics.median(eager_ms)
        extra["eager_samples_per_s"] = samples / (extra["eager_median_ms"] / 1e3)

    rss_before = _rss_mib()
    t0 = time.perf_counter()
    call()
    first_ms = (time.perf_counter() - t0) * 1e3  # with --compile: dynamo tracing + inductor code generation
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    load_before = os.getloadavg()[0]
    times, cpu = _timed(call, args.warmup - 1, args.repeats)
    med = statistics.median(times)
    if args.compile:
        extra["speedup"] = extra["eager_median_ms"] / med
    return {"config": args.config, "case": args.case, "mode": args.mode, "params": params,
            "points": batch.num_points, "samples_per_call": samples, "median_ms": med,
            "samples_per_s": samples / (med / 1e3), "times_ms": times, "first_call_ms": first_ms,
            "peak_rss_mib": peak, "first_call_rss_increase_mib": peak - rss_before,
            "compiled": bool(args.compile), "threads": torch.get_num_threads(),
            "compile_dynamic": args.compile_dynamic if args.compile else None,
            # the ops' code path: PCBENCH_DISPATCH=cuda runs the GPU branches on this CPU (pcbench/ops/_dispatch.py)
            "dispatch": dispatch_kind(),
            # CPU time of this process per call and the machine's load: wall-clock figures from a shared,
            # oversubscribed machine are only interpretable next to them.
            "median_cpu_ms": statistics.median(cpu), "loadavg_1min": [load_before, os.getloadavg()[0]], **extra}


def _step_fn(model, mode: str, batch, labels) -> Callable[[], None]:
    """One benchmark call: ``fwd`` = eval + no_grad forward; ``fwd+bwd`` = train mode, cross-entropy, backward."""
    import torch  # noqa: PLC0415

    if mode == "fwd":
        model.eval()

        def call() -> None:
            with torch.no_grad():
                model(batch)
    else:
        model.train()

        def call() -> None:
            model.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(batch), labels).backward()
    return call


def _timed(call: Callable[[], None], warmup: int, repeats: int) -> tuple[list[float], list[float]]:
    """(wall ms, process CPU ms) of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(max(0, warmup)):
        call()
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return times, cpu


def _graph_census(model, mode: str, batch) -> dict[str, object]:
    """Dynamo's view of one forward (``torch._dynamo.explain``): graphs, graph breaks and their reasons, grouped
    by reason and source line (most frequent first). A host sync (``.item()``, a data-dependent shape) is the
    usual break: each one splits the forward, and a single graph is what CUDA graphs need."""
    import torch  # noqa: PLC0415

    torch._dynamo.reset()
    model.train(mode != "fwd")
    with torch.no_grad() if mode == "fwd" else contextlib.nullcontext():
        ex = torch._dynamo.explain(model)(batch)
    reasons: Counter[str] = Counter()
    for br in ex.break_reasons:
        frame = br.user_stack[-1] if br.user_stack else None
        where = f" at {Path(frame.filename).name}:{frame.lineno}" if frame is not None else ""
        reasons[f"{str(br.reason).strip().splitlines()[0][:160]}{where}"] += 1
    return {"graph_count": ex.graph_count, "graph_break_count": ex.graph_break_count,
            "ops_in_graphs": sum(len(ops) for ops in ex.ops_per_graph or []),
            "break_reasons": [{"reason": r, "count": n} for r, n in reasons.most_common()]}


# ------------------------------------------------------------------------------------------------ driver
def _cases(config: str, quick: bool) -> list[tuple[str, str]]:
    if config.endswith("_cls"):
        big = "4x1024" if quick else "16x1024"
        return [(big, "fwd"), (big, "fwd+bwd"), ("1x1024", "fwd")]
    big = "4x4096" if quick else "16x4096"
    return [(big, "fwd"), (big, "fwd+bwd"), ("scene", "fwd"), ("scene", "fwd+bwd"), ("1x4096", "fwd")]


def _run_worker(config: str, case: str, mode: str, malloc: str, ns: argparse.Namespace,
                compile_: bool = False, census: bool = False) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k not in TUNED_MALLOC}
    if malloc == "tuned":
        env.update(TUNED_MALLOC)
    env.setdefault("OMP_NUM_THREADS", str(ns.threads))
    cmd = [sys.executable, "-m", "benchmarks.bm_models", "--worker", "--config", config, "--case", case,
           "--mode", mode, "--threads", str(ns.threads), "--repeats", str(ns.repeats), "--warmup", str(ns.warmup)]
    if ns.quick:
        cmd.append("--quick")
    if compile_:
        cmd += ["--compile", "--compile-dynamic", ns.compile_dynamic]
    if census:
        cmd.append("--census")
    row: dict[str, object] = {"config": config, "case": case, "mode": mode, "malloc": malloc,
                              "compiled": compile_}
    result, error = run_json_worker(cmd, env, ns.timeout)
    if error is not None:
        row["error"] = error
        return row
    row.update(result)
    row["malloc"] = malloc
    return row


def markdown(rows: list[dict[str, object]], env: dict[str, object]) -> str:
    """Result rows as a Markdown table (pcbench only: no peer runs here, so no ratio column)."""
    lines = ["## models", "",
             "| model | case | mode | malloc | params | samples/s | median ms | CPU ms / call | load avg | "
             "peak RSS MiB (first call) |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = r["config"] + (" (compiled)" if r.get("compiled") else "")
        if r.get("error"):
            err = str(r["error"])
            msg = err if err.startswith("skipped") else f"failed: {err}"
            lines.append(f"| {name} | {r['case']} | {r['mode']} | {r['malloc']} | - | {msg} | - | - | - | - |")
            continue
        lines.append(f"| {name} | {r['case']} ({r['points']} pts) | {r['mode']} | {r['malloc']} | "
                     f"{r['params'] / 1e6:.2f}M | {r['samples_per_s']:.2f} | {r['median_ms']:.1f} | "
                     f"{r['median_cpu_ms']:.0f} | {max(r['loadavg_1min']):.1f} | {r['peak_rss_mib']:.0f} |")
    lines += compile_table(rows)
    lines += ["", f"torch {env.get('torch')}, {env.get('threads_per_worker')} threads per worker, "
              f"{env.get('cpu_count')} CPUs, commit {env.get('git_commit')}, {env.get('time')}. "
              "Median of the timed calls after 2 warm-ups; one fresh process per row; fwd = eval + no_grad; "
              "fwd+bwd = train mode + cross-entropy + backward. 'tuned' malloc = MALLOC_MMAP_THRESHOLD_="
              f"{TUNED_MALLOC['MALLOC_MMAP_THRESHOLD_']} MALLOC_TRIM_THRESHOLD_={TUNED_MALLOC['MALLOC_TRIM_THRESHOLD_']}."]
    return "\n".join(lines) + "\n"


def compile_table(rows: list[dict[str, object]]) -> list[str]:
    """Markdown lines of the --compile results (none without it): dynamo's graphs and breaks per model (from the
    eager row's census), compile time, and eager vs compiled samples/s measured in the same worker process."""
    census = [r for r in rows if "graph_count" in r]
    if not census:
        return []
    compiled = {(r["config"], r["case"], r["mode"], r["malloc"]): r for r in rows if r.get("compiled")}
    paths = ", ".join(sorted({str(r.get("dispatch", "device")) for r in census}))
    dynamic = ", ".join(sorted({str(c["compile_dynamic"]) for c in compiled.values() if c.get("compile_dynamic")}))
    lines = ["", "### torch.compile (inductor)", "",
             f"Ops' code path: {paths} (`PCBENCH_DISPATCH`; `device` = the tensors' own, `cuda` = the GPU branches "
             f"run on this CPU); torch.compile dynamic: {dynamic or '-'} (`--compile-dynamic`).", "",
             "| model | case | mode | single graph | graphs | graph breaks | break reasons (count) | first compiled "
             "call s | eager samples/s | compiled samples/s | compiled / eager |",
             "|---|---|---|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in census:
        reasons = "; ".join(f"{b['reason']} ({b['count']})" for b in r["break_reasons"]).replace("|", "\\|")
        single = "yes" if r["graph_count"] == 1 and r["graph_break_count"] == 0 else "no"
        c = compiled.get((r["config"], r["case"], r["mode"], r["malloc"]))
        if c is None:
            speed = f"not run | {r['samples_per_s']:.2f} | - | -"  # eager: the census row's own timed calls
        elif c.get("error"):
            speed = f"failed: {c['error']} | - | - | -"
        else:
            speed = (f"{c['first_call_ms'] / 1e3:.1f} | {c['eager_samples_per_s']:.2f} | {c['samples_per_s']:.2f} | "
                     f"{c['speedup']:.2f}x")
        lines.append(f"| {r['config']} | {r['case']} | {r['mode']} | {single} | {r['graph_count']} | "
                     f"{r['graph_break_count']} | {reasons or '-'} | {speed} |")
    lines += ["", "Graphs and breaks: `torch._dynamo.explain` of one forward (train mode for fwd+bwd; AOTAutograd "
              "compiles a backward per forward graph). The first compiled call includes dynamo tracing and inductor "
              "code generation. Eager and compiled samples/s come from the same worker process, one after the "
              "other."]
    return lines


def _write(ns: argparse.Namespace, rows: list[dict[str, object]], final: bool = False) -> None:
    from benchmarks.harness import environment  # noqa: PLC0415 - imports torch; only the driver needs it here

    env = environment()
    env["threads_per_worker"] = ns.threads
    ns.out.mkdir(parents=True, exist_ok=True)
    record = {"title": "models", "environment": env, "repeats": ns.repeats, "warmup": ns.warmup,
              "complete": final, "rows": rows}
    for name, text in (("models.json", json.dumps(record, indent=2)), ("models.md", markdown(rows, env))):
        write_text(ns.out / name, text)
    if final:
        print()
        print(markdown(rows, env))


def _summary(row: dict[str, object]) -> str:
    if row.get("error"):
        return f"failed: {row['error']}"
    return f"{row['samples_per_s']:.2f} samples/s, {row['median_ms']:.1f} ms, peak {row['peak_rss_mib']:.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    """Entry point: run every (config, case, mode, allocator) in its own worker process."""
    p = argparse.ArgumentParser(prog="bm_models", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small batches, 20k-point scene, 2 repeats (smoke run)")
    p.add_argument("--only", default="", help="comma-separated config names (default: every *_cls / *_seg)")
    p.add_argument("--out", type=Path, default=Path("bench_out/models"), help="folder for models.json / .md")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per row (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before timing (the first gives peak RSS)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    p.add_argument("--malloc", choices=("tuned", "default", "both"), default="both", help="glibc allocator setting")
    p.add_argument("--modes", default="fwd,fwd+bwd", help="comma-separated modes to run")
    p.add_argument("--skip-scene", action="store_true", help="leave out the real ScanNet scene rows")
    p.add_argument("--compile", action="store_true", help="add torch.compile rows for the object-batch cases "
                   "(graph census, compile time, eager vs compiled in one process)")
    p.add_argument("--compile-dynamic", choices=("auto", "true", "false"), default="auto",
                   help="torch.compile's dynamic (as trainer.compile_dynamic: auto = null)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per worker before it is reported as failed")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--census", action="store_true", help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.worker:
        print(json.dumps(worker(ns)), flush=True)
        return 0
    if ns.quick:
        ns.repeats = min(ns.repeats, 2)
        ns.warmup = min(ns.warmup, 1)
    only = {s.strip() for s in ns.only.split(",") if s.strip()}
    configs = [c.stem for c in sorted(CONF.glob("*.yaml")) if c.stem.endswith(("_cls", "_seg"))]
    if only:
        unknown = only - set(configs)
        if unknown:
            raise SystemExit(f"--only names unknown configs {sorted(unknown)}; known: {configs}")
        configs = [c for c in configs if c in only]
    modes = {m.strip() for m in ns.modes.split(",")}
    mallocs = ["default", "tuned"] if ns.malloc == "both" else [ns.malloc]
    rows = []
    jobs: list[tuple[str, str, str, str, bool]] = []  # (config, case, mode, malloc, compiled)
    for config in configs:
        for case, mode in _cases(config, ns.quick):
            if mode not in modes or (ns.skip_scene and case == "scene"):
                continue
            if (config, case) in SKIP:
                rows.append({"config": config, "case": case, "mode": mode, "malloc": "-", "compiled": False,
                             "error": f"skipped: {SKIP[(config, case)]}"})
                continue
            jobs += [(config, case, mode, malloc, False) for malloc in mallocs]
    # --compile: the object-batch rows again under torch.compile, after every eager row (whose graph census,
    # cheap next to inductor's code generation, is then in the table even if a compile runs out of time)
    jobs += [(c, case, mode, m, True) for c, case, mode, m, _ in jobs
             if ns.compile and case != "scene" and not case.startswith("1x")]
    for config, case, mode, malloc, compiled in jobs:
        census = ns.compile and not compiled and case != "scene" and not case.startswith("1x")
        row = _run_worker(config, case, mode, malloc, ns, compile_=compiled, census=census)
        rows.append(row)
        print(f"{config + (' (compiled)' if compiled else ''):<22} {case:<8} {mode:<8} {malloc:<8} "
              f"{_summary(row)}", flush=True)
        _write(ns, rows)  # partial results survive an interrupted run
    _write(ns, rows, final=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
