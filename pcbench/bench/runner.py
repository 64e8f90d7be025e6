"""The suite runner behind ``pcbench-bench``: prepare a suite's data, plan its cells, run each as one Hydra job.

Execution is Hydra's: :func:`cell_job` is the task function of a multirun over ``cell=<name>,...``, so the
configured launcher (``hydra/launcher``: basic in-process, ``parallel`` = joblib with a bounded number of jobs,
``slurm`` = submitit on a cluster) decides where and how many cells run at once. Each job:

1. takes its cell's trainer config as the plan composed it (``plan.json``; composed here only for a job
   started without a plan) and hashes its identity;
2. claims the cell in the store (:meth:`ResultStore.claim`, one transaction): a cell with a finished record is
   skipped (a killed suite resumes), one claimed by a live process (another runner) is skipped and named, the
   claim of a process that is gone is taken over; the claim is released when the cell ends. A job in a joblib
   worker dies with its runner (:func:`pcbench.bench.launchers.die_with_runner`);
3. records a ``running`` row (rows of earlier attempts whose process is gone are marked failed), runs
   ``pcbench.train.fit`` in ``<out>/bench/<suite>/<cell>/<hash12>/`` (``resume=true`` when a killed attempt
   left ``checkpoints/last.pt`` there), then the efficiency probe on the selected checkpoint, whose ``score``
   is the trainer's test evaluation under autocast / on the int8 model (the fp32 figure is fit's own final
   test, not evaluated again);
4. updates the row to ``finished`` with the trainer's typed result (:class:`pcbench.train.result.FitResult`,
   recorded by :func:`pcbench.bench.record.record_from_result`), the probe and provenance (``extra`` adds the
   cell's swept values as ``sweep`` and the machine's ``load_avg`` / ``cpu_count`` around the probe, which the
   report reads to draw sweep curves and to flag speeds measured on a loaded machine), or to ``failed``
   with the error and the path of ``cell.log`` (the cell's whole output and traceback), and returns: the
   suite goes on.

Progress lines (cell k/N, done/failed/left, elapsed, ETA) are counted from the store(s) against the plan the
runner wrote in the sweep folder (``plan.json``), so they are right whichever process or node runs a job.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from omegaconf import DictConfig, OmegaConf, open_dict

from pcbench.bench.launchers import die_with_runner
from pcbench.bench.record import config_sha256, host_info, now_iso, record_from_metrics, record_from_result
from pcbench.bench.report import HEADLINE, METRIC_NAMES
from pcbench.bench.store import ResultStore, process_alive, process_start
from pcbench.bench.suite import Cell, SuiteError, cell_config, cell_identity, check_sweep_keys, expand_suite
from pcbench.train.result import FitResult

__all__ = ["Plan", "Progress", "cell_job", "make_plan", "prepare_datasets", "published_checkpoint", "published_flag",
           "run_cell", "run_weights"]

PLAN_FILE = "plan.json"
JOB_STORE = "result.sqlite"  # with store_per_job: each job's own store in its folder, merged by the runner
_console_lock = threading.Lock()
_BAR: Any = None  # tqdm bar of an in-process (basic launcher) run on a terminal


def say(text: str, stream: TextIO | None = None) -> None:
    """Print one runner line on the console (through the progress bar when one is shown)."""
    with _console_lock:
        if _BAR is not None:
            _BAR.write(text)
        else:
            out = stream or sys.stdout
            print(text, file=out, flush=True)


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


# ------------------------------------------------------------------------------------------ data
def _prep_marker(root: Path) -> Path:
    return root.with_name(root.name + ".prep.json")


def _manifest_state(root: Path) -> tuple[str | None, str | None]:
    """(status, sha256) of ``root/manifest.json`` (None, None when absent or unreadable)."""
    import hashlib  # noqa: PLC0415

    path = root / "manifest.json"
    try:
        raw = path.read_bytes()
        return str(json.loads(raw).get("status", "complete")), hashlib.sha256(raw).hexdigest()
    except (OSError, ValueError):
        return None, None


def prepare_datasets(bench: DictConfig, cells: Sequence[Cell], workers: int = 1) -> dict[str, str]:
    """Make sure the prepared folder of every dataset the cells use exists; returns {dataset key: action}.

    A dataset with ``prep`` (``pcbench-prep`` arguments) is prepared into its ``root`` by the real preparer
    (``python -m data_prep.cli``: the command line, not an import) unless a previous run of the same command
    left it complete and untouched; its output goes to ``<root>.prep.log``. Without ``prep`` the folder must
    already hold a prepared dataset. SuiteError says what is missing and the command that makes it.
    """
    from pcbench.train.config import config_dir  # noqa: PLC0415

    actions: dict[str, str] = {}
    for key in dict.fromkeys(c.dataset for c in cells):
        d = bench.suite.datasets[key]
        root = Path(str(d.root)).expanduser().resolve()
        hint = f" ({d.hint})" if d.get("hint") else ""
        prep = [str(a) for a in (d.get("prep") or [])]
        if not prep:
            status, _ = _manifest_state(root)
            if status != "complete":
                cmd = str(OmegaConf.load(config_dir() / "data" / f"{d.data}.yaml").get(
                    "prep", "pcbench-prep <dataset> raw=<official files> out={root}")).replace("{root}", str(root))
                what = "is not a prepared dataset (no manifest.json)" if status is None else \
                    f"holds an unfinished preparation (manifest status {status!r})"
                raise SuiteError(f"suite.datasets.{key}.root={root} {what}{hint}. Prepare it with:\n    {cmd}\n"
                                 f"or point suite.datasets.{key}.root (or data_dir=) at the prepared folder")
            actions[key] = "prepared folder found"
            continue
        for arg in prep:
            if arg.startswith("raw=") and arg != "raw=synthetic" and not Path(arg[4:]).expanduser().exists():
                raise SuiteError(f"suite {bench.suite.name}, dataset {key}: the raw files {arg[4:]} do not exist"
                                 f"{hint}")
        argv = [sys.executable, "-m", "data_prep.cli", *prep, f"out={root}", "--workers", str(workers)]
        marker = _prep_marker(root)
        status, sha = _manifest_state(root)
        with contextlib.suppress(OSError, ValueError):
            done = json.loads(marker.read_text())
            if status == "complete" and done.get("args") == prep and done.get("manifest_sha256") == sha:
                actions[key] = "prepared earlier (same command, manifest unchanged)"
                continue
        root.parent.mkdir(parents=True, exist_ok=True)
        log = root.with_name(root.name + ".prep.log")
        say(f"[pcbench-bench] preparing {key} ({d.data}) into {root}: pcbench-prep {' '.join(prep)}")
        t0 = time.perf_counter()
        with open(log, "w", encoding="utf-8") as f:
            rc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
        if rc != 0:
            tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(True)[-15:])
            raise SuiteError(f"preparing suite dataset {key} failed (pcbench-prep exit {rc}){hint}; its output is "
                             f"in {log}:\n{tail}")
        status, sha = _manifest_state(root)
        from pcbench.io import write_json  # noqa: PLC0415

        write_json(marker, {"args": prep, "manifest_sha256": sha, "at": now_iso()})
        actions[key] = f"prepared in {time.perf_counter() - t0:.1f} s"
    return actions


# ------------------------------------------------------------------------------------------ plan
@dataclass
class Plan:
    """The cells a suite run starts: those without a finished record, in suite order, with their hashes."""

    suite: str
    cells: list[Cell]                 # every selected cell of the suite
    hashes: dict[str, str]            # cell name -> config_sha256
    todo: list[Cell]                  # cells to run now
    finished: list[Cell]              # cells skipped: a finished record with the same hash exists
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)  # cell name -> composed config (see write)

    def write(self, sweep_dir: Path, started_at: float, store_per_job: bool, results: str) -> Path:
        """``plan.json`` in the sweep folder: what every job counts its progress against, and each cell's
        composed trainer config, so a job uses the config the plan hashed instead of composing it again."""
        from pcbench.io import write_json  # noqa: PLC0415

        return write_json(sweep_dir / PLAN_FILE, {
            "suite": self.suite, "started_at": started_at,
            "started_iso": _dt.datetime.fromtimestamp(started_at, _dt.timezone.utc).isoformat(timespec="seconds"),
            "cells": [[c.name, self.hashes[c.name]] for c in self.todo], "skipped": len(self.finished),
            "store_per_job": store_per_job, "results": results,
            "configs": {c.name: self.configs[c.name] for c in self.todo if c.name in self.configs}})


def make_plan(bench: DictConfig, store: ResultStore | None) -> Plan:
    """Expand the suite, compose every selected cell's config (once), and split finished cells from those to run."""
    cells = expand_suite(bench, list(bench.get("only") or []))
    check_sweep_keys(bench, cells)  # before composing: names the swept key and the model entry, not the override
    hashes, configs = {}, {}
    for c in cells:
        cfg, choices = cell_config(c, "/unused")
        hashes[c.name] = config_sha256(cell_identity(cfg, c.probe, c.weights))
        configs[c.name] = {"overrides": list(c.overrides), "choices": choices,
                           "config": OmegaConf.to_container(cfg, resolve=False)}
    done = store.finished_hashes() if store is not None else set()
    return Plan(str(bench.suite.name), cells, hashes, [c for c in cells if hashes[c.name] not in done],
                [c for c in cells if hashes[c.name] in done], configs)


