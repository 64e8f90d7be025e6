"""The one column spec of every exported table: the Markdown, CSV and HTML writers all read these lists.

A :class:`Column` says what a cell holds (``value``: a number, or text), how it reads (``text``), its header
and the unit/meaning behind it (``tip``), and which outputs show it (``where``: "md", "csv", "html"). A column
added here appears in every output that lists it, with the same header and the same formatting.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pcbench.bench.leaderboard import METRIC_NAMES, PRESENT_NAMES, Leaderboard, LeaderRow

__all__ = ["ACC", "EFF", "FAILED_COLUMNS", "LEADER_COLUMNS", "LOADED_MARK", "OPS_COLUMNS", "PUBLISHED_COLUMNS", "WEIGHTS_COLUMNS", "WEIGHTS_NOTE",
           "Column", "ci_text", "counts_text", "csv_columns", "legend_text", "loaded_text", "num",
           "ops_environment_text", "pct", "published_text", "score_text", "si", "status_text", "table_columns",
           "versus_text"]

MD, CSV, HTML = "md", "csv", "html"
ACC, EFF = "accuracy", "efficiency"  # a section's two displayed tables: scores, and what they cost
_ALL = frozenset((MD, CSV, HTML))
_CSV_ONLY = frozenset((CSV,))
_SHOWN = frozenset((MD, HTML))


@dataclass(frozen=True)
class Column:
    """One column: its key, header, unit/meaning, raw value, display text and the outputs that show it."""

    name: str  #: key, and the CSV header
    header: str  #: display header; "{metric}" stands for the section's headline metric (OA, mIoU)
    tip: str  #: unit and meaning, shown as the header's tooltip in HTML
    value: Callable[[Any], Any]  #: raw cell: int/float for a number (CSV keeps it numeric, HTML sorts by it)
    text: Callable[[Any], str] | None = None  #: display text for Markdown/HTML (default: the value as text)
    where: frozenset[str] = _ALL
    numeric: bool = False  #: a number (right-aligned, sortable by value); otherwise text
    tables: frozenset[str] = frozenset((ACC,))  #: which displayed table(s) of a section show it (ACC, EFF)

    def title(self, metric: str = "") -> str:
        """The display header for a section ranked by ``metric`` (a METRIC_NAMES key or its display name)."""
        return self.header.replace("{metric}", METRIC_NAMES.get(metric, metric))

    def show(self, item: Any) -> str:
        """The cell as displayed ("-" for a missing value)."""
        if self.text is not None:
            return self.text(item)
        v = self.value(item)
        return "-" if v is None or v == "" else str(v)


# -- formatters ---------------------------------------------------------------------------------------------
def pct(v: float | None, digits: int = 2) -> str:
    """A fraction as a percentage string ('-' for None)."""
    return "-" if v is None else f"{100 * v:.{digits}f}"


def si(v: float, digits: int = 3) -> str:
    """A count with the SI prefix that fits and ``digits`` significant digits: 1.48M, 856k, 2.1G, 950."""
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div * (1 - 0.5 * 10 ** -digits):
            return f"{v / div:.{digits}g}{suffix}"
    return f"{v:.{digits}g}"


def num(v: float | None, key: str = "") -> str:
    """A probe figure formatted for a table cell."""
    if v is None:
        return "-"
    if key in ("params", "flops_per_sample"):
        return si(v)
    if key.endswith("score_delta"):
        return f"{100 * v:+.2f}"
    if key.endswith("speedup"):
        return f"{v:.2f}x"
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


def score_text(r: LeaderRow) -> str:
    """'mean ± std' in percent."""
    return pct(r.mean) + (f" ± {pct(r.std)}" if r.std is not None else "")


def ci_text(r: LeaderRow) -> str:
    """The row's 95 % bootstrap interval in percent, '[low, high]' ('-' without one)."""
    return "-" if r.ci is None else f"[{pct(r.ci.low)}, {pct(r.ci.high)}]"


def versus_text(r: LeaderRow) -> str:
    """P(the row above is better) and whether the difference is significant at 95 % ('-' if not compared)."""
    c = r.vs_above
    if c is None:
        return "-"
    return f"{c.prob_a_better:.2f} " + ("(significant)" if c.significant else "(n.s.)")


