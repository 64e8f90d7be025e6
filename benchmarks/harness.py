"""Side-by-side timing of pcbench against peers: median of repeats after warm-up, ratio to the fastest peer.

Each benchmark module builds ``Case`` objects (one input, several implementations) and hands them to
``run_cases``, which writes a JSON record (with the environment, for provenance) and a Markdown table.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pcbench._malloc import TUNED_MALLOC
from pcbench.io import write_text

__all__ = [
    "TUNED_MALLOC", "Case", "Entry", "environment", "markdown_table", "optional_entry", "reexec_with_tuned_malloc",
    "run_cases", "run_json_worker", "time_fn",
]


def reexec_with_tuned_malloc(module: str, malloc: str) -> None:
    """Re-run ``python -m module`` once with TUNED_MALLOC set: glibc reads these variables at start-up only."""
    if malloc != "tuned" or all(os.environ.get(k) == v for k, v in TUNED_MALLOC.items()):
        return
    os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], {**os.environ, **TUNED_MALLOC})


@dataclass
class Entry:
    """One implementation to time: ``fn()`` runs the whole operation once on prepared inputs.

    ``unavailable`` holds why a peer cannot run on this machine (set by :func:`optional_entry`); such an
    entry is not timed but stays in the table as ``unavailable: <reason>``.
    """

    name: str
    fn: Callable[[], object]
    note: str = ""
    unavailable: str | None = None


@dataclass
class Case:
    """One input, timed under every entry; ``ours`` names the pcbench entry the ratios are computed for."""

    op: str
    case: str
    entries: list[Entry]
    ours: str = "pcbench"
    notes: dict[str, str] = field(default_factory=dict)


def optional_entry(name: str, build: Callable[[], Callable[[], object]], note: str = "") -> Entry:
    """An Entry whose peer may be missing or broken here: ``build()`` imports it and returns the timed callable.

    Any failure of ``build()`` (ImportError; OSError from a shared library that does not load, as open3d
    raises without libusb; anything else) gives an entry marked ``unavailable`` with the exception type
    and message, so the table says which peers a ratio was taken against instead of dropping one silently.
    """
    try:
        fn = build()
    except Exception as err:  # noqa: BLE001 - reported in the table, never dropped
        reason = f"{type(err).__name__}: {err}".splitlines()[0][:200]
        return Entry(name, _not_run, note, unavailable=reason)
    return Entry(name, fn, note)


def _not_run() -> object:
    raise RuntimeError("an unavailable peer is never timed")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], repeats: int = 5, warmup: int = 2) -> list[float]:
    """Wall-clock milliseconds of ``repeats`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def run_json_worker(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[dict | None, str | None]:
    """Run one benchmark worker process from the repository root: ``(result, None)`` with the JSON object of
    its last stdout line that starts with ``{``, or ``(None, reason)`` on a time-out, a non-zero exit or no
    such line (the reason ends with the last line of its stderr)."""
    try:
        out = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True,
                             text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timeout after {timeout} s"
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        err = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"exit {out.returncode}: {err[:200]}"
    return json.loads(lines[-1]), None


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict[str, object]:
    """What the numbers depend on: versions, threads, processor, allocator setting, commit."""
    return {
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    }


def run_cases(
    cases: Iterable[Case], out_dir: Path | str | None = None, repeats: int = 5, warmup: int = 2,
    title: str = "benchmark", verbose: bool = True,
) -> list[dict[str, object]]:
    """Time every entry of every case; write ``<title>.json`` and ``<title>.md`` under ``out_dir``."""
    rows: list[dict[str, object]] = []
    for case in cases:
        timed: dict[str, float] = {}
        errors: dict[str, str] = {}
        for entry in case.entries:
            if entry.unavailable is not None:
                errors[entry.name] = f"unavailable: {entry.unavailable}"
                continue
            try:
                ms = time_fn(entry.fn, repeats=repeats, warmup=warmup)
                timed[entry.name] = statistics.median(ms)
            except (RuntimeError, MemoryError, ValueError) as err:  # a peer that cannot run this size
                errors[entry.name] = f"{type(err).__name__}: {str(err)[:120]}"
        peers = {k: v for k, v in timed.items() if k != case.ours}
        best_peer = min(peers, key=peers.get) if peers else None
        for entry in case.entries:
            name = entry.name
            row: dict[str, object] = {"op": case.op, "case": case.case, "impl": name, "note": entry.note,
                                      "median_ms": timed.get(name), "error": errors.get(name)}
            if name in timed and best_peer is not None:
                row["ratio_to_fastest_peer"] = timed[name] / peers[best_peer]
                row["fastest_peer"] = best_peer
                row["peers_timed"] = sorted(peers)
                row["peers_unavailable"] = sorted(e.name for e in case.entries if e.unavailable is not None)
            rows.append(row)
            if verbose:
                t = f"{timed[name]:10.2f} ms" if name in timed else f"  failed: {errors.get(name)}"
                print(f"[{case.op}] {case.case:<34} {name:<22} {t}", flush=True)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        record = {"title": title, "environment": environment(), "repeats": repeats, "warmup": warmup,
                  "rows": rows}
        write_text(out / f"{title}.json", json.dumps(record, indent=2))
        write_text(out / f"{title}.md", markdown_table(rows, title))
    return rows


def markdown_table(rows: list[dict[str, object]], title: str = "benchmark") -> str:
    """Rows as a Markdown table: one line per (op, case, implementation), ratio to the fastest peer timed.

    Peers that are unavailable here keep their line (``unavailable: <reason>``), so a ratio taken without
    them shows as such.
    """
    lines = [f"## {title}", "", "| op | case | impl | median ms | ratio to fastest peer | note |",
             "|---|---|---|---:|---:|---|"]
    for r in rows:
        err = str(r.get("error"))
        ms = (f"{r['median_ms']:.2f}" if r.get("median_ms") is not None
              else err if err.startswith("unavailable: ") else f"failed ({err})")
        ratio = f"{r['ratio_to_fastest_peer']:.2f}x" if r.get("ratio_to_fastest_peer") is not None else "-"
        lines.append(f"| {r['op']} | {r['case']} | {r['impl']} | {ms} | {ratio} | {r.get('note') or ''} |")
    env = environment()
    lines += ["", f"torch {env['torch']}, {env['threads']} threads, {env['cpu_count']} CPUs, "
              f"cuda={env['cuda']}, commit {env['git_commit']}, {env['time']}"]
    return "\n".join(lines) + "\n"