# ------------------------------------------------------------------------------------------ progress
class Progress:
    """done / failed / running / left of a suite run, read from the store(s) against ``plan.json``."""

    def __init__(self, sweep_dir: Path) -> None:
        self.sweep_dir = sweep_dir
        try:
            self.plan = json.loads((sweep_dir / PLAN_FILE).read_text())
        except (OSError, ValueError):
            self.plan = None  # a job started outside pcbench-bench: no totals to count against
        self.names = [n for n, _ in self.plan["cells"]] if self.plan else []

    def config(self, cell: Cell) -> tuple[DictConfig, dict[str, Any]] | None:
        """The cell's trainer config and group choices as the plan composed them (None: compose it here).

        Used only when the plan's entry was composed from exactly this cell's overrides, so a plan.json
        rewritten by another run of the same sweep folder is never taken for this one.
        """
        entry = ((self.plan or {}).get("configs") or {}).get(cell.name)
        if not entry or entry.get("overrides") != list(cell.overrides):
            return None
        cfg = OmegaConf.create(entry["config"])
        OmegaConf.set_struct(cfg, True)  # as Hydra composes it: a mistyped key read by the trainer is an error
        return cfg, dict(entry["choices"])

    def index(self, cell: str) -> str:
        """``k/N`` of a cell in the plan ("?" outside a plan)."""
        return f"{self.names.index(cell) + 1}/{len(self.names)}" if cell in self.names else "?"

    def _records(self) -> list[dict[str, Any]]:
        paths = [Path(self.plan["results"])]
        if self.plan.get("store_per_job"):
            paths += sorted(self.sweep_dir.glob(f"*/{JOB_STORE}"))
        out = []
        for p in paths:
            if p.is_file():  # read-only: counting progress must not migrate or re-journal a store being written
                with contextlib.suppress(ValueError, OSError, sqlite3.Error), ResultStore.open_readonly(p) as s:
                    out += s.records(suite=self.plan["suite"])
        return out

    def counts(self) -> dict[str, Any] | None:
        """Counts and times of this run (None without a plan)."""
        if not self.plan:
            return None
        hashes = {h for _, h in self.plan["cells"]}
        since = self.plan["started_iso"]
        done, failed, running = set(), set(), set()
        for r in self._records():
            h = r["config_sha256"]
            if h not in hashes:
                continue
            if r["status"] == "finished":
                done.add(h)
            elif (r.get("started_at") or "") >= since:
                (failed if r["status"] == "failed" else running).add(h)
        failed -= done
        running -= done | failed
        total = len(hashes)
        left = total - len(done) - len(failed)
        elapsed = time.time() - float(self.plan["started_at"])
        completed = len(done) + len(failed)
        eta = elapsed / completed * left if completed else None
        return {"total": total, "done": len(done), "failed": len(failed), "running": len(running), "left": left,
                "elapsed": elapsed, "eta": eta}

    def line(self) -> str:
        """``done a, failed b, left c | elapsed m:ss, ETA m:ss``."""
        c = self.counts()
        if c is None:
            return "no plan.json: counts unknown"
        return (f"done {c['done']}, failed {c['failed']}, left {c['left']} of {c['total']} | elapsed "
                f"{_fmt_s(c['elapsed'])}, ETA {_fmt_s(c['eta']) if c['left'] else '0:00'}")