def loaded_text(r: LeaderRow) -> str:
    """Why the row's speed figures are doubtful: runs probed while the machine was busy ('' when none)."""
    if not r.loaded:
        return ""
    worst = max(r.loaded)
    return (f"{len(r.loaded)} of {r.n} run(s) probed while the 1-minute load average exceeded the core count "
            f"(up to {worst[0]:.1f} on {worst[1]} cores): speeds measured contention, compare with care")


def published_text(r: LeaderRow) -> tuple[str, str]:
    """(published figure with its protocol when it differs from the row's, difference in points)."""
    p = r.published
    if p is None:
        return "-", "-"
    tag = "" if p.protocol == r.protocol else f" ({p.protocol})"
    return f"{pct(p.value)}{tag}", f"{100 * r.delta:+.2f}"


def status_text(status: str, speedup: float | None, delta: float | None) -> str:
    """A bf16/int8 variant cell: 'speed-up, Δ score' when it ran, else why it did not."""
    if status != "ok":
        return status
    return num(speedup, "speedup") + (f", Δ {num(delta, 'score_delta')}" if delta is not None else "")


def counts_text(board: Leaderboard) -> str:
    """'N finished, N failed, N running.'"""
    c = board.counts
    return f"{c.get('finished', 0)} finished, {c.get('failed', 0)} failed, {c.get('running', 0)} running."


def ops_environment_text(ops: Mapping[str, Any]) -> str:
    """The ops micro-benchmark's environment line."""
    env = ops.get("environment") or {}
    return (f"torch {env.get('torch')}, {env.get('threads')} threads, {env.get('cpu')}, cuda={env.get('cuda')}, "
            f"commit {env.get('git_commit')}, {env.get('time')}, malloc mmap threshold "
            f"{env.get('malloc_mmap_threshold')}")


def _seeds_text(r: LeaderRow) -> str:
    seeds = ", ".join(str(s) for s in r.seeds)
    return f"{seeds} ({r.repeats_text})" if r.repeats else seeds


def _hardware_text(r: LeaderRow) -> str:
    return r.hardware + (f"; +{r.other_hardware_runs} run(s) on other hardware" if r.other_hardware_runs else "")


#: Marks a speed figure taken on a busy machine (see loaded_text).
LOADED_MARK = "⚠"
_SPEEDS = ("train_samples_per_s", "infer_samples_per_s", "latency_b1_ms")


def _eff_text(r: LeaderRow, key: str) -> str:
    text = num(r.efficiency[key], key)
    return f"{text} {LOADED_MARK}" if key in _SPEEDS and r.loaded and text != "-" else text


def _eff(key: str, header: str, tip: str, where: frozenset[str] = _ALL) -> Column:
    return Column(key, header, tip, lambda r: r.efficiency[key], lambda r: _eff_text(r, key), where,
                  numeric=True, tables=frozenset((EFF,)))


def _metric(key: str) -> Column:
    convention = (" over every class of the label set, absent classes counting 0 (the published figures' convention; "
                  "CSV: also over the classes present in the ground truth)" if key in ("miou", "macc") else "")
    return Column(key, f"{METRIC_NAMES[key]} %", f"{METRIC_NAMES[key]}{convention}, mean over the seeds, in % (CSV: "
                  "a fraction)", lambda r: r.metrics[key], lambda r: pct(r.metrics[key]), frozenset((MD, CSV)),
                  numeric=True)


def _present(key: str) -> Column:
    return Column(key, PRESENT_NAMES[key], f"{PRESENT_NAMES[key]}: the mean over the classes present in the split's "
                  "ground truth, mean over the seeds (a fraction)", lambda r: r.metrics.get(key), where=_CSV_ONLY,
                  numeric=True)


def _variant(name: str) -> Column:
    return Column(name, name, f"{name} inference: speed-up over fp32 and score change in points, or why it did "
                  "not run", lambda r: r.efficiency[f"{name}_speedup"],
                  lambda r: status_text(getattr(r, f"{name}_status"), r.efficiency[f"{name}_speedup"],
                                        r.efficiency[f"{name}_score_delta"]), _SHOWN, numeric=True,
                  tables=frozenset((EFF,)))


