"""Leaderboard from the results store: ``leaderboard.md``, ``leaderboard.csv`` and ``leaderboard.html``.

Rows are grouped per dataset and **protocol** (never mixed in one ranking), then per model configuration
(model, sweep variant, recipe, fidelity), and ranked by the task's headline metric (OA for classification,
mIoU for segmentation): mean ± sample std over the finished runs, with the number of runs. A run contributes to
each protocol its metrics.json holds: ``test`` (checkpoint selected on val: honest), ``test_vote`` (the same
with voting), ``test_selected`` (best test over epochs: optimistic) and, for datasets without test labels
(ScanNet), ``val``. Efficiency columns are medians over the group's runs on its most used hardware, which is
named. Published figures (``pcbench.bench.published``) stand beside ours with the difference, labelled with
their own protocol. When one resolved config was run more than once (e.g. merged from two machines), its
latest finished run counts.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pcbench.bench.published import PROTOCOLS, PUBLISHED, Published, published_for
from pcbench.io import write_text

__all__ = ["HEADLINE", "LeaderRow", "Leaderboard", "build_leaderboard", "load_ops", "write_report"]

HEADLINE = {"cls": "oa", "seg": "miou"}
METRIC_NAMES = {"oa": "OA", "macc": "mAcc", "miou": "mIoU"}
PROTOCOL_ORDER = ("test", "test_vote", "test_selected", "val", "val_vote")
#: Probe fields summarized per row (median over runs on the row's hardware), with their column titles.
EFFICIENCY = {
    "params": "params", "flops_per_sample": "FLOPs/sample", "train_samples_per_s": "train samples/s",
    "infer_samples_per_s": "infer samples/s", "latency_b1_ms": "batch-1 latency ms",
    "train_peak_mib": "train peak MiB", "infer_peak_mib": "infer peak MiB", "bf16_speedup": "bf16 speed-up",
    "bf16_score_delta": "bf16 Δscore (points)", "int8_speedup": "int8 speed-up",
    "int8_score_delta": "int8 Δscore (points)",
}
_PROVENANCE = ("result_id", "suite", "cell", "seed", "config_sha256", "git_commit", "pcbench_version", "torch_version",
               "cuda_version", "device", "device_name", "cpu_model", "num_threads", "allocator", "hostname",
               "python_version", "started_at", "finished_at", "wall_s", "selected_on", "best_epoch", "last_epoch",
               "dataset_manifest_sha256", "run_dir", "log_path")


@dataclass
class LeaderRow:
    """One model configuration on one dataset under one protocol."""

    dataset: str
    protocol: str
    task: str
    metric: str
    model: str
    variant: str
    recipe: str
    fidelity: str
    scores: list[float]
    metrics: dict[str, float | None]
    iou_per_class: list[float | None] | None
    class_names: list[str] | None
    hardware: str
    efficiency: dict[str, float | None]
    int8_status: str
    bf16_status: str
    runs: list[dict[str, Any]]
    rank: int = 0
    published: Published | None = None
    other_hardware_runs: int = 0

    @property
    def n(self) -> int:
        """Number of runs (seeds)."""
        return len(self.scores)

    @property
    def mean(self) -> float:
        """Mean headline score."""
        return statistics.fmean(self.scores)

    @property
    def std(self) -> float | None:
        """Sample standard deviation of the headline score (None for one run)."""
        return statistics.stdev(self.scores) if len(self.scores) > 1 else None

    @property
    def delta(self) -> float | None:
        """Ours minus published (fractions), where a published figure exists."""
        return self.mean - self.published.value if self.published is not None else None

    @property
    def label(self) -> str:
        """Model name with its sweep variant."""
        return f"{self.model} [{self.variant}]" if self.variant else self.model


@dataclass
class Leaderboard:
    """Everything a report shows: ranked rows per (dataset, protocol), failed cells, counts."""

    rows: list[LeaderRow]
    failed: list[dict[str, Any]]
    counts: dict[str, int]
    published: tuple[Published, ...] = PUBLISHED
    ops: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def sections(self) -> list[tuple[str, str, list[LeaderRow]]]:
        """(dataset, protocol, ranked rows) in display order."""
        groups: dict[tuple[str, str], list[LeaderRow]] = defaultdict(list)
        for r in self.rows:
            groups[(r.dataset, r.protocol)].append(r)
        keys = sorted(groups, key=lambda k: (k[0], PROTOCOL_ORDER.index(k[1])))
        return [(d, p, sorted(groups[(d, p)], key=lambda r: r.rank)) for d, p in keys]


def _latest_per_config(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    best: dict[str, Mapping[str, Any]] = {}
    for r in records:
        key = r["config_sha256"]
        if key not in best or (r.get("finished_at") or "") >= (best[key].get("finished_at") or ""):
            best[key] = r
    return list(best.values())


def _task(rec: Mapping[str, Any]) -> str | None:
    if rec.get("task") in HEADLINE:
        return rec["task"]
    return (rec.get("probe") or {}).get("task")


def _median(values: Iterable[Any]) -> float | None:
    vals = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    return statistics.median(vals) if vals else None


def _efficiency(runs: list[Mapping[str, Any]]) -> tuple[str, dict[str, float | None], str, str, int]:
    """(hardware, medians, int8 status, bf16 status, runs on other hardware) for a group of runs."""
    def hw(r: Mapping[str, Any]) -> str:
        name = (r.get("probe") or {}).get("device_name") or r.get("device_name") or r.get("device") or "unknown"
        threads = (r.get("probe") or {}).get("num_threads") or r.get("num_threads")
        return f"{name} ({threads} threads)" if threads and (r.get("device") or "cpu") == "cpu" else str(name)

    counts = Counter(hw(r) for r in runs)
    primary = counts.most_common(1)[0][0]
    mine = [r for r in runs if hw(r) == primary]
    eff: dict[str, float | None] = {}
    for key in EFFICIENCY:
        eff[key] = _median((r.get("probe") or {}).get(key, r.get(key)) for r in mine)
    statuses = Counter((r.get("probe") or {}).get("int8_status") or "not probed" for r in mine)
    bf16 = Counter((r.get("probe") or {}).get("bf16_status") or "not probed" for r in mine)
    return primary, eff, statuses.most_common(1)[0][0], bf16.most_common(1)[0][0], len(runs) - len(mine)


def _pick_published(model: str, dataset: str, metric: str, protocol: str) -> Published | None:
    rows = published_for(model, dataset, metric)
    same = [p for p in rows if p.protocol == protocol]
    return (same or rows or [None])[0]


def _protocol_views(rec: Mapping[str, Any]) -> list[tuple[str, dict]]:
    """(protocol, metrics) of a record, named by the split they were computed on.

    Where test labels are hidden (ScanNet) the trainer evaluates its "test" role on val (metrics.json
    ``splits.test == "val"``): those figures are val figures ("val", "val_vote"), the record's own "val" entry
    repeats them, and a best-over-epochs "test_selected" would be the selection score itself.
    """
    on_val = ((rec.get("splits") or {}).get("final_role") == "val"  # typed split roles (store v3)
              or ((rec.get("extra") or {}).get("splits") or {}).get("test") == "val")
    views = []
    for protocol in PROTOCOL_ORDER:
        split = rec.get(protocol) or {}
        if on_val:
            if protocol in ("val", "test_selected"):
                continue
            protocol = {"test": "val", "test_vote": "val_vote"}.get(protocol, protocol)
        views.append((protocol, split))
    return views


def build_leaderboard(records: Iterable[Mapping[str, Any]], ops: dict[str, Any] | None = None) -> Leaderboard:
    """Group, aggregate and rank records (dicts as the store returns them)."""
    records = list(records)
    counts = Counter(r["status"] for r in records)
    finished = _latest_per_config(r for r in records if r["status"] == "finished")
    done_hashes = {r["config_sha256"] for r in finished}
    failed = [r for r in records if r["status"] == "failed" and r["config_sha256"] not in done_hashes]
    notes: list[str] = []
    dup = counts.get("finished", 0) - len(finished)
    if dup:
        notes.append(f"{dup} finished run(s) repeat a resolved config already counted; the latest of each counts")

    groups: dict[tuple, list[tuple[Mapping[str, Any], dict]]] = defaultdict(list)
    with_test = {r.get("dataset") for r in finished if any(split for p, split in _protocol_views(r)
                                                           if p in PROTOCOL_ORDER[:3])}
    for rec in finished:
        task = _task(rec)
        if task is None:
            notes.append(f"result {rec['result_id']} ({rec['cell']}) has no task; not ranked")
            continue
        metric = HEADLINE[task]
        for protocol, split in _protocol_views(rec):
            if protocol == "val" and rec.get("dataset") in with_test:
                continue  # with test labels the validation score selected the checkpoint: not a result
            if split.get(metric) is None:
                continue
            key = (rec.get("dataset") or "?", protocol, task, rec.get("model") or "?", rec.get("variant") or "",
                   rec.get("recipe") or "", rec.get("fidelity") or "")
            groups[key].append((rec, split))

    rows: list[LeaderRow] = []
    for (dataset, protocol, task, model, variant, recipe, fidelity), members in groups.items():
        metric = HEADLINE[task]
        runs = [m[0] for m in members]
        splits = [m[1] for m in members]
        per_class = [s.get("iou_per_class") for s in splits if s.get("iou_per_class")]
        iou = None
        if per_class and len({len(p) for p in per_class}) == 1:  # None: the class was absent in that run
            iou = [_mean_or_none(v) for v in zip(*per_class, strict=True)]
        hardware, eff, int8, bf16, other = _efficiency(runs)
        rows.append(LeaderRow(
            dataset=dataset, protocol=protocol, task=task, metric=metric, model=model, variant=variant, recipe=recipe,
            fidelity=fidelity, scores=[float(s[metric]) for s in splits],
            metrics={k: _mean_or_none(s.get(k) for s in splits) for k in METRIC_NAMES},
            iou_per_class=iou, class_names=next((r.get("class_names") for r in runs if r.get("class_names")), None),
            hardware=hardware, efficiency=eff, int8_status=int8, bf16_status=bf16,
            runs=sorted(({**{k: r.get(k) for k in _PROVENANCE},
                          "memory_method": (r.get("probe") or {}).get("memory_method")} for r in runs),
                        key=lambda p: (p["seed"] is None, p["seed"] or 0)),
            published=_pick_published(model, dataset, metric, protocol), other_hardware_runs=other,
        ))
    by_section: dict[tuple[str, str], list[LeaderRow]] = defaultdict(list)
    for r in rows:
        by_section[(r.dataset, r.protocol)].append(r)
    for section in by_section.values():
        for i, r in enumerate(sorted(section, key=lambda r: -r.mean), 1):
            r.rank = i
    return Leaderboard(rows=rows, failed=failed, counts=dict(counts), ops=ops, notes=notes)


def _mean_or_none(values: Iterable[Any]) -> float | None:
    vals = [float(v) for v in values if isinstance(v, (int, float))]
    return statistics.fmean(vals) if vals else None


def load_ops(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON that ``pcbench-bench-ops`` writes (``ops.json``); ValueError naming what is wrong."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"ops={path}: cannot read it as JSON ({err}); give the ops.json written by "
                         "pcbench-bench-ops --out <dir>") from err
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"ops={path}: no 'rows' list; give the ops.json written by pcbench-bench-ops")
    return data


# -- text formats -----------------------------------------------------------------------------------------
def pct(v: float | None, digits: int = 2) -> str:
    """A fraction as a percentage string ('-' for None)."""
    return "-" if v is None else f"{100 * v:.{digits}f}"


def num(v: float | None, key: str = "") -> str:
    """A probe figure formatted for a table cell."""
    if v is None:
        return "-"
    if key == "params":
        return f"{v / 1e6:.2f}M"
    if key == "flops_per_sample":
        return f"{v / 1e9:.2f}G"
    if key.endswith("score_delta"):
        return f"{100 * v:+.2f}"
    if key.endswith("speedup"):
        return f"{v:.2f}x"
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


def score_text(r: LeaderRow) -> str:
    """'mean ± std' in percent."""
    return pct(r.mean) + (f" ± {pct(r.std)}" if r.std is not None else "")


def published_text(r: LeaderRow) -> tuple[str, str]:
    """(published figure with its protocol when it differs from the row's, difference in points)."""
    p = r.published
    if p is None:
        return "-", "-"
    tag = "" if p.protocol == r.protocol else f" ({p.protocol})"
    return f"{pct(p.value)}{tag}", f"{100 * r.delta:+.2f}"


CSV_COLUMNS = ("dataset", "protocol", "rank", "model", "variant", "recipe", "fidelity", "task", "metric", "mean",
               "std", "n", "oa", "macc", "miou", "published", "published_protocol", "published_source", "delta",
               *EFFICIENCY, "int8_status", "bf16_status", "hardware", "seeds", "config_sha256s")


def render_csv(board: Leaderboard) -> str:
    """One line per leaderboard row; metrics as fractions, efficiency in raw units."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for _, _, rows in board.sections():
        for r in rows:
            p = r.published
            w.writerow([r.dataset, r.protocol, r.rank, r.model, r.variant, r.recipe, r.fidelity, r.task, r.metric,
                        _g(r.mean), _g(r.std), r.n, *(_g(r.metrics[k]) for k in METRIC_NAMES),
                        _g(p.value if p else None), p.protocol if p else "", p.source if p else "", _g(r.delta),
                        *(_g(r.efficiency[k]) for k in EFFICIENCY), r.int8_status, r.bf16_status, r.hardware,
                        " ".join(str(x["seed"]) for x in r.runs),
                        " ".join(str(x["config_sha256"]) for x in r.runs)])
    return buf.getvalue()


def _g(v: float | None) -> str:
    return "" if v is None else repr(float(v)) if isinstance(v, float) else str(v)


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(board: Leaderboard, title: str = "pcbench leaderboard") -> str:
    """Markdown: one ranked table per dataset and protocol, failed cells, published figures, ops table."""
    c = board.counts
    out = [f"# {title}", "", f"{c.get('finished', 0)} finished, {c.get('failed', 0)} failed, "
           f"{c.get('running', 0)} running. Scores in %, mean ± sample std over runs; Δ = ours − published "
           "(points); published protocol in brackets when it differs from the table's.", ""]
    out += [f"- {n}" for n in board.notes] + ([""] if board.notes else [])
    for dataset, protocol, rows in board.sections():
        metric = METRIC_NAMES[rows[0].metric]
        out += [f"## {dataset} — {protocol}: {PROTOCOLS[protocol]}", ""]
        head = ["#", "model", "recipe", "fidelity", f"{metric} (%)", "n", "OA", "mAcc", "mIoU", "published", "Δ",
                *(EFFICIENCY[k] for k in ("params", "flops_per_sample", "train_samples_per_s", "infer_samples_per_s",
                                          "latency_b1_ms", "train_peak_mib")), "bf16", "int8", "hardware"]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            pub, delta = published_text(r)
            e = r.efficiency
            cells = [r.rank, r.label, r.recipe or "-", r.fidelity or "-", score_text(r), r.n,
                     *(pct(r.metrics[k]) for k in METRIC_NAMES), pub, delta,
                     *(num(e[k], k) for k in ("params", "flops_per_sample", "train_samples_per_s",
                                              "infer_samples_per_s", "latency_b1_ms", "train_peak_mib")),
                     _variant_text(r.bf16_status, e["bf16_speedup"], e["bf16_score_delta"], "bf16"),
                     _variant_text(r.int8_status, e["int8_speedup"], e["int8_score_delta"], "int8"), r.hardware]
            out.append("| " + " | ".join(_md_cell(x) for x in cells) + " |")
        out.append("")
    if board.failed:
        out += ["## Failed cells", "", "| suite | cell | model | dataset | seed | error | log |", "|---|---|---|---|---|---|---|"]
        for f in board.failed:
            out.append("| " + " | ".join(_md_cell(x) for x in (f.get("suite") or "-", f["cell"], f.get("model") or "-",
                       f.get("dataset") or "-", "-" if f.get("seed") is None else f["seed"], (f.get("error") or "")[:200], f.get("log_path") or "-"))
                       + " |")
        out.append("")
    out += ["## Published figures", "", "| model | dataset | metric | value (%) | protocol | source | checked | note |",
            "|---|---|---|---|---|---|---|---|"]
    for p in board.published:
        out.append("| " + " | ".join(_md_cell(x) for x in (p.model, p.dataset, METRIC_NAMES[p.metric], pct(p.value),
                                                             p.protocol, p.source, p.checked, p.note or "-")) + " |")
    out.append("")
    if board.ops:
        out += ops_markdown(board.ops)
    return "\n".join(out) + "\n"


def _variant_text(status: str, speedup: float | None, delta: float | None, name: str) -> str:
    if status == "ok":
        return f"{num(speedup, 'speedup')}" + (f", Δ {num(delta, 'score_delta')}" if delta is not None else "")
    return status


def ops_markdown(ops: Mapping[str, Any]) -> list[str]:
    """The ops micro-benchmark rows as Markdown lines."""
    env = ops.get("environment") or {}
    out = [f"## Ops micro-benchmark ({ops.get('title', 'ops')})", "",
           f"torch {env.get('torch')}, {env.get('threads')} threads, {env.get('cpu')}, cuda={env.get('cuda')}, "
           f"commit {env.get('git_commit')}, {env.get('time')}, malloc mmap threshold "
           f"{env.get('malloc_mmap_threshold')}", "",
           "| op | case | impl | median ms | ratio to fastest peer | note |", "|---|---|---|---|---|---|"]
    for r in ops.get("rows", []):
        ms = f"{r['median_ms']:.3f}" if r.get("median_ms") is not None else f"failed ({r.get('error')})"
        ratio = f"{r['ratio_to_fastest_peer']:.2f}x" if r.get("ratio_to_fastest_peer") is not None else "-"
        out.append("| " + " | ".join(_md_cell(x) for x in (r.get("op"), r.get("case"), r.get("impl"), ms, ratio,
                                                             r.get("note") or "")) + " |")
    return [*out, ""]


def write_report(records: Iterable[Mapping[str, Any]], out: str | os.PathLike[str], *,
                 ops: str | os.PathLike[str] | None = None, title: str = "pcbench leaderboard",
                 source: str = "") -> dict[str, Path]:
    """Write leaderboard.md / .csv / .html into ``out``; returns their paths."""
    from pcbench.bench.report_html import render_html  # noqa: PLC0415 - the HTML renderer is the big part

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={out} is a file; give a folder for leaderboard.md/.csv/.html")
    board = build_leaderboard(records, load_ops(ops) if ops is not None else None)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "leaderboard.md", "csv": out / "leaderboard.csv", "html": out / "leaderboard.html"}
    write_text(paths["md"], render_markdown(board, title))
    write_text(paths["csv"], render_csv(board))
    write_text(paths["html"], render_html(board, title, source))
    return paths