class Monitor:
    """A thread printing the counts whenever they change (launchers whose jobs print elsewhere: joblib, SLURM)."""

    def __init__(self, sweep_dir: Path, every: float = 2.0) -> None:
        self.progress, self.every = Progress(sweep_dir), every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        last = None
        while not self._stop.wait(self.every):
            with contextlib.suppress(Exception):  # a store being migrated or copied: try again next time
                c = self.progress.counts()
                key = None if c is None else (c["done"], c["failed"], c["running"])
                if key != last:
                    last = key
                    say(f"[pcbench-bench] {c['running'] if c else '?'} running | {self.progress.line()}")

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------------------------------ one cell
@contextlib.contextmanager
def _captured(log: Path) -> Iterator[TextIO]:
    """Send the cell's stdout/stderr (trainer log lines, warnings) to ``log``; the console keeps runner lines."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8", buffering=1) as f, contextlib.redirect_stdout(f), \
            contextlib.redirect_stderr(f):
        yield f


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    import torch  # noqa: PLC0415

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def probe_cell(cfg: DictConfig, run_dir: Path, settings: dict[str, Any],
               fp32_score: float | None = None) -> dict[str, Any]:
    """The efficiency probe on the cell's selected checkpoint (``best.pt``), batches from its own loaders.

    ``score(model, dtype)`` is the trainer's test evaluation of ``model`` under autocast ``dtype`` (None: fp32),
    returning the task's headline metric (OA or mIoU) as a fraction; the probe reports the bf16 and int8 deltas.
    ``fp32_score``: that figure as ``fit`` already measured it on the same checkpoint (not evaluated again).
    """
    import torch  # noqa: PLC0415

    from pcbench.bench.probe import probe_efficiency  # noqa: PLC0415
    from pcbench.train import build_run, evaluate_split  # noqa: PLC0415
    from pcbench.train.checkpoint import load_checkpoint  # noqa: PLC0415
    from pcbench.train.data import eval_loader, train_loader  # noqa: PLC0415

    n = int(settings.get("batches", 2))
    with _threads(cfg.trainer.threads):
        torch.manual_seed(int(cfg.seed))
        run = build_run(cfg)
        run.model.load_state_dict(load_checkpoint(run_dir / "checkpoints" / "best.pt")["model"])
        loader, _ = train_loader(run.data.train, cfg, 0, 1)
        train_batches = [b for b, _ in zip(loader, range(n), strict=False)]
        eval_batches = [eb.batch for eb, _ in zip(eval_loader(run.data.test, cfg), range(n), strict=False)]
        headline = HEADLINE[run.data.task]
        precisions = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

        def score(model: torch.nn.Module, dtype: torch.dtype | None) -> float:
            res = evaluate_split(cfg, run, "test", precision=precisions[dtype], model=model)
            return float(res.metrics[headline])

        return probe_efficiency(
            run.model, train_batches, eval_batches, task=run.data.task, device=run.device,
            score=score if settings.get("score", True) else None, fp32_score=fp32_score,
            ignore_index=run.data.ignore_index,
            warmup=int(settings.get("warmup", 2)), repeats=int(settings.get("repeats", 5)),
            latency_repeats=int(settings.get("latency_repeats", 10)), bf16=bool(settings.get("bf16", True)),
            int8=bool(settings.get("int8", True)))


def _supersede(store: ResultStore, sha: str, host: str) -> None:
    """Mark rows left ``running`` by an earlier attempt of this cell failed when their process is gone.

    Called while this process holds the cell's claim. A row whose process still runs on this host (a runner
    from before claims existed) is left alone; one of another host is failed: holding the claim means no
    live runner there has it.
    """
    for r in store.records(status="running"):
        extra = r.get("extra") or {}
        pid = extra.get("pid")
        if r["config_sha256"] != sha:
            continue
        if r.get("hostname") == host and pid is not None and pid != os.getpid() and process_alive(
                int(pid), extra.get("pid_start")):
            continue
        store.fail(r["result_id"], error=f"interrupted: the attempt started {r.get('started_at')} on "
                   f"{r.get('hostname')} ended without a result (killed or timed out); a new attempt "
                   f"started on {host}", log_path=r.get("log_path"))


def _cell_failed(store: ResultStore, rid: str, log: Path, err: BaseException, head: str, progress: Progress,
                 out: dict[str, Any]) -> dict[str, Any]:
    """Record a cell's failure (traceback to its log, the reason in the store), say it, return its status."""
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"[{now_iso()}] cell failed:\n{traceback.format_exc()}")
    msg = f"{type(err).__name__}: {err}".strip()
    store.fail(rid, error=msg, log_path=str(log))
    if _BAR is not None:
        _BAR.update(1)
    say(f"{head}: {msg.splitlines()[0][:300]} (log: {log}) | {progress.line()}")
    return {**out, "status": "failed"}