#: The leaderboard of each dataset and protocol, shown as two tables (ACC: scores, EFF: costs), and
#: leaderboard.csv (every row, one line each, every column).
_BOTH = frozenset((ACC, EFF))
LEADER_COLUMNS: tuple[Column, ...] = (
    Column("dataset", "dataset", "pcbench data config", lambda r: r.dataset, where=_CSV_ONLY),
    Column("protocol", "protocol", "split and checkpoint selection (see the section heading)",
           lambda r: r.protocol, where=_CSV_ONLY),
    Column("rank", "#", "rank by the headline metric within the dataset and protocol; rows whose difference is "
           "not significant at 95 % (paired bootstrap) share a rank such as 2-3", lambda r: r.rank,
           lambda r: r.rank_label or str(r.rank), numeric=True, tables=_BOTH),
    Column("shared_rank", "shared rank", "rank shared with adjacent rows whose difference is not significant",
           lambda r: r.rank_label, where=_CSV_ONLY),
    Column("model", "model", "pcbench model config [sweep variant]",
           lambda r: r.model, lambda r: r.label, tables=_BOTH),
    Column("variant", "variant", "sweep variant", lambda r: r.variant, where=_CSV_ONLY),
    Column("recipe", "recipe", "paper recipe the run follows", lambda r: r.recipe, where=_CSV_ONLY),
    Column("fidelity", "fidelity", "reference: runs what its source ran; pcbench variant: a documented deviation",
           lambda r: r.fidelity, where=_CSV_ONLY),
    Column("recipe_fidelity", "recipe / fidelity", "the paper recipe the run follows, and its fidelity: "
           "reference = runs what its source ran; pcbench variant = a documented deviation",
           lambda r: r.recipe, lambda r: " / ".join(x for x in (r.recipe, r.fidelity) if x) or "-", _SHOWN),
    Column("task", "task", "cls or seg", lambda r: r.task, where=_CSV_ONLY),
    Column("metric", "metric", "headline metric the rows are ranked by", lambda r: r.metric, where=_CSV_ONLY),
    Column("mean", "{metric} % (mean ± std)", "headline metric in %: mean ± sample std over the seeds (training "
           "noise) (CSV: the mean as a fraction)", lambda r: r.mean, score_text, numeric=True),
    Column("std", "std", "sample std of the headline metric over the seeds (a fraction)", lambda r: r.std,
           where=_CSV_ONLY, numeric=True),
    Column("ci", "95 % CI", "95 % percentile-bootstrap interval of the headline metric in %, over the test items "
           "(samples / scenes), seeds pooled: how much the score depends on which items are in the split",
           lambda r: r.ci.low if r.ci else None, ci_text, _SHOWN, numeric=True),
    Column("ci_low", "CI low", "95 % bootstrap interval, lower end (a fraction)",
           lambda r: r.ci.low if r.ci else None, where=_CSV_ONLY, numeric=True),
    Column("ci_high", "CI high", "95 % bootstrap interval, upper end (a fraction)",
           lambda r: r.ci.high if r.ci else None, where=_CSV_ONLY, numeric=True),
    Column("ci_note", "CI note", "why the row has no interval", lambda r: r.ci_note, where=_CSV_ONLY),
    Column("n", "n", "distinct seeds counted", lambda r: r.n, numeric=True),
    Column("p_above_better", "P(above better)", "paired bootstrap against the row ranked just above: the share of "
           "resamples where that row scores higher; 'significant' when the 95 % interval of the difference "
           "excludes 0, 'n.s.' otherwise (then the two share a rank)",
           lambda r: r.vs_above.prob_a_better if r.vs_above else None, versus_text, numeric=True),
    Column("significant_vs_above", "significant vs above", "the difference to the row above is significant at 95 %",
           lambda r: None if r.vs_above is None else r.vs_above.significant, where=_CSV_ONLY),
    Column("seeds", "seeds", "the seeds counted; a seed recorded more than once counts by its latest run",
           lambda r: " ".join(str(s) for s in r.seeds), _seeds_text, frozenset((MD, CSV))),
    Column("config", "config", "what sets this row apart from rows of the same model: its swept values or its "
           "differing config keys", lambda r: r.differs),
    *(_metric(k) for k in METRIC_NAMES),
    *(_present(k) for k in PRESENT_NAMES),
    Column("published", "published %", "the published figure (its protocol in brackets when it differs)",
           lambda r: r.published.value if r.published else None, lambda r: published_text(r)[0], numeric=True),
    Column("published_protocol", "published protocol", "protocol of the published figure",
           lambda r: r.published.protocol if r.published else "", where=_CSV_ONLY),
    Column("published_source", "published source", "where the published figure was read",
           lambda r: r.published.source if r.published else "", where=_CSV_ONLY),
    Column("delta", "Δ pts", "ours minus published, in points (CSV: a fraction)", lambda r: r.delta,
           lambda r: published_text(r)[1], numeric=True),
    _eff("params", "params", "trainable parameters (k = 10^3, M = 10^6)"),
    _eff("flops_per_sample", "FLOPs/sample", "forward FLOPs of one sample (k, M, G = 10^3, 10^6, 10^9)"),
    _eff("train_samples_per_s", "train samples/s", "training throughput, samples per second (median over the "
         f"row's runs; {LOADED_MARK}: probed on a busy machine)"),
    _eff("infer_samples_per_s", "infer samples/s", "inference throughput, samples per second (median over the "
         f"row's runs; {LOADED_MARK}: probed on a busy machine)"),
    _eff("latency_b1_ms", "latency ms", f"latency of one sample at batch size 1, milliseconds ({LOADED_MARK}: probed "
         "on a busy machine)"),
    _eff("train_peak_mib", "train peak +MiB", "increase of peak memory during one training step over the memory "
         "in use before it, MiB: on CPU the peak RSS increase (VmHWM after the step minus VmRSS before), on CUDA "
         "the increase of torch's max_memory_allocated; not the process's total (pcbench/bench/probe.py)"),
    _eff("infer_peak_mib", "infer peak +MiB", "increase of peak memory during inference over the memory in use "
         "before it, MiB (measured as train peak +MiB)", frozenset((CSV, HTML))),
    _eff("bf16_speedup", "bf16 speed-up", "bf16 inference speed over fp32", _CSV_ONLY),
    _eff("bf16_score_delta", "bf16 Δscore (points)", "bf16 minus fp32 score (CSV: a fraction)", _CSV_ONLY),
    _eff("int8_speedup", "int8 speed-up", "int8 inference speed over fp32", _CSV_ONLY),
    _eff("int8_score_delta", "int8 Δscore (points)", "int8 minus fp32 score (CSV: a fraction)", _CSV_ONLY),
    _variant("bf16"),
    _variant("int8"),
    Column("int8_status", "int8 status", "ok, or why int8 did not run", lambda r: r.int8_status, where=_CSV_ONLY),
    Column("bf16_status", "bf16 status", "ok, or why bf16 did not run", lambda r: r.bf16_status, where=_CSV_ONLY),
    Column("hardware", "hardware", "the hardware most of the row's runs used (efficiency figures are from it)",
           lambda r: r.hardware, _hardware_text, tables=frozenset((EFF,))),
    Column("speed_loaded", "speed loaded", "runs probed while the load average exceeded the core count",
           lambda r: loaded_text(r), where=_CSV_ONLY),
    Column("seed_repeats", "seed repeats", "seeds recorded more than once (the latest counts)",
           lambda r: r.repeats_text, where=_CSV_ONLY),
    Column("config_sha256s", "config sha256s", "each counted run's resolved-config hash",
           lambda r: " ".join(str(x["config_sha256"]) for x in r.runs), where=_CSV_ONLY),
    Column("identity_sha256", "identity sha256", "the row's configuration identity (config hash without seed and "
           "placement keys)", lambda r: r.identity, where=_CSV_ONLY),
)


