"""Classification training speed of pcbench against the community implementations, side by side in one run.

Usage::

    python -m benchmarks.bm_train_peers --community-dir DIR [--threads 1,2] [--malloc both] [--rounds 3]

``DIR`` holds checkouts of the peer repositories under their own names (only their Python files are needed)::

    DIR/Pointnet_Pointnet2_pytorch   github.com/yanx27/Pointnet_Pointnet2_pytorch (models/pointnet2_cls_ssg.py)
    DIR/PCT_Pytorch                  github.com/Strawberry-Eat-Mango/PCT_Pytorch (model.py, util.py)

One training step (zero_grad, forward, cross-entropy / NLL loss, backward, Adam step) on the same object batch
(``16 x 1024`` by default, unit normals as features where the peer model takes them) is timed for ours and
theirs, each in a fresh worker process with the same thread count and allocator setting (glibc default and the
tuned setting of ``benchmarks.harness.TUNED_MALLOC``). Rows of ours and theirs are interleaved and the order
alternates every round, so a change in machine load hits both sides alike; the table gives the median over the
rounds of samples/s, of the CPU time per step (all threads of the worker) and of the per-round ratio
ours / theirs. Writes ``train_peers.json`` and ``train_peers.md`` under ``--out`` (rewritten after every row).

PCT_Pytorch samples centres with ``pointnet2_ops.furthest_point_sample``, a CUDA extension; on CPU the worker
gives it a stand-in written in plain torch (the same sequential rule, starting at each cloud's first point).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.harness import TUNED_MALLOC, run_json_worker
from pcbench.io import write_text

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Pair:
    """One comparison: our model config against a community model file."""

    config: str  # conf/model/<config>.yaml
    in_channels: int  # feature channels besides xyz, the same on both sides
    repo: str  # GitHub owner/name of the community code
    folder: str  # its checkout under --community-dir
    file: str  # the model file inside the checkout


PAIRS = {
    "pointnet2_ssg_cls": Pair("pointnet2_ssg_cls", 3, "yanx27/Pointnet_Pointnet2_pytorch",
                              "Pointnet_Pointnet2_pytorch", "models/pointnet2_cls_ssg.py"),
    "pct_cls": Pair("pct_cls", 0, "Strawberry-Eat-Mango/PCT_Pytorch", "PCT_Pytorch", "model.py"),
}
NUM_CLASSES = 40


def peer_missing(pair: Pair, community_dir: Path | None) -> str | None:
    """Why the community side of ``pair`` cannot run (None when its model file is there)."""
    if community_dir is None:
        return f"unavailable: pass --community-dir <checkout of {pair.repo} as DIR/{pair.folder}>"
    path = Path(community_dir) / pair.folder / pair.file
    if not path.is_file():
        return f"unavailable: {path} not found; check out {pair.repo} as {Path(community_dir) / pair.folder}"
    return None


# ------------------------------------------------------------------------------------------------ worker
def furthest_point_sample(xyz, npoint: int):  # noqa: ANN001, ANN201 - signature of pointnet2_ops
    """Plain-torch stand-in for ``pointnet2_ops.pointnet2_utils.furthest_point_sample``: ``[B, N, 3]`` ->
    int32 ``[B, npoint]``, starting at index 0, each next index maximising the min squared distance."""
    import torch  # noqa: PLC0415

    b, n, _ = xyz.shape
    out = torch.zeros(b, npoint, dtype=torch.long, device=xyz.device)
    mind = torch.full((b, n), float("inf"), dtype=xyz.dtype, device=xyz.device)
    rows = torch.arange(b, device=xyz.device)
    cur = torch.zeros(b, dtype=torch.long, device=xyz.device)
    for i in range(npoint):
        out[:, i] = cur
        d = ((xyz - xyz[rows, cur].unsqueeze(1)) ** 2).sum(-1)
        mind = torch.minimum(mind, d)
        cur = mind.argmax(1)
    return out.int()


def _install_pointnet2_ops_stand_in() -> None:
    utils = types.ModuleType("pointnet2_ops.pointnet2_utils")
    utils.furthest_point_sample = furthest_point_sample
    pkg = types.ModuleType("pointnet2_ops")
    pkg.pointnet2_utils = utils
    sys.modules["pointnet2_ops"], sys.modules["pointnet2_ops.pointnet2_utils"] = pkg, utils


def _import_file(path: Path, name: str) -> types.ModuleType:
    """Import a community model file with its folder first on sys.path (its sibling imports are flat)."""
    import importlib  # noqa: PLC0415

    sys.path.insert(0, str(path.parent))
    return importlib.import_module(name)


def _community_model(pair: Pair, community_dir: Path):  # noqa: ANN202 - (nn.Module, loss name)
    path = community_dir / pair.folder / pair.file
    if pair.config == "pointnet2_ssg_cls":
        mod = _import_file(path, "pointnet2_cls_ssg")
        return mod.get_model(NUM_CLASSES, normal_channel=pair.in_channels > 0), "nll"
    if pair.config == "pct_cls":
        _install_pointnet2_ops_stand_in()
        mod = _import_file(path, "model")
        return mod.Pct(types.SimpleNamespace(dropout=0.5), output_channels=NUM_CLASSES), "ce"
    raise ValueError(f"no community builder for {pair.config!r}; known: {sorted(PAIRS)}")


def worker(ns: argparse.Namespace) -> dict[str, object]:
    """Time training steps of one side (``ns.impl`` = ours | community) of one pair in this process."""
    import torch  # noqa: PLC0415 - the driver never imports torch
    import torch.nn.functional as F  # noqa: PLC0415

    from pcbench.ops import PointBatch  # noqa: PLC0415
    from pcbench.testing.clouds import object_batch  # noqa: PLC0415

    torch.set_num_threads(ns.threads)
    pair = PAIRS[ns.config]
    coord, offset = object_batch(ns.batch, ns.points)
    g = torch.Generator().manual_seed(0)
    normals = F.normalize(torch.randn(coord.shape[0], 3, generator=g), dim=1)[:, : pair.in_channels]
    labels = torch.randint(0, NUM_CLASSES, (ns.batch,), generator=g)
    torch.manual_seed(0)
    if ns.impl == "ours":
        from omegaconf import OmegaConf  # noqa: PLC0415

        from pcbench.models import build_model  # noqa: PLC0415

        model = build_model(OmegaConf.load(REPO / "conf" / "model" / f"{pair.config}.yaml"), pair.in_channels,
                            NUM_CLASSES)
        inputs, loss_kind = PointBatch(coord, normals, offset), "ce"
    else:
        model, loss_kind = _community_model(pair, Path(ns.community_dir))
        # channels-first [B, 3 + C, N], the layout of the community data loaders
        inputs = torch.cat([coord, normals], 1).view(ns.batch, ns.points, -1).transpose(1, 2).contiguous()
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    params = sum(p.numel() for p in model.parameters())

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(inputs)
        out = out[0] if isinstance(out, tuple) else out  # yanx27 returns (log-probabilities, features)
        loss = F.nll_loss(out, labels) if loss_kind == "nll" else F.cross_entropy(out, labels)
        loss.backward()
        opt.step()

    for _ in range(ns.warmup):
        step()
    times, cpu = [], []
    load = [os.getloadavg()[0]]
    for _ in range(ns.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    load.append(os.getloadavg()[0])
    med = statistics.median(times)
    return {"median_ms": med, "median_cpu_ms": statistics.median(cpu), "samples_per_s": ns.batch / (med / 1e3),
            "times_ms": times, "cpu_ms": cpu, "params": params, "threads": torch.get_num_threads(),
            "loadavg_1min": load}


# ------------------------------------------------------------------------------------------------ driver
def _run_worker(pair: Pair, impl: str, malloc: str, threads: int, ns: argparse.Namespace) -> dict[str, object]:
    row: dict[str, object] = {"config": pair.config, "impl": impl, "malloc": malloc, "threads": threads}
    if impl == "community":
        missing = peer_missing(pair, ns.community_dir)
        if missing:
            row["error"] = missing
            return row
    env = {k: v for k, v in os.environ.items() if k not in TUNED_MALLOC}
    if malloc == "tuned":
        env.update(TUNED_MALLOC)
    env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "benchmarks.bm_train_peers", "--worker", "--config", pair.config, "--impl", impl,
           "--threads", str(threads), "--batch", str(ns.batch), "--points", str(ns.points),
           "--repeats", str(ns.repeats), "--warmup", str(ns.warmup)]
    if ns.community_dir is not None:
        cmd += ["--community-dir", str(Path(ns.community_dir).resolve())]
    result, error = run_json_worker(cmd, env, ns.timeout)
    if error is not None:
        # a community model that cannot run here is a missing peer, ours failing is a failure
        row["error"] = f"unavailable: {error}" if impl == "community" and "timeout" not in error else f"failed: {error}"
        return row
    row.update(result)
    return row


def summarise(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """One line per (config, malloc, threads): medians over rounds of each side and of the paired ratios."""
    out = []
    keys = sorted({(r["config"], r["malloc"], r["threads"]) for r in rows}, key=str)
    for config, malloc, threads in keys:
        sel = [r for r in rows if (r["config"], r["malloc"], r["threads"]) == (config, malloc, threads)]
        line: dict[str, object] = {"config": config, "malloc": malloc, "threads": threads}
        by_round: dict[str, dict[int, dict[str, object]]] = {"ours": {}, "community": {}}
        for r in sel:
            by_round[r["impl"]][r["round"]] = r
        for impl, runs in by_round.items():
            ok = [r for r in runs.values() if not r.get("error")]
            if ok:
                line[impl] = {"samples_per_s": statistics.median(r["samples_per_s"] for r in ok),
                              "cpu_ms": statistics.median(r["median_cpu_ms"] for r in ok),
                              "params": ok[0]["params"], "rounds": len(ok)}
            elif runs:
                line[impl] = {"error": next(iter(runs.values()))["error"]}
        paired = [(by_round["ours"][k], by_round["community"][k]) for k in by_round["ours"]
                  if k in by_round["community"] and not by_round["ours"][k].get("error")
                  and not by_round["community"][k].get("error")]
        if paired:
            line["ratio"] = statistics.median(a["samples_per_s"] / b["samples_per_s"] for a, b in paired)
            line["cpu_ratio"] = statistics.median(b["median_cpu_ms"] / a["median_cpu_ms"] for a, b in paired)
        loads = [x for r in sel if not r.get("error") for x in r["loadavg_1min"]]
        line["load"] = [min(loads), max(loads)] if loads else None
        out.append(line)
    return out


def markdown(rows: list[dict[str, object]], env: dict[str, object], ns: argparse.Namespace) -> str:
    """The summary as a Markdown table (ratios only from rounds where both sides ran)."""
    lines = ["## training speed against the community implementations", "",
             "| model | malloc | threads | ours samples/s | ours CPU ms / step | community samples/s | "
             "community CPU ms / step | ours / community (wall) | ours / community (CPU time) | load avg |",
             "|---|---|---:|---:|---:|---|---|---:|---:|---|"]
    for s in summarise(rows):
        ours, theirs = s.get("ours", {}), s.get("community", {})
        o_sps = f"{ours['samples_per_s']:.2f}" if "samples_per_s" in ours else ours.get("error", "-")
        o_cpu = f"{ours['cpu_ms']:.0f}" if "cpu_ms" in ours else "-"
        t_sps = f"{theirs['samples_per_s']:.2f}" if "samples_per_s" in theirs else theirs.get("error", "-")
        t_cpu = f"{theirs['cpu_ms']:.0f}" if "cpu_ms" in theirs else "-"
        ratio = f"{s['ratio']:.2f}x" if "ratio" in s else "-"
        cpu_ratio = f"{s['cpu_ratio']:.2f}x" if "cpu_ratio" in s else "-"
        load = f"{s['load'][0]:.1f}-{s['load'][1]:.1f}" if s.get("load") else "-"
        lines.append(f"| {s['config']} | {s['malloc']} | {s['threads']} | {o_sps} | {o_cpu} | {t_sps} | {t_cpu} | "
                     f"{ratio} | {cpu_ratio} | {load} |")
    peers = ", ".join(f"{p.config}: {p.repo} {p.file}" for p in PAIRS.values())
    lines += ["", f"{ns.batch} x {ns.points} points, one training step = zero_grad + forward + loss + backward + "
              f"Adam step; median of {ns.repeats} steps after {ns.warmup} warm-ups per worker, one fresh process "
              f"per row, ours and theirs interleaved, median over {ns.rounds} rounds. CPU ms = process CPU time per "
              "step (all threads); the CPU-time ratio is community CPU / ours CPU. 'tuned' malloc = "
              + " ".join(f"{k}={v}" for k, v in TUNED_MALLOC.items()) + f". Peers: {peers}. "
              f"torch {env.get('torch')}, {env.get('cpu_count')} CPUs, commit {env.get('git_commit')}, "
              f"{env.get('time')}."]
    return "\n".join(lines) + "\n"


def _write(ns: argparse.Namespace, rows: list[dict[str, object]], final: bool = False) -> str:
    from benchmarks.harness import environment  # noqa: PLC0415 - imports torch; only the table needs it

    env = environment()
    ns.out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, env, ns)
    record = {"title": "train_peers", "environment": env, "batch": ns.batch, "points": ns.points,
              "repeats": ns.repeats, "warmup": ns.warmup, "rounds": ns.rounds, "complete": final, "rows": rows,
              "summary": summarise(rows)}
    for name, body in (("train_peers.json", json.dumps(record, indent=2)), ("train_peers.md", text)):
        write_text(ns.out / name, body)
    return text


def _schedule(ns: argparse.Namespace, configs: list[str], mallocs: list[str],
              threads: list[int]) -> list[tuple[int, str, str, int, str]]:
    """(round, config, malloc, threads, impl) in run order: ours and theirs adjacent, order alternating."""
    runs = []
    keys = [(config, malloc, t) for config in configs for malloc in mallocs for t in threads]
    for rnd in range(ns.rounds):
        for j, (config, malloc, t) in enumerate(keys):
            sides = ("ours", "community") if (rnd + j) % 2 == 0 else ("community", "ours")
            runs += [(rnd, config, malloc, t, impl) for impl in sides]
    return runs


def main(argv: list[str] | None = None, log: Callable[[str], None] = print) -> int:
    """Entry point: run every (round, model, allocator, threads, side) in its own worker process."""
    p = argparse.ArgumentParser(prog="bm_train_peers", description=__doc__.splitlines()[0])
    p.add_argument("--community-dir", type=Path, default=None,
                   help="folder holding Pointnet_Pointnet2_pytorch/ and PCT_Pytorch/ checkouts")
    p.add_argument("--only", default="", help=f"comma-separated models (default: all of {sorted(PAIRS)})")
    p.add_argument("--out", type=Path, default=Path("bench_out/train_peers"), help="folder for the json / md")
    p.add_argument("--batch", type=int, default=16, help="clouds per batch")
    p.add_argument("--points", type=int, default=1024, help="points per cloud")
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts, e.g. 1,2")
    p.add_argument("--malloc", choices=("tuned", "default", "both"), default="both", help="glibc allocator setting")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians over rounds reported)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per worker (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per worker")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per worker before it is reported as failed")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=("ours", "community"), help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.worker:
        ns.threads = int(ns.threads)
        print(json.dumps(worker(ns)), flush=True)
        return 0
    for name in ("batch", "points", "rounds", "repeats"):
        if getattr(ns, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(ns, name)}")
    only = [s.strip() for s in ns.only.split(",") if s.strip()] or list(PAIRS)
    unknown = sorted(set(only) - set(PAIRS))
    if unknown:
        p.error(f"--only names unknown models {unknown}; known: {sorted(PAIRS)}")
    try:
        threads = [int(t) for t in ns.threads.split(",") if t.strip()]
    except ValueError:
        p.error(f"--threads must be comma-separated integers such as 1,2, got {ns.threads!r}")
    mallocs = ["default", "tuned"] if ns.malloc == "both" else [ns.malloc]
    rows: list[dict[str, object]] = []
    schedule = _schedule(ns, only, mallocs, threads)
    for i, (rnd, config, malloc, t, impl) in enumerate(schedule, 1):
        row = _run_worker(PAIRS[config], impl, malloc, t, ns)
        row["round"] = rnd
        rows.append(row)
        res = row["error"] if row.get("error") else (f"{row['samples_per_s']:.2f} samples/s, "
                                                     f"{row['median_cpu_ms']:.0f} CPU ms/step")
        log(f"[{i}/{len(schedule)}] round {rnd} {config:<18} {malloc:<7} {t} thr {impl:<9} {res}")
        _write(ns, rows)  # partial results survive an interrupted run
    log("\n" + _write(ns, rows, final=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