def _headline_text(result: FitResult) -> str:
    key = HEADLINE.get(result.task, "oa")
    val = (result.metrics.get("test") or {}).get(key)
    # ScanNet's test labels are hidden, so the trainer's final evaluation runs on val: name the split it ran on
    split = result.splits.final
    return f"{split} {METRIC_NAMES[key]} {100 * val:.1f}%" if val is not None else f"{split} {METRIC_NAMES[key]} n/a"


def as_fit_result(res: Any, cfg: DictConfig) -> FitResult:
    """``fit``'s return value as the typed :class:`FitResult` (a metrics.json dict is read into one).

    A dict from a trainer that predates the typed result lacks its identity fields: they are derived from
    ``cfg``, the config it ran, and the checkpoint-selecting value is left unknown rather than guessed.
    """
    if isinstance(res, FitResult):
        return res
    from pcbench.train.config import config_identity_sha256, run_content  # noqa: PLC0415

    d = dict(res)
    d.setdefault("config", run_content(cfg))
    d.setdefault("identity_sha256", config_identity_sha256(cfg))
    d.setdefault("selected_value", None)
    return FitResult.from_dict(d)


def run_cell(bench: DictConfig, cell: Cell, job_dir: Path, store_path: Path, progress: Progress | None = None,
             wal: bool = True) -> dict[str, Any]:
    """Run one cell into the store at ``store_path``; never raises for a failing cell (KeyboardInterrupt aside).

    Returns ``{"cell", "status", "result_id", "run_dir", "log_path"}``: status "skipped" when a finished record
    with the same config hash exists, "claimed" when another live process runs the cell now (its claim in the
    store names it), else "finished" or "failed".
    """
    progress = progress or Progress(job_dir.parent)
    tag = f"[pcbench-bench] cell {progress.index(cell.name)} {cell.name}"
    t0 = time.perf_counter()
    cfg, choices = progress.config(cell) or cell_config(cell, job_dir / "pending")
    identity = cell_identity(cfg, cell.probe, cell.weights)
    sha = config_sha256(identity)
    run_dir = job_dir / sha[:12]
    log = run_dir / "cell.log"
    out = {"cell": cell.name, "status": "", "result_id": None, "run_dir": str(run_dir), "log_path": str(log)}
    store = ResultStore(store_path, wal=wal)
    try:
        state, other = store.claim(sha)
        if state == "finished":
            say(f"{tag}: finished earlier (config {sha[:12]}): skipped")
            return {**out, "status": "skipped", "result_id": other["result_id"]}
        if state == "held":
            elsewhere = "" if other["hostname"] == socket.gethostname() else (
                f"; if that runner is gone, free the cell with: pcbench-results release results={store_path} "
                f"{sha[:12]}")
            say(f"{tag}: claimed by pid {other['pid']} on host {other['hostname']} since {other['claimed_at']} "
                f"(config {sha[:12]}): skipped; run the suite again once that runner is done{elsewhere}")
            return {**out, "status": "claimed", "result_id": other["result_id"]}
        if state == "taken_over":
            say(f"{tag}: took over the claim of pid {other['pid']} on host {other['hostname']} (since "
                f"{other['claimed_at']}): that process is gone")
        try:
            return _run_claimed(bench, cell, cfg, choices, identity, sha, store, progress, tag, t0, out)
        finally:
            store.release(sha)
    finally:
        store.close()