def table_columns(output: str, table: str) -> list[Column]:
    """The columns ``output`` (MD or HTML) shows in a section's ``table`` (ACC or EFF), in order."""
    return [c for c in LEADER_COLUMNS if output in c.where and table in c.tables]


def legend_text(cols: list[Column], metric: str = "") -> str:
    """Each column's header and what it measures, for a legend under a Markdown table."""
    return "; ".join(f"**{c.title(metric)}**: {c.tip}" for c in cols if c.tip)


def csv_columns() -> tuple[str, ...]:
    """leaderboard.csv's header, in order."""
    return tuple(c.name for c in LEADER_COLUMNS if CSV in c.where)


#: Failed cells (Markdown and HTML), one record each.
FAILED_COLUMNS: tuple[Column, ...] = (
    Column("suite", "suite", "benchmark suite", lambda f: f.get("suite")),
    Column("cell", "cell", "suite cell", lambda f: f["cell"]),
    Column("model", "model", "pcbench model config", lambda f: f.get("model")),
    Column("dataset", "dataset", "pcbench data config", lambda f: f.get("dataset")),
    Column("seed", "seed", "seed", lambda f: f.get("seed"), numeric=True),
    Column("error", "error", "the exception, first 300 characters", lambda f: (f.get("error") or "")[:300]),
    Column("log", "log", "the run's log file", lambda f: f.get("log_path")),
)

