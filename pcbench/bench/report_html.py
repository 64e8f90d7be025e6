"""The leaderboard as one self-contained HTML page: sortable tables, hand-made SVG plots, no network needed.

Hand-made SVG instead of a plotting library: the plots are scatter plots and one heat map, a few dozen lines
each, and the page stays small (no multi-megabyte bundled JavaScript) and opens offline in any browser.
"""

from __future__ import annotations

import datetime as _dt
import html
import math
from collections.abc import Sequence
from typing import Any

from pcbench.bench import report_columns as spec
from pcbench.bench.leaderboard import METRIC_NAMES, Leaderboard, LeaderRow
from pcbench.bench.published import PROTOCOLS
from pcbench.bench.report_columns import HTML, Column, counts_text, num, ops_environment_text, pct, score_text

__all__ = ["heatmap_svg", "render_html", "scatter_svg"]

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
_VIRIDIS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222;max-width:1500px}
h1{font-size:1.5em;margin-bottom:4px}h2{font-size:1.2em;margin-top:32px;border-bottom:1px solid #ddd}
.meta{color:#555;font-size:.9em}.proto{color:#555;font-size:.9em;margin:4px 0 8px}
table{border-collapse:collapse;font-size:.85em;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:right;vertical-align:top;white-space:nowrap}
td.wrap{white-space:normal;max-width:420px}.scroll{overflow-x:auto;max-width:100%}
td.l,th.l{text-align:left}th{background:#f3f3f3;cursor:pointer;user-select:none;white-space:nowrap}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
tr:hover td{background:#fafaf0}
button.prov-toggle{border:0;background:none;padding:0;font:inherit;color:#0645ad;cursor:pointer}
button.prov-toggle::before{content:"\\25B8 "}button.prov-toggle[aria-expanded=true]::before{content:"\\25BE "}
table.prov{font-size:.9em;margin:4px 0}table.prov td{text-align:left;border-color:#eee}
.badge{font-size:.8em;padding:0 4px;border-radius:3px;background:#eef}.variant{background:#fee}
.plots{display:flex;flex-wrap:wrap;gap:16px}svg{background:#fff;border:1px solid #eee}
.warn{color:#a33}.small{font-size:.8em;color:#666}
"""

_JS = """
document.querySelectorAll("table.sortable").forEach(function (t) {
  var heads = t.tHead.rows[0].cells;
  Array.prototype.forEach.call(heads, function (th, i) {
    th.addEventListener("click", function () {
      var body = t.tBodies[0];
      var rows = Array.prototype.filter.call(body.rows, function (r) { return !r.classList.contains("prov-row"); });
      var detail = rows.map(function (r) {
        var n = r.nextElementSibling;
        return n && n.classList.contains("prov-row") ? n : null;
      });
      var asc = th.getAttribute("aria-sort") !== "ascending";
      Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", asc ? "ascending" : "descending");
      function key(r) {
        var c = r.cells[i], v = c.getAttribute("data-v");
        if (v !== null && v !== "") { return parseFloat(v); }
        return c.textContent.trim().toLowerCase();
      }
      var order = rows.map(function (r, k) { return k; });
      order.sort(function (a, b) {
        var x = key(rows[a]), y = key(rows[b]), xn = typeof x === "number", yn = typeof y === "number";
        if (xn && yn) { return asc ? x - y : y - x; }
        if (xn) { return -1; }
        if (yn) { return 1; }
        return asc ? x.localeCompare(y) : y.localeCompare(x);
      });
      order.forEach(function (k) {
        body.appendChild(rows[k]);
        if (detail[k]) { body.appendChild(detail[k]); }
      });
    });
  });
});
document.querySelectorAll("button.prov-toggle").forEach(function (b) {
  b.addEventListener("click", function () {
    var row = b.closest("tr").nextElementSibling, open = row.hidden;
    row.hidden = !open;
    b.setAttribute("aria-expanded", open ? "true" : "false");
  });
});
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _viridis(t: float) -> str:
    t = min(1.0, max(0.0, t)) * (len(_VIRIDIS) - 1)
    i = min(int(t), len(_VIRIDIS) - 2)
    f = t - i
    rgb = [round(a + (b - a) * f) for a, b in zip(_VIRIDIS[i], _VIRIDIS[i + 1], strict=True)]
    return "#" + "".join(f"{c:02x}" for c in rgb)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    span = hi - lo
    step = 10 ** math.floor(math.log10(span / n))
    for m in (1, 2, 5, 10):
        if span / (step * m) <= n:
            step *= m
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]



def _point_label(x: float, y: float, label: str, right_half: bool) -> str:
    """A dot's label on the side facing the plot's centre, so labels near the right edge are not cut off."""
    if right_half:
        return f'<text x="{x - 7:.1f}" y="{y - 6:.1f}" font-size="10" fill="#333" text-anchor="end">{_e(label)}</text>'
    return f'<text x="{x + 7:.1f}" y="{y - 6:.1f}" font-size="10" fill="#333">{_e(label)}</text>'

def scatter_svg(points: Sequence[dict[str, Any]], *, xlabel: str, ylabel: str, title: str, logx: bool = True,
                width: int = 470, height: int = 310) -> str:
    """Scatter plot: each point a dict with label, x, y, yerr (or None), color, tip; log x axis by default."""
    pts = [p for p in points if p["x"] is not None and p["y"] is not None and (not logx or p["x"] > 0)]
    ml, mr, mt, mb = 58, 16, 30, 44
    pw, ph = width - ml - mr, height - mt - mb
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'class="plot" aria-label="{_e(title)}">',
           f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="13" font-weight="bold">{_e(title)}</text>']
    if not pts:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" font-size="12" fill="#888">'
                   "no data</text></svg>")
        return "".join(out)
    xs = [math.log10(p["x"]) if logx else p["x"] for p in pts]
    x0, x1 = (math.floor(min(xs)), math.ceil(max(xs))) if logx else (min(xs), max(xs))
    if x1 - x0 < 1e-12:
        x0, x1 = x0 - 1, x1 + 1
    lows = [p["y"] - (p.get("yerr") or 0) for p in pts]
    highs = [p["y"] + (p.get("yerr") or 0) for p in pts]
    pad = max(0.005, (max(highs) - min(lows)) * 0.12)
    y0, y1 = max(0.0, min(lows) - pad), min(1.0, max(highs) + pad)
    if y1 - y0 < 1e-9:
        y0, y1 = max(0.0, y0 - 0.01), min(1.0, y1 + 0.01)

    def sx(v: float) -> float:
        return ml + ((math.log10(v) if logx else v) - x0) / (x1 - x0) * pw

    def sy(v: float) -> float:
        return mt + (1 - (v - y0) / (y1 - y0)) * ph

    out.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
    for t in _nice_ticks(y0 * 100, y1 * 100):
        y = sy(t / 100)
        out.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                   f'<text x="{ml - 4}" y="{y + 4:.1f}" text-anchor="end" font-size="10">{t:g}</text>')
    xticks = [10.0 ** k for k in range(int(x0), int(x1) + 1)] if logx else _nice_ticks(x0, x1)
    for t in xticks:
        x = sx(t)
        lab = _si(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{mt}" y2="{mt + ph}" stroke="#eee"/>'
                   f'<text x="{x:.1f}" y="{mt + ph + 14}" text-anchor="middle" font-size="10">{lab}</text>')
    out.append(f'<text x="{ml + pw / 2}" y="{height - 8}" text-anchor="middle" font-size="11">{_e(xlabel)}</text>'
               f'<text x="14" y="{mt + ph / 2}" text-anchor="middle" font-size="11" '
               f'transform="rotate(-90 14 {mt + ph / 2})">{_e(ylabel)}</text>')
    for p in pts:
        x, y = sx(p["x"]), sy(p["y"])
        if p.get("yerr"):
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{sy(p["y"] - p["yerr"]):.1f}" '
                       f'y2="{sy(p["y"] + p["yerr"]):.1f}" stroke="{p["color"]}" stroke-width="1.5"/>')
        out.append(f'<circle class="pt" cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{p["color"]}" fill-opacity=".85">'
                   f'<title>{_e(p["tip"])}</title></circle>'
                   + _point_label(x, y, p["label"], right_half=x > ml + pw / 2))
    out.append("</svg>")
    return "".join(out)


def _si(v: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:g}{suffix}"
    return f"{v:g}"


def heatmap_svg(rows: Sequence[LeaderRow], title: str) -> str:
    """Per-class IoU (mean over runs) of each row as colored cells; class names across the top."""
    rows = [r for r in rows if r.iou_per_class]
    if not rows:
        return ""
    ncls = max(len(r.iou_per_class) for r in rows)
    names = next((r.class_names for r in rows if r.class_names and len(r.class_names) == ncls), None) \
        or [f"class {i}" for i in range(ncls)]
    cw, chh, left, top = 26, 20, 190, 110
    width, height = left + cw * ncls + 70, top + chh * len(rows) + 20
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" class="heatmap" '
           f'aria-label="{_e(title)}"><text x="4" y="16" font-size="13" font-weight="bold">{_e(title)}</text>']
    for j, name in enumerate(names):
        x = left + j * cw + cw / 2
        out.append(f'<text x="{x}" y="{top - 6}" font-size="10" transform="rotate(-55 {x} {top - 6})">'
                   f"{_e(name)}</text>")
    for i, r in enumerate(rows):
        y = top + i * chh
        out.append(f'<text x="{left - 6}" y="{y + 14}" font-size="11" text-anchor="end">{_e(r.label)}</text>')
        for j, v in enumerate(r.iou_per_class):
            if v is None:  # class absent from every run's split
                out.append(f'<rect class="cell" x="{left + j * cw}" y="{y}" width="{cw - 1}" height="{chh - 1}" '
                           f'fill="#ddd"><title>{_e(r.label)} / {_e(names[j])}: absent</title></rect>')
                continue
            fill = _viridis(v)
            ink = "#000" if v > 0.6 else "#fff"
            out.append(f'<rect class="cell" x="{left + j * cw}" y="{y}" width="{cw - 1}" height="{chh - 1}" '
                       f'fill="{fill}"><title>{_e(r.label)} / {_e(names[j])}: IoU {pct(v)}%</title></rect>'
                       f'<text x="{left + j * cw + cw / 2}" y="{y + 14}" font-size="9" text-anchor="middle" '
                       f'fill="{ink}" pointer-events="none">{round(100 * v)}</text>')
    lx = left + cw * ncls + 12
    for k in range(11):
        out.append(f'<rect x="{lx}" y="{top + (10 - k) * 8}" width="14" height="8" fill="{_viridis(k / 10)}"/>')
    out.append(f'<text x="{lx + 18}" y="{top + 8}" font-size="9">100</text>'
               f'<text x="{lx + 18}" y="{top + 88}" font-size="9">0</text></svg>')
    return "".join(out)


def _td(text: Any, value: Any = None, cls: str = "", extra: str = "") -> str:
    v = f' data-v="{value:.10g}"' if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
    c = f' class="{cls}"' if cls else ""
    return f"<td{c}{v}{extra}>{_e(text)}</td>"


def _th(col: Column, metric: str = "") -> str:
    tip = f' title="{_e(col.tip)}"' if col.tip else ""
    return f"<th class='{'' if col.numeric else 'l'}'{tip}>{_e(col.title(metric))}</th>"


def _provenance(r: LeaderRow) -> str:
    keys = [k for k in r.runs[0] if any(run.get(k) is not None for run in r.runs)]
    head = "".join(f"<th class='l'>{_e(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{_e(run.get(k) if run.get(k) is not None else '-')}</td>" for k in keys)
                   + "</tr>" for run in r.runs)
    return f"<table class='prov'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _row_tip(r: LeaderRow) -> str:
    first = r.runs[0]
    seeds = ", ".join(str(s) for s in r.seeds)
    repeats = f" ({r.repeats_text})" if r.repeats else ""
    return (f"{r.label}: {r.n} seed(s), seeds {seeds}{repeats}; commit {first.get('git_commit')}, pcbench "
            f"{first.get('pcbench_version')}, torch {first.get('torch_version')}, {r.hardware}, allocator "
            f"{first.get('allocator')}, host {first.get('hostname')}")


def _leader_cell(col: Column, r: LeaderRow) -> str:
    """One cell of a leaderboard table: the spec's text and sort value, with the page's interactive bits."""
    if col.name == "model":
        return (f"<td class='l'><button class='prov-toggle' aria-expanded='false' title='show the runs and their "
                f"provenance'>{_e(col.show(r))}</button></td>")
    if col.name == "fidelity" and r.fidelity:
        return (f"<td class='l'><span class='badge{' variant' if r.fidelity == 'pcbench variant' else ''}'>"
                f"{_e(r.fidelity)}</span></td>")
    extra = ""
    if col.name == "published" and r.published is not None:
        extra = f' title="{_e(r.published.source + (" — " + r.published.note if r.published.note else ""))}"'
    return _td(col.show(r), col.value(r) if col.numeric else None, "" if col.numeric else "l", extra)


def _leader_table(rows: Sequence[LeaderRow], sid: str) -> str:
    cols = [c for c in spec.LEADER_COLUMNS if HTML in c.where]
    th = "".join(_th(c, rows[0].metric) for c in cols)
    body = [f"<tr class='main' title=\"{_e(_row_tip(r))}\">{''.join(_leader_cell(c, r) for c in cols)}</tr>"
            f"<tr class='prov-row' hidden><td class='l' colspan='{len(cols)}'>{_provenance(r)}</td></tr>"
            for r in rows]
    return (f"<div class='scroll'><table class='sortable leaderboard' id='{sid}'><thead><tr>{th}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _plots(rows: Sequence[LeaderRow], dataset: str, protocol: str) -> str:
    models = sorted({r.model for r in rows})
    color = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(models)}
    metric = METRIC_NAMES[rows[0].metric]

    def pts(key: str, unit: str) -> list[dict[str, Any]]:
        return [{"label": r.label, "x": r.efficiency[key], "y": r.mean, "yerr": r.std, "color": color[r.model],
                 "tip": f"{r.label}{f' ({r.differs})' if r.differs else ''}: {metric} {score_text(r)} % "
                        f"(n={r.n}), {num(r.efficiency[key], key)} {unit}, {r.hardware}"} for r in rows]

    a = scatter_svg(pts("train_samples_per_s", "train samples/s"), xlabel="training samples/s (log)",
                    ylabel=f"{metric} %", title=f"{dataset} {protocol}: {metric} vs training throughput")
    b = scatter_svg(pts("params", "parameters"), xlabel="parameters (log)", ylabel=f"{metric} %",
                    title=f"{dataset} {protocol}: {metric} vs parameters")
    return f"<div class='plots'>{a}{b}</div>"


def _simple_table(cols: Sequence[Column], items: Sequence[Any], cls: str) -> str:
    cols = [c for c in cols if HTML in c.where]
    th = "".join(_th(c) for c in cols)
    body = "".join("<tr>" + "".join(_td(c.show(x), c.value(x) if c.numeric else None, "" if c.numeric else "l wrap")
                                    for c in cols) + "</tr>" for x in items)
    return f"<table class='sortable {cls}'><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def render_html(board: Leaderboard, title: str = "pcbench leaderboard", source: str = "") -> str:
    """The whole page as one string (inline CSS, inline JS, inline SVG)."""
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
             f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{_CSS}</style></head><body>",
             f"<h1>{_e(title)}</h1><p class='meta'>Generated {now}"
             + (f" from {_e(source)}" if source else "")
             + f". {_e(counts_text(board))} Scores in %, mean ± sample std over the distinct seeds of one "
             "configuration; Δ = ours − published, in points; a published figure from another protocol is shown "
             "with that protocol in brackets and never ranked. Click a header to sort, a model to expand its runs' "
             "provenance; hover a header, a row or a point for details.</p>"]
    parts += [f"<p class='warn'>{_e(n)}</p>" for n in board.notes]
    sections = board.sections()
    toc = "".join(f"<li><a href='#s{i}'>{_e(d)} — {_e(p)}</a></li>" for i, (d, p, _) in enumerate(sections))
    parts.append(f"<nav><ul>{toc}<li><a href='#failed'>failed cells</a></li><li><a href='#published'>published "
                 "figures</a></li>" + ("<li><a href='#ops'>ops micro-benchmark</a></li>" if board.ops else "")
                 + "</ul></nav>")
    if not sections:
        parts.append("<p>No finished results yet.</p>")
    for i, (dataset, protocol, rows) in enumerate(sections):
        parts.append(f"<section id='s{i}'><h2>{_e(dataset)} — {_e(protocol)}</h2>"
                     f"<p class='proto'>{_e(PROTOCOLS[protocol])}; ranked by {METRIC_NAMES[rows[0].metric]}.</p>")
        parts.append(_leader_table(rows, f"t{i}"))
        parts.append(_plots(rows, dataset, protocol))
        if rows[0].task == "seg":
            parts.append(heatmap_svg(rows, f"{dataset} {protocol}: per-class IoU (%)"))
        parts.append("</section>")
    parts.append("<section id='failed'><h2>Failed cells</h2>")
    parts.append(_simple_table(spec.FAILED_COLUMNS, board.failed, "failed") if board.failed else "<p>None.</p>")
    parts.append("</section><section id='published'><h2>Published figures</h2><p class='proto'>"
                 + "; ".join(f"<b>{_e(k)}</b>: {_e(v)}" for k, v in PROTOCOLS.items()) + "</p>")
    parts.append(_simple_table(spec.PUBLISHED_COLUMNS, board.published, "published"))
    parts.append("</section>")
    if board.ops:
        parts.append(f"<section id='ops'><h2>Ops micro-benchmark ({_e(board.ops.get('title', 'ops'))})</h2>"
                     f"<p class='proto'>{_e(ops_environment_text(board.ops))}</p>")
        parts.append(_simple_table(spec.OPS_COLUMNS, board.ops.get("rows", []), "ops"))
        parts.append("</section>")
    parts.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(parts)