def _run_claimed(bench: DictConfig, cell: Cell, cfg: DictConfig, choices: dict[str, Any], identity: dict[str, Any],
                 sha: str, store: ResultStore, progress: Progress, tag: str, t0: float,
                 out: dict[str, Any]) -> dict[str, Any]:
    """The part of :func:`run_cell` done while this process holds the cell's claim."""
    from pcbench.bench.probe import machine_load  # noqa: PLC0415 - imports torch, as the trainer does
    from pcbench.models import model_task  # noqa: PLC0415
    from pcbench.train import fit  # noqa: PLC0415

    run_dir, log = Path(out["run_dir"]), Path(out["log_path"])
    with open_dict(cfg):
        cfg.paths.run_dir = str(run_dir)
        if bench.get("threads"):
            cfg.trainer.threads = int(bench.threads)
        resumed = (run_dir / "checkpoints" / "last.pt").is_file() and not cell.weights
        cfg.resume = resumed
    if cell.weights:
        return run_weights(cell, cfg, choices, identity, sha, store, progress, tag, t0, out)
    host = host_info()
    _supersede(store, sha, host["hostname"])
    meta = {"cell": cell.name, "config": identity, "suite": cell.suite, "model": choices.get("model"),
            "dataset": cell.dataset_label, "task": model_task(cfg.model), "variant": cell.variant or None,
            "recipe": cell.recipe, "fidelity": cell.fidelity, "log_path": str(log), "run_dir": str(run_dir)}
    started = now_iso()
    me = {"pid": os.getpid(), "pid_start": process_start(os.getpid())}
    # the swept values go in from the start, so a failed attempt is listed as the sweep point it was
    swept = {"sweep": dict(cell.sweep)} if cell.sweep else {}
    rid = store.add(record_from_metrics({"seed": cell.seed, **me, **swept}, status="running", started_at=started,
                                        host=host, **meta))
    out["result_id"] = rid
    store.claim(sha, rid)  # our claim now names the row it produces (pcbench-results list shows both)
    say(f"{tag}: running {choices.get('model')} on {cell.dataset_label} seed {cell.seed}"
        f"{' [' + cell.variant + ']' if cell.variant else ''}{' (resuming)' if resumed else ''} | {progress.line()}")
    try:
        with _captured(log) as f:
            print(f"[{now_iso()}] cell {cell.name} ({cell.suite}), config {sha}, run dir {run_dir}", file=f)
            result = as_fit_result(fit(cfg), cfg)
            # fit's final test already scored the selected checkpoint in fp32: the probe reuses that figure
            fp32 = (result.metrics.get("test") or {}).get(HEADLINE.get(result.task, "oa")) \
                if result.provenance.get("precision") == "fp32" else None
            t_probe = time.perf_counter()
            before = machine_load()
            probe = probe_cell(cfg, run_dir, cell.probe, fp32_score=fp32)
            load = machine_load(before)
            probe_s = time.perf_counter() - t_probe
            print(f"[{now_iso()}] probe done in {probe_s:.1f} s", file=f)
    except KeyboardInterrupt:
        store.fail(rid, error="interrupted (Ctrl-C); run the suite again to resume this cell", log_path=str(log))
        raise
    except BaseException as err:  # noqa: BLE001 - any failure of a cell is recorded and the suite goes on
        return _cell_failed(store, rid, log, err, f"{tag}: FAILED after {_fmt_s(time.perf_counter() - t0)}",
                            progress, out)
    wall = time.perf_counter() - t0
    class_names = result.class_names or (result.metrics.get("test") or {}).get("class_names")
    rec = record_from_result(result, status="finished", result_id=rid, probe=probe, device=probe["device"],
                             started_at=started, host=host, **{**meta, "task": result.task})
    rec["class_names"] = list(class_names) if class_names else None
    rec["extra"] = {**(rec["extra"] or {}), **me, **swept, **load, "resumed": resumed, "cell_wall_s": wall,
                    "probe_wall_s": probe_s}
    store.update(rid, **{k: v for k, v in rec.items() if k != "result_id"})
    say(f"{tag}: finished in {_fmt_s(wall)}: {_headline_text(result)} | {progress.line()}")
    if _BAR is not None:
        _BAR.update(1)
    return {**out, "status": "finished"}


