"""Leaderboard files from the results store: ``leaderboard.md``, ``leaderboard.csv`` and ``leaderboard.html``.

What the rows are (configuration identities, seeds, protocols) is decided in ``pcbench.bench.leaderboard``; which
columns each file shows, with which header and format, in ``pcbench.bench.report_columns``. This module writes
the Markdown and CSV text and the three files; ``pcbench.bench.report_html`` renders the page.

Exported text is safe to open: Markdown cells escape HTML (``<``, ``>``, ``&``) and table pipes, so a model or
error text from an imported record cannot inject markup; CSV text cells that a spreadsheet would run as a
formula (starting with ``=``, ``+``, ``-``, ``@``, tab or CR) get a leading single quote and every text cell is
quoted, as the OWASP "CSV Injection" page advises, while numbers stay plain numbers.
"""

from __future__ import annotations

import csv
import html
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pcbench.bench import report_columns as spec
from pcbench.bench.comparisons import method_text
from pcbench.bench.leaderboard import (
    HEADLINE,
    METRIC_NAMES,
    Leaderboard,
    LeaderRow,
    build_leaderboard,
    split_text,
)
from pcbench.bench.report_columns import (
    CSV,
    MD,
    Column,
    ci_text,
    counts_text,
    csv_columns,
    loaded_text,
    ops_environment_text,
    pct,
    score_text,
)
from pcbench.bench.report_html import render_html
from pcbench.bench.report_sections import (
    ROBUSTNESS_TEXT,
    corruption_kinds,
    primary_sections,
    robustness_rows,
    sweep_groups,
    sweep_value_text,
)
from pcbench.io import write_text

__all__ = ["CSV_COLUMNS", "HEADLINE", "LeaderRow", "Leaderboard", "build_leaderboard", "csv_text", "load_ops",
           "md_text", "render_csv", "render_markdown", "render_weights_csv", "write_report"]

CSV_COLUMNS = csv_columns()
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


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


# -- CSV ----------------------------------------------------------------------------------------------------
def csv_text(value: Any) -> str:
    """A text cell a spreadsheet shows as text: a quote before a leading =, +, -, @, tab or CR (OWASP advice)."""
    s = "" if value is None else str(value)
    return "'" + s if s.startswith(_FORMULA_START) else s


def _csv_cell(col: Column, row: LeaderRow) -> Any:
    v = col.value(row)
    if col.numeric and isinstance(v, (int, float)) and not isinstance(v, bool):
        return v  # a number stays a number (-0.5 is not a formula); csv writes floats with repr, exactly
    return csv_text(v)


def render_csv(board: Leaderboard) -> str:
    """One line per leaderboard row; metrics as fractions, efficiency in raw units; text cells quoted."""
    cols = [c for c in spec.LEADER_COLUMNS if CSV in c.where]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC)
    w.writerow([c.name for c in cols])
    for _, _, rows in board.sections():
        for r in rows:
            w.writerow([_csv_cell(c, r) for c in cols])
    return buf.getvalue()


WEIGHTS_CSV_COLUMNS = ("dataset", "protocol", "weights", "model", "metric", "score", "published_value",
                       "delta_points", "published_metric", "published_protocol", "published_source", "sha256",
                       "result_id", "cell")