#: Published figures (Markdown and HTML), one ``Published`` each.
PUBLISHED_COLUMNS: tuple[Column, ...] = (
    Column("model", "model", "pcbench model config", lambda p: p.model),
    Column("dataset", "dataset", "pcbench data config", lambda p: p.dataset),
    Column("metric", "metric", "metric", lambda p: METRIC_NAMES[p.metric]),
    Column("value", "value %", "the published figure", lambda p: p.value, lambda p: pct(p.value), numeric=True),
    Column("protocol", "protocol", "split and checkpoint selection", lambda p: p.protocol),
    Column("source", "source", "repository file @ commit, or paper and table", lambda p: p.source),
    Column("checked", "checked", "source: read at the named commit; paper: from the paper's table",
           lambda p: p.checked),
    Column("note", "note", "protocol details", lambda p: p.note),
)

#: The ops micro-benchmark (Markdown and HTML), one row of ops.json each.
OPS_COLUMNS: tuple[Column, ...] = (
    Column("op", "op", "operation", lambda o: o.get("op")),
    Column("case", "case", "input size", lambda o: o.get("case")),
    Column("impl", "impl", "implementation", lambda o: o.get("impl")),
    Column("median_ms", "median ms", "median time, milliseconds", lambda o: o.get("median_ms"),
           lambda o: f"{o['median_ms']:.3f}" if o.get("median_ms") is not None else f"failed ({o.get('error')})",
           numeric=True),
    Column("ratio_to_fastest_peer", "ratio to fastest peer", "time over the fastest other implementation",
           lambda o: o.get("ratio_to_fastest_peer"),
           lambda o: f"{o['ratio_to_fastest_peer']:.2f}x" if o.get("ratio_to_fastest_peer") is not None else "-",
           numeric=True),
    Column("note", "note", "", lambda o: o.get("note") or "", lambda o: o.get("note") or ""),
)


#: What a published-weights section is, said once for Markdown and HTML.
WEIGHTS_NOTE = ("Checkpoints the authors published, converted and evaluated under pcbench's protocol (no training); "
                "not ranked with trained rows. Δ = ours − published (points).")
#: A published checkpoint evaluated by pcbench (leaderboard.WeightsRow): ours beside the authors' figure, unranked.
WEIGHTS_COLUMNS: tuple[Column, ...] = (
    Column("weights", "weights", "the published checkpoint (pcbench-weights list)", lambda w: w.weights),
    Column("model", "model", "pcbench model config it was converted to", lambda w: w.model),
    Column("protocol", "protocol", "pcbench's protocol: test (one pass) or test_vote (TTA passes)",
           lambda w: w.protocol),
    Column("score", "ours", "pcbench's evaluation of the weights, %", lambda w: 100 * w.score,
           lambda w: f"{100 * w.score:.2f} {METRIC_NAMES[w.metric]}", numeric=True),
    Column("published", "published", "the authors' figure for these weights, %", lambda w: w.published_value,
           lambda w: "-" if w.published_value is None else f"{w.published_value:.2f} ({w.published_metric})",
           numeric=True),
    Column("delta", "Δ", "ours − published, points", lambda w: w.delta,
           lambda w: "-" if w.delta is None else f"{w.delta:+.2f}", numeric=True),
    Column("published_protocol", "published protocol", "how and where the authors measured their figure",
           lambda w: f"{w.published_protocol}; {w.published_source}"),
    Column("sha256", "source sha256", "sha256 of the converted source file (first 12 digits)",
           lambda w: (w.sha256 or "unknown")[:12]),
)