def published_checkpoint(spec: dict[str, Any], folder: Path) -> Path:
    """The converted pcbench checkpoint of a ``suite.weights`` entry: its ``checkpoint``, else the registry's
    conversion of its ``file`` (offline) or of a hash-checked download, written into ``folder``."""
    from pcbench.models.zoo_registry import fetch_weights  # noqa: PLC0415

    if spec.get("checkpoint"):
        path = Path(spec["checkpoint"])
        if not path.is_file():
            raise SuiteError(f"published weights {spec['name']}: checkpoint={path} does not exist; give a file "
                             f"`pcbench-weights fetch {spec['name']}` wrote, or file=<the downloaded source>")
        return path
    return fetch_weights(spec["name"], file=spec.get("file"), folder=folder)


def published_flag(spec: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """``extra.published_weights`` of a record: the registry name, the converted file's source and sha256, and
    the published figure (metric, value in %, protocol, where it is reported)."""
    from pcbench.models.zoo_registry import PUBLISHED  # noqa: PLC0415

    entry = PUBLISHED[spec["name"]]
    source = state.get("source") if isinstance(state.get("source"), dict) else {}
    return {"name": entry.name, "source": entry.source, "url": entry.url, "sha256": source.get("sha256"),
            "registered_sha256": entry.sha256, "licence": entry.licence,
            "published": {"metric": entry.metric, "value": entry.value, "protocol": entry.protocol,
                          "source": entry.reference}}


def run_weights(cell: Cell, cfg: DictConfig, choices: dict[str, Any], identity: dict[str, Any], sha: str,
                store: ResultStore, progress: Progress, tag: str, t0: float, out: dict[str, Any]) -> dict[str, Any]:
    """Evaluate a published-weights cell (claimed by this process) into the store; never raises for a failure."""
    import torch  # noqa: PLC0415

    import pcbench  # noqa: PLC0415
    from pcbench.models import model_task  # noqa: PLC0415
    from pcbench.train import evaluate  # noqa: PLC0415
    from pcbench.train.checkpoint import load_checkpoint  # noqa: PLC0415
    from pcbench.train.result import final_role  # noqa: PLC0415

    run_dir, log = Path(out["run_dir"]), Path(out["log_path"])
    host = host_info()
    _supersede(store, sha, host["hostname"])
    meta = {"cell": cell.name, "config": identity, "suite": cell.suite, "model": choices.get("model"),
            "dataset": cell.dataset_label, "task": model_task(cfg.model), "variant": None, "recipe": cell.recipe,
            "fidelity": cell.fidelity, "log_path": str(log), "run_dir": str(run_dir)}
    started = now_iso()
    me = {"pid": os.getpid(), "pid_start": process_start(os.getpid())}
    rid = store.add(record_from_metrics({"seed": cell.seed, **me}, status="running", started_at=started, host=host,
                                        **meta))
    out["result_id"] = rid
    store.claim(sha, rid)
    say(f"{tag}: evaluating published weights {cell.weights['name']} on {cell.dataset_label} | {progress.line()}")
    split = str(cfg.eval.split)
    try:
        with _captured(log) as f:
            print(f"[{now_iso()}] cell {cell.name} ({cell.suite}), config {sha}, run dir {run_dir}", file=f)
            ckpt = published_checkpoint(cell.weights, run_dir / "weights")
            flag = published_flag(cell.weights, load_checkpoint(ckpt, map_location="cpu"))
            res = evaluate(cfg, ckpt)
    except KeyboardInterrupt:
        store.fail(rid, error="interrupted (Ctrl-C); run the suite again to evaluate this cell", log_path=str(log))
        raise
    except BaseException as err:  # noqa: BLE001 - any failure of a cell is recorded and the suite goes on
        return _cell_failed(store, rid, log, err, f"{tag}: FAILED after {_fmt_s(time.perf_counter() - t0)}",
                            progress, out)
    plain = {k: v for k, v in res[split].items() if k != "class_names"}
    vote = res.get(f"{split}_vote")
    rec = record_from_metrics(
        {"seed": cell.seed, "test": plain, "test_vote": {k: v for k, v in vote.items() if k != "class_names"}
         if vote else None, "splits": {"final": split, "final_role": final_role(split)},
         "eval_samples_per_s": res.get("eval_samples_per_s"), "dataset_manifest_sha256":
         res.get("dataset_manifest_sha256"), "pcbench_version": pcbench.__version__,
         "torch_version": torch.__version__, "device": str(cfg.trainer.get("accelerator", "cpu")),
         "epochs": 0, "steps": 0},
        status="finished", result_id=rid, started_at=started, host=host,
        class_names=res[split].get("class_names"), **meta)
    wall = time.perf_counter() - t0
    rec["wall_s"] = wall
    rec["extra"] = {**(rec["extra"] or {}), **me, "published_weights": flag, "checkpoint": str(ckpt),
                    "precision": res.get("precision"), "cell_wall_s": wall}
    store.update(rid, **{k: v for k, v in rec.items() if k != "result_id"})
    key = HEADLINE.get(meta["task"], "oa")
    say(f"{tag}: finished in {_fmt_s(wall)}: {split} {METRIC_NAMES[key]} {100 * plain.get(key, float('nan')):.1f}% "
        f"(published {flag['published']['value']}) | {progress.line()}")
    if _BAR is not None:
        _BAR.update(1)
    return {**out, "status": "finished"}


def cell_job(cfg: DictConfig) -> dict[str, Any]:
    """Hydra task function: run the one cell named by ``cfg.cell`` (a job of the runner's multirun)."""
    from hydra.core.hydra_config import HydraConfig  # noqa: PLC0415

    if not cfg.get("cell"):
        raise SuiteError("cell= is not set; run suites with pcbench-bench suite=<name> (it launches one job per cell)")
    cells = {c.name: c for c in expand_suite(cfg, list(cfg.get("only") or []))}
    if cfg.cell not in cells:
        raise SuiteError(f"cell={cfg.cell!r} is not a cell of suite {cfg.suite.name}: {sorted(cells)}")
    die_with_runner()  # a job in a worker process of the runner (joblib) must not outlive it
    job_dir = Path(HydraConfig.get().runtime.output_dir)
    per_job = bool(cfg.get("store_per_job"))
    store_path = job_dir / JOB_STORE if per_job else Path(str(cfg.results))
    return run_cell(cfg, cells[str(cfg.cell)], job_dir, store_path, Progress(job_dir.parent), wal=not per_job)