def render_weights_csv(board: Leaderboard) -> str:
    """Published checkpoints evaluated by pcbench, one line per (checkpoint, protocol): ``score`` a fraction,
    ``published_value`` the authors' figure in %, ``delta_points`` ours minus published in points; never ranked,
    so apart from leaderboard.csv."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC)
    w.writerow(WEIGHTS_CSV_COLUMNS)
    for _, rows in board.weights_sections():
        for r in rows:
            values = {"delta_points": r.delta, **{k: getattr(r, k) for k in WEIGHTS_CSV_COLUMNS if k != "delta_points"}}
            w.writerow([v if isinstance(v, (int, float)) and not isinstance(v, bool) else csv_text(v)
                        for v in (values[k] for k in WEIGHTS_CSV_COLUMNS)])
    return buf.getvalue()


# -- Markdown -----------------------------------------------------------------------------------------------
def md_text(value: Any) -> str:
    """Text safe inside a Markdown table cell or line: HTML escaped, pipes and backslashes escaped, one line."""
    s = str(value).replace("\\", "\\\\")
    s = html.escape(s, quote=False).replace("|", "\\|")
    return " ".join(s.splitlines()) if ("\n" in s or "\r" in s) else s


def _md_table(cols: Sequence[Column], items: Iterable[Any], metric: str = "") -> list[str]:
    cols = [c for c in cols if MD in c.where]
    out = ["| " + " | ".join(md_text(c.title(metric)) for c in cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(md_text(c.show(x)) for c in cols) + " |" for x in items]
    return out


def _legend(cols: Sequence[Column], metric: str) -> list[str]:
    return [f"<sub>{md_text(spec.legend_text([c for c in cols if MD in c.where], METRIC_NAMES[metric]))}</sub>", ""]


def _sweep_markdown(dataset: str, rows: list[LeaderRow]) -> list[str]:
    out: list[str] = []
    for key, models in sweep_groups(rows).items():
        metric = METRIC_NAMES[rows[0].metric]
        out += [f"### {md_text(dataset)}: sweep of `{md_text(key)}`", "",
                f"| model | {md_text(key)} | {metric} % (mean ± std) | 95 % CI | n | train samples/s |",
                "|---|---|---|---|---|---|"]
        for m in models:
            out.append(f"| **{md_text(m.name)}** | | | | | |")
            for value, r in m.points:
                out.append(f"| | {md_text(sweep_value_text(value))} | {score_text(r)} | {ci_text(r)} | {r.n} | "
                           f"{md_text(spec.num(r.efficiency['train_samples_per_s']))} |")
        out += ["", f"<sub>The rows of each model along `{md_text(key)}` (its other config as the row's; each "
                "value is its own configuration identity); train samples/s as in the efficiency table.</sub>", ""]
    return out


def _robustness_markdown(dataset: str, rows: list[LeaderRow]) -> list[str]:
    found = robustness_rows(rows)
    if not found:
        return []
    kinds = corruption_kinds(found)
    out = [f"### {md_text(dataset)}: corruption robustness (ModelNet-C)", "",
           "| model | clean OA % | " + " | ".join(md_text(k) for k in kinds) + " | mCE | relative mCE | runs |",
           "|" + "---|" * (len(kinds) + 5)]
    for r in found:
        c = r.corruptions
        cells = [pct(sum(c[k]) / len(c[k])) for k in kinds]
        out.append(f"| {md_text(r.label)} | {pct(c.get('clean_oa'))} | " + " | ".join(cells)
                   + f" | {_fixed(c.get('mce'))} | {_fixed(c.get('relative_mce'))} | {c['runs']} |")
    return [*out, "", f"<sub>{md_text(ROBUSTNESS_TEXT)}</sub>", ""]


def _fixed(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def render_markdown(board: Leaderboard, title: str = "pcbench leaderboard") -> str:
    """Markdown: per dataset and protocol an accuracy and an efficiency table with legends, sweeps, robustness,
    failed cells, published figures, ops table."""
    out = [f"# {md_text(title)}", "", f"{counts_text(board)} Scores in %, mean ± sample std over distinct seeds "
           "of one configuration; Δ = ours − published (points); published protocol in brackets when it differs "
           "from the table's.", "", md_text(method_text(board.resamples)), ""]
    out += [f"- {md_text(n)}" for n in board.notes] + ([""] if board.notes else [])
    primary = {(d, p) for d, p, _ in primary_sections(board)}
    for dataset, protocol, rows in board.sections():
        metric = rows[0].metric
        none = "" if any(r.ci for r in rows) or not board.resamples else \
            f" No confidence intervals in this section: {md_text(rows[0].ci_note)}."
        out += [f"## {md_text(dataset)} — {md_text(protocol)}: {md_text(split_text(rows, protocol))}", "",
                f"Ranked by {METRIC_NAMES[metric]}.{none}", ""]
        acc, eff = spec.table_columns(MD, spec.ACC), spec.table_columns(MD, spec.EFF)
        out += ["### Accuracy", "", *_md_table(acc, rows, metric), "", *_legend(acc, metric)]
        out += ["### Efficiency", "", *_md_table(eff, rows, metric), "", *_legend(eff, metric)]
        loaded = [f"- {md_text(r.label)}: {md_text(loaded_text(r))}" for r in rows if r.loaded]
        if loaded:
            out += [f"{spec.LOADED_MARK} Speed figures taken on a busy machine:", "", *loaded, ""]
        if (dataset, protocol) in primary:
            out += _sweep_markdown(dataset, rows) + _robustness_markdown(dataset, rows)
    out += weights_markdown(board)
    if board.failed:
        out += ["## Failed cells", "", *_md_table(spec.FAILED_COLUMNS, board.failed), ""]
    out += ["## Published figures", "", *_md_table(spec.PUBLISHED_COLUMNS, board.published), ""]
    if board.ops:
        out += ops_markdown(board.ops)
    return "\n".join(out) + "\n"


def weights_markdown(board: Leaderboard) -> list[str]:
    """Per dataset the published checkpoints pcbench evaluated, beside the authors' figure (never ranked)."""
    out: list[str] = []
    for dataset, rows in board.weights_sections():
        out += [f"## {md_text(dataset)} — published weights, evaluated by pcbench", "", md_text(spec.WEIGHTS_NOTE), "",
                *_md_table(spec.WEIGHTS_COLUMNS, rows), ""]
    return out


def ops_markdown(ops: Mapping[str, Any]) -> list[str]:
    """The ops micro-benchmark rows as Markdown lines."""
    return [f"## Ops micro-benchmark ({md_text(ops.get('title', 'ops'))})", "", md_text(ops_environment_text(ops)),
            "", *_md_table(spec.OPS_COLUMNS, ops.get("rows", [])), ""]


def write_report(records: Iterable[Mapping[str, Any]], out: str | os.PathLike[str], *,
                 ops: str | os.PathLike[str] | None = None, title: str = "pcbench leaderboard",
                 source: str = "") -> dict[str, Path]:
    """Write leaderboard.md / .csv / .html into ``out`` (and published_weights.csv where the records hold
    published checkpoints evaluated by pcbench); returns their paths."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={out} is a file; give a folder for leaderboard.md/.csv/.html")
    board = build_leaderboard(records, load_ops(ops) if ops is not None else None)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "leaderboard.md", "csv": out / "leaderboard.csv", "html": out / "leaderboard.html"}
    write_text(paths["md"], render_markdown(board, title))
    write_text(paths["csv"], render_csv(board))
    write_text(paths["html"], render_html(board, title, source))
    weights_csv = out / "published_weights.csv"
    if board.weights:
        paths["weights_csv"] = weights_csv
        write_text(weights_csv, render_weights_csv(board))
    else:  # an older report's file would describe records this one no longer holds
        weights_csv.unlink(missing_ok=True)
    return paths
