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
from pcbench.bench.comparisons import method_text
from pcbench.bench.leaderboard import METRIC_NAMES, PRESENT_NAMES, Leaderboard, LeaderRow, split_text
from pcbench.bench.published import PROTOCOLS
from pcbench.bench.report_columns import (
    HTML,
    Column,
    ci_text,
    counts_text,
    loaded_text,
    num,
    ops_environment_text,
    pct,
    score_text,
)
from pcbench.bench.report_sections import (
    ROBUSTNESS_TEXT,
    SEVERITY_LABELS,
    corruption_kinds,
    primary_sections,
    robustness_rows,
    severity_curve,
    sweep_groups,
    sweep_value_text,
)

__all__ = ["heatmap_svg", "line_svg", "place_labels", "render_html", "scatter_svg", "text_box"]

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
_VIRIDIS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222;max-width:1340px}
h1{font-size:1.5em;margin-bottom:4px}h2{font-size:1.2em;margin-top:32px;border-bottom:1px solid #ddd}
.meta{color:#555;font-size:.9em}.proto{color:#555;font-size:.9em;margin:4px 0 8px}
table{border-collapse:collapse;font-size:.85em;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:right;vertical-align:top;white-space:nowrap}
td.wrap{white-space:normal;max-width:260px;min-width:120px}.scroll{overflow-x:auto;max-width:100%}
h3{font-size:1em;margin:14px 0 2px}td.sig{color:#060}td.ns{color:#a60}td.loaded{background:#fff3e0}
tr.group td{background:#f7f7f7}table.efficiency th{white-space:normal;max-width:90px}
table.efficiency td.hw{white-space:normal;min-width:110px;max-width:180px;text-align:left}
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



#: Point and legend labels use a monospace font, so their width is known without a browser: every glyph
#: advances 0.6 em in DejaVu Sans Mono / Liberation Mono / Courier (the fonts "monospace" resolves to);
#: the estimate below adds a margin.
_LABEL_FONT = "DejaVu Sans Mono,Liberation Mono,Menlo,Consolas,monospace"
_LABEL_SIZE = 10
_CHAR_EM = 0.64

Box = tuple[float, float, float, float]  # x0, y0, x1, y1


def text_box(x: float, y: float, label: str, anchor: str, size: float = _LABEL_SIZE) -> Box:
    """Estimated bounding box of an SVG label at baseline (x, y) with text-anchor ``anchor``."""
    w = len(label) * _CHAR_EM * size
    x0 = x - w if anchor == "end" else x - w / 2 if anchor == "middle" else x
    return x0, y - 0.8 * size, x0 + w, y + 0.25 * size


def _overlap(a: Box, b: Box) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def place_labels(anchors: Sequence[tuple[float, float]], labels: Sequence[str], bounds: Box, *,
                 size: float = _LABEL_SIZE, radius: float = 5.0,
                 obstacles: Sequence[Box] = ()) -> list[tuple[float, float, str]]:
    """Positions (x, y, text-anchor) for the labels of dots at ``anchors``, avoiding each other and the dots.

    Greedy: dots are taken top to bottom; each label takes the first candidate spot around its dot (right,
    left, above, below, then the same farther out) that stays inside ``bounds`` and overlaps no dot, no other
    ``obstacles`` (error bars) and no label placed so far; if none is free, the spot with the least overlap.
    """
    dots = [(x - radius, y - radius, x + radius, y + radius) for x, y in anchors] + list(obstacles)
    placed: list[Box] = []
    out: list[tuple[float, float, str]] = [(0.0, 0.0, "start")] * len(anchors)
    order = sorted(range(len(anchors)), key=lambda i: (anchors[i][1], anchors[i][0]))
    for i in order:
        x, y = anchors[i]
        cands = []
        for step in range(6):
            d = 1.1 * size * step
            cands += [(x + 7, y - 6 - d, "start"), (x - 7, y - 6 - d, "end"), (x + 7, y + 12 + d, "start"),
                      (x - 7, y + 12 + d, "end"), (x, y - 9 - d, "middle"), (x, y + 17 + d, "middle")]
        best, best_cost = None, math.inf
        for cx, cy, anchor in cands:
            box = text_box(cx, cy, labels[i], anchor, size)
            if box[0] < bounds[0] or box[2] > bounds[2] or box[1] < bounds[1] or box[3] > bounds[3]:
                continue
            cost = sum(_overlap(box, o) for o in placed) + sum(_overlap(box, o) for o in dots)
            if cost < best_cost:
                best, best_cost = (cx, cy, anchor), cost
            if cost == 0:
                break
        if best is None:  # nothing fits inside: right of the dot, clipped by the plot at worst
            best = (x + 7, y - 6, "start")
        out[i] = best
        placed.append(text_box(*best[:2], labels[i], best[2], size))
    return out


def _label(x: float, y: float, text: str, anchor: str, size: float = _LABEL_SIZE, fill: str = "#333") -> str:
    return (f'<text class="lbl" x="{x:.1f}" y="{y:.1f}" font-size="{size}" font-family="{_LABEL_FONT}" '
            f'fill="{fill}" text-anchor="{anchor}">{_e(text)}</text>')


def scatter_svg(points: Sequence[dict[str, Any]], *, xlabel: str, ylabel: str, title: str, logx: bool = True,
                width: int = 440, height: int = 310) -> str:
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
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{mt}" y2="{mt + ph}" stroke="#eee"/>'
                   f'<text x="{x:.1f}" y="{mt + ph + 14}" text-anchor="middle" font-size="10">{_si(t)}</text>')
    out.append(f'<text x="{ml + pw / 2}" y="{height - 8}" text-anchor="middle" font-size="11">{_e(xlabel)}</text>'
               f'<text x="14" y="{mt + ph / 2}" text-anchor="middle" font-size="11" '
               f'transform="rotate(-90 14 {mt + ph / 2})">{_e(ylabel)}</text>')
    anchors = [(sx(p["x"]), sy(p["y"])) for p in pts]
    bars = [(x - 2, sy(p["y"] + p["yerr"]), x + 2, sy(p["y"] - p["yerr"]))
            for p, (x, _) in zip(pts, anchors, strict=True) if p.get("yerr")]
    spots = place_labels(anchors, [p["label"] for p in pts], (ml + 1, mt + 1, ml + pw - 1, mt + ph - 1),
                         obstacles=bars)
    for p, (x, y), (lx, ly, anchor) in zip(pts, anchors, spots, strict=True):
        if p.get("yerr"):
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{sy(p["y"] - p["yerr"]):.1f}" '
                       f'y2="{sy(p["y"] + p["yerr"]):.1f}" stroke="{p["color"]}" stroke-width="1.5"/>')
        out.append(f'<circle class="pt" cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{p["color"]}" fill-opacity=".85">'
                   f'<title>{_e(p["tip"])}</title></circle>')
        if abs(ly - y) > 2 * _LABEL_SIZE:  # moved away from its dot: a thin line says whose label it is
            out.append(f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{lx:.1f}" y2="{ly - 3:.1f}" stroke="#bbb" '
                       'stroke-width=".7"/>')
        out.append(_label(lx, ly, p["label"], anchor))
    out.append("</svg>")
    return "".join(out)


def line_svg(series: Sequence[dict[str, Any]], *, xlabel: str, ylabel: str, title: str,
             categories: Sequence[str] | None = None, percent: bool = True, width: int = 440) -> str:
    """Lines with error bars and a legend below: each series a dict with name, color and points, each point a
    dict with x (a number, or an index into ``categories``), y, lo, hi (error bar ends or None) and tip.

    Numeric x spans a log axis when all values are positive and span a factor 4 or more (k = 8, 16, 32 read
    evenly spaced), a linear axis otherwise; ticks sit at the values themselves.
    """
    legend_rows = _legend_layout([s["name"] for s in series], width - 20)
    ml, mr, mt, mb = 58, 16, 30, 48
    ph = 200
    height = mt + ph + mb + 16 * len(legend_rows) + 6
    pw = width - ml - mr
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'class="plot curve" aria-label="{_e(title)}">',
           f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="13" font-weight="bold">{_e(title)}</text>']
    pts = [p for s in series for p in s["points"] if p["y"] is not None]
    if not pts:
        out.append(f'<text x="{width / 2}" y="{mt + ph / 2}" text-anchor="middle" font-size="12" fill="#888">'
                   "no data</text></svg>")
        return "".join(out)
    xs = sorted({p["x"] for p in pts})
    logx = categories is None and xs[0] > 0 and xs[-1] / xs[0] >= 4
    fx = (lambda v: math.log2(v)) if logx else (lambda v: float(v))  # noqa: E731
    x0, x1 = fx(xs[0]), fx(xs[-1])
    if x1 - x0 < 1e-12:
        x0, x1 = x0 - 1, x1 + 1
    lo = min(p["lo"] if p.get("lo") is not None else p["y"] for p in pts)
    hi = max(p["hi"] if p.get("hi") is not None else p["y"] for p in pts)
    pad = max((hi - lo) * 0.1, abs(hi) * 0.01, 1e-9)
    y0, y1 = lo - pad, hi + pad
    if percent:
        y0, y1 = max(0.0, y0), min(1.0, y1)
    else:
        y0 = max(0.0, y0)

    def sx(v: float) -> float:
        return ml + 12 + (fx(v) - x0) / (x1 - x0) * (pw - 24)

    def sy(v: float) -> float:
        return mt + (1 - (v - y0) / (y1 - y0)) * ph

    out.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
    scale = 100 if percent else 1
    for t in _nice_ticks(y0 * scale, y1 * scale):
        y = sy(t / scale)
        out.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                   f'<text x="{ml - 4}" y="{y + 4:.1f}" text-anchor="end" font-size="10">{_si(t)}</text>')
    for v in xs:
        x = sx(v)
        tick = categories[int(v)] if categories is not None else _si(v)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{mt}" y2="{mt + ph}" stroke="#eee"/>'
                   f'<text x="{x:.1f}" y="{mt + ph + 14}" text-anchor="middle" font-size="10">{_e(tick)}</text>')
    out.append(f'<text x="{ml + pw / 2}" y="{mt + ph + 32}" text-anchor="middle" font-size="11">{_e(xlabel)}'
               f'{" (log scale)" if logx else ""}</text>'
               f'<text x="14" y="{mt + ph / 2}" text-anchor="middle" font-size="11" '
               f'transform="rotate(-90 14 {mt + ph / 2})">{_e(ylabel)}</text>')
    for s in series:
        own = sorted((p for p in s["points"] if p["y"] is not None), key=lambda p: p["x"])
        if len(own) > 1:
            path = " ".join(f"{sx(p['x']):.1f},{sy(p['y']):.1f}" for p in own)
            out.append(f'<polyline points="{path}" fill="none" stroke="{s["color"]}" stroke-width="1.8"/>')
        for p in own:
            x, y = sx(p["x"]), sy(p["y"])
            if p.get("lo") is not None and p.get("hi") is not None:
                out.append(f'<path d="M{x - 3:.1f},{sy(p["lo"]):.1f}h6M{x:.1f},{sy(p["lo"]):.1f}V{sy(p["hi"]):.1f}'
                           f'M{x - 3:.1f},{sy(p["hi"]):.1f}h6" stroke="{s["color"]}" stroke-width="1.2" '
                           'fill="none"/>')
            out.append(f'<circle class="pt" cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{s["color"]}">'
                       f'<title>{_e(p["tip"])}</title></circle>')
    top = mt + ph + 44
    for k, row in enumerate(legend_rows):
        y = top + 16 * k
        for name, x in row:
            color = next(s["color"] for s in series if s["name"] == name)
            out.append(f'<rect x="{10 + x:.1f}" y="{y - 8}" width="12" height="3" fill="{color}"/>'
                       + _label(10 + x + 16, y, name, "start"))
    out.append("</svg>")
    return "".join(out)


def _legend_layout(names: Sequence[str], width: float) -> list[list[tuple[str, float]]]:
    """Legend entries (swatch + label) in rows that fit ``width``: [[(name, x offset), ...], ...]."""
    rows: list[list[tuple[str, float]]] = [[]]
    x = 0.0
    for name in names:
        w = 16 + len(name) * _CHAR_EM * _LABEL_SIZE + 14
        if rows[-1] and x + w > width:
            rows.append([])
            x = 0.0
        rows[-1].append((name, x))
        x += w
    return rows if rows[0] else []


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
    width, height = left + cw * ncls + 70, max(top + chh * len(rows) + 20, top + 124)
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
    # Colour bar: 100 steps from 0 % (bottom) to 100 % (top), a tick every 25 %, titled with its unit.
    lx, bar = left + cw * ncls + 12, 100
    # titled below the bar: above it the rotated class names of the last columns run into the same space
    out.append(f'<text x="{lx - 4}" y="{top + bar + 16}" font-size="10">IoU %</text>')
    for k in range(50):
        out.append(f'<rect x="{lx}" y="{top + bar - (k + 1) * bar / 50:.1f}" width="12" height="{bar / 50 + .3:.1f}" '
                   f'fill="{_viridis((k + .5) / 50)}"/>')
    out.append(f'<rect x="{lx}" y="{top}" width="12" height="{bar}" fill="none" stroke="#999" stroke-width=".5"/>')
    for t in (0, 25, 50, 75, 100):
        y = top + bar - t * bar / 100
        out.append(f'<line x1="{lx + 12}" x2="{lx + 15}" y1="{y:.1f}" y2="{y:.1f}" stroke="#333"/>'
                   f'<text class="cbar-tick" x="{lx + 18}" y="{y + 3:.1f}" font-size="9">{t}</text>')
    out.append("</svg>")
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
    ci = f"; no confidence interval: {r.ci_note}" if r.ci is None and r.ci_note else ""
    return (f"{r.label}: {r.n} seed(s), seeds {seeds}{repeats}; commit {first.get('git_commit')}, pcbench "
            f"{first.get('pcbench_version')}, torch {first.get('torch_version')}, {r.hardware}, allocator "
            f"{first.get('allocator')}, host {first.get('hostname')}{ci}")


def _leader_cell(col: Column, r: LeaderRow, table: str) -> str:
    """One cell of a leaderboard table: the spec's text and sort value, with the page's interactive bits."""
    if col.name == "model" and table == spec.ACC:
        return (f"<td class='l'><button class='prov-toggle' aria-expanded='false' title='show the runs and their "
                f"provenance'>{_e(col.show(r))}</button></td>")
    if col.name == "model":
        return f"<td class='l'>{_e(col.show(r))}</td>"
    if col.name == "recipe_fidelity":
        badge = (f"<span class='badge{' variant' if r.fidelity == 'pcbench variant' else ''}'>{_e(r.fidelity)}"
                 "</span>") if r.fidelity else ""
        return f"<td class='l wrap'>{_e(r.recipe)} {badge}</td>"
    extra, cls = "", "" if col.numeric else "l"
    if col.name == "published" and r.published is not None:
        extra = f' title="{_e(r.published.source + (" — " + r.published.note if r.published.note else ""))}"'
    elif col.name == "mean":
        names = {**METRIC_NAMES, **PRESENT_NAMES}
        other = ", ".join(f"{names[k]} {pct(v)}" for k, v in r.metrics.items() if v is not None)
        tip = f"seed scores {', '.join(pct(x) for x in r.scores)}; {other} (means over the seeds)"
        extra = f' title="{_e(tip)}"'
    elif col.name == "ci":
        tip = r.ci.method if r.ci else "no interval: " + (r.ci_note or "no resampling payload")
        extra = f' title="{_e(tip)}"'
    elif col.name == "p_above_better" and r.vs_above is not None:
        c = r.vs_above
        tip = (f"row above minus this row: {100 * c.delta:+.2f} points, 95 % interval [{100 * c.low:+.2f}, "
               f"{100 * c.high:+.2f}]; {c.method}")
        extra = f' title="{_e(tip)}"'
        cls = "sig" if c.significant else "ns"
    elif col.name in ("train_samples_per_s", "infer_samples_per_s", "latency_b1_ms") and r.loaded:
        extra, cls = f' title="{_e(loaded_text(r))}"', "loaded"
    elif col.name == "config":
        cls = "l wrap"
    elif col.name == "hardware":
        cls = "hw"
    return _td(col.show(r), col.value(r) if col.numeric else None, cls, extra)


def _leader_table(rows: Sequence[LeaderRow], sid: str, table: str) -> str:
    cols = spec.table_columns(HTML, table)
    th = "".join(_th(c, rows[0].metric) for c in cols)
    body = []
    for r in rows:
        body.append(f"<tr class='main' title=\"{_e(_row_tip(r))}\">"
                    f"{''.join(_leader_cell(c, r, table) for c in cols)}</tr>")
        if table == spec.ACC:
            body.append(f"<tr class='prov-row' hidden><td class='l' colspan='{len(cols)}'><div class='scroll'>"
                        f"{_provenance(r)}</div></td></tr>")
    kind = "leaderboard" if table == spec.ACC else "efficiency"
    return (f"<table class='sortable {kind}' id='{sid}'><thead><tr>{th}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


def _sweep_html(dataset: str, rows: list[LeaderRow]) -> str:
    """Per swept key: metric vs value and throughput vs value (one line per model), and the swept rows."""
    metric = METRIC_NAMES[rows[0].metric]
    parts = []
    for key, models in sweep_groups(rows).items():
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for m in models for v, _ in m.points)
        values = sorted({sweep_value_text(v) for m in models for v, _ in m.points}) if not numeric else None

        acc, speed = [], []
        for i, m in enumerate(models):
            c = PALETTE[i % len(PALETTE)]  # one colour per line: rows of one model are told apart
            pa, ps = [], []
            for v, r in m.points:
                lo, hi = (r.ci.low, r.ci.high) if r.ci else (
                    (r.mean - r.std, r.mean + r.std) if r.std is not None else (None, None))
                bar = "95 % bootstrap CI" if r.ci else "± std over seeds" if r.std is not None else "one run"
                x = v if values is None else values.index(sweep_value_text(v))
                pa.append({"x": x, "y": r.mean, "lo": lo, "hi": hi,
                           "tip": f"{m.name}, {key}={sweep_value_text(v)}: {metric} {score_text(r)} % "
                                  f"{ci_text(r) if r.ci else ''} (n={r.n}; bar: {bar})"})
                sps = r.efficiency["train_samples_per_s"]
                ps.append({"x": x, "y": sps, "lo": None, "hi": None,
                           "tip": f"{m.name}, {key}={sweep_value_text(v)}: {num(sps)} train samples/s "
                                  f"(median over {r.n} run(s), {r.hardware})"})
            acc.append({"name": m.name, "color": c, "points": pa})
            speed.append({"name": m.name, "color": c, "points": ps})
        a = line_svg(acc, xlabel=key, ylabel=f"{metric} %", title=f"{dataset}: {metric} vs {key}",
                     categories=values)
        b = line_svg(speed, xlabel=key, ylabel="train samples/s", title=f"{dataset}: training throughput vs {key}",
                     categories=values, percent=False)
        body = []
        for m in models:
            body.append(f"<tr class='group'><td class='l' colspan='6'><b>{_e(m.name)}</b> "
                        f"<span class='small'>{_e(m.recipe)} / {_e(m.fidelity)}</span></td></tr>")
            for v, r in m.points:
                body.append(f"<tr><td class='l'>{_e(sweep_value_text(v))}</td>{_td(score_text(r), r.mean)}"
                            f"{_td(ci_text(r), r.ci.low if r.ci else None)}{_td(r.n, r.n)}"
                            f"{_td(r.rank_label or r.rank, r.rank)}"
                            f"{_td(num(r.efficiency['train_samples_per_s']), r.efficiency['train_samples_per_s'])}"
                            "</tr>")
        head = (f"<th class='l' title='the swept value; each value is its own configuration identity'>{_e(key)}</th>"
                f"<th title='headline metric in %: mean ± sample std over the seeds'>{metric} % (mean ± std)</th>"
                "<th title='95 % percentile-bootstrap interval over the test items, seeds pooled'>95 % CI</th>"
                "<th title='distinct seeds counted'>n</th><th title='rank in the accuracy table above'>#</th>"
                "<th title='training throughput, samples per second (median over the runs)'>train samples/s</th>")
        parts.append(f"<h3>Sweep of {_e(key)}</h3><p class='proto'>Error bars: the 95 % bootstrap CI where the rows "
                     "have one, else ± std over seeds. Swept rows listed under their model.</p>"
                     f"<div class='plots'>{a}{b}</div><table class='sweep'><thead><tr>{head}</tr></thead>"
                     f"<tbody>{''.join(body)}</tbody></table>")
    return "".join(parts)


def _robustness_html(dataset: str, rows: list[LeaderRow]) -> str:
    """The ModelNet-C table (OA per corruption averaged over severities, mCE, relative mCE) and OA vs severity."""
    found = robustness_rows(rows)
    if not found:
        return ""
    kinds = corruption_kinds(found)
    head = ("<th class='l' title='pcbench model config [sweep variant]'>model</th>"
            "<th title='OA in % on the clean test split'>clean OA %</th>"
            + "".join(f"<th title='OA in % under {_e(k)}, mean over severities 1-5 (hover a cell for each)'>"
                      f"{_e(k)}</th>" for k in kinds)
            + "<th title='mean corruption error relative to DGCNN (DGCNN = 1.000; lower is better)'>mCE</th>"
            "<th title='relative mCE: lost clean accuracy relative to DGCNN (lower is better)'>relative mCE</th>"
            "<th title='runs averaged'>runs</th>")
    body = []
    for r in found:
        c = r.corruptions
        cells = "".join(_td(pct(sum(c[k]) / len(c[k])), sum(c[k]) / len(c[k]), extra=f' title="{_e(k)}: severities '
                            f'1-5 OA {", ".join(pct(v) for v in c[k])} %"') for k in kinds)
        ratios = "".join(_td("-" if c.get(k) is None else f"{c[k]:.3f}", c.get(k)) for k in ("mce", "relative_mce"))
        body.append(f"<tr><td class='l'>{_e(r.label)}</td>{_td(pct(c.get('clean_oa')), c.get('clean_oa'))}{cells}"
                    f"{ratios}{_td(c['runs'], c['runs'])}</tr>")
    series = []
    for i, r in enumerate(found):
        curve = severity_curve(r, kinds)
        series.append({"name": r.label, "color": PALETTE[i % len(PALETTE)],
                       "points": [{"x": k, "y": v, "lo": None, "hi": None,
                                   "tip": f"{r.label}, {SEVERITY_LABELS[k]}: OA {pct(v)} % (mean over the kinds)"}
                                  for k, v in enumerate(curve) if v is not None]})
    plot = line_svg(series, xlabel="severity (OA averaged over the corruption kinds)", ylabel="OA %",
                    title=f"{dataset}: OA vs corruption severity", categories=SEVERITY_LABELS)
    return (f"<h3>Corruption robustness (ModelNet-C)</h3><p class='proto'>{_e(ROBUSTNESS_TEXT)}</p>"
            f"<table class='sortable robustness'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
            f"<div class='plots'>{plot}</div>")


def _stats_text(board: Leaderboard, rows: Sequence[LeaderRow]) -> str:
    """How the section's intervals were made, or why it has none."""
    if any(r.ci for r in rows) or not board.resamples:
        return method_text(board.resamples)
    return f"No confidence intervals in this section: {rows[0].ci_note}."


def _colors(rows: Sequence[LeaderRow]) -> dict[str, str]:
    models = sorted({r.model for r in rows})
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(models)}


def _plots(rows: Sequence[LeaderRow], dataset: str, protocol: str) -> str:
    color = _colors(rows)
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
    toc += "".join(f"<li><a href='#w{i}'>{_e(d)} — published weights</a></li>"
                   for i, (d, _) in enumerate(board.weights_sections()))
    parts.append(f"<nav><ul>{toc}<li><a href='#failed'>failed cells</a></li><li><a href='#published'>published "
                 "figures</a></li>" + ("<li><a href='#ops'>ops micro-benchmark</a></li>" if board.ops else "")
                 + "</ul></nav>")
    if not sections and not board.weights:
        parts.append("<p>No finished results yet.</p>")
    primary = {(d, p) for d, p, _ in primary_sections(board)}
    for i, (dataset, protocol, rows) in enumerate(sections):
        parts.append(f"<section id='s{i}'><h2>{_e(dataset)} — {_e(protocol)}: {_e(split_text(rows, protocol))}</h2>"
                     f"<p class='proto'>Ranked by {METRIC_NAMES[rows[0].metric]}. {_e(_stats_text(board, rows))}</p>")
        parts.append("<h3>Accuracy</h3>" + _leader_table(rows, f"t{i}", spec.ACC))
        parts.append("<h3>Efficiency</h3>" + _leader_table(rows, f"e{i}", spec.EFF))
        loaded = [r for r in rows if r.loaded]
        if loaded:
            parts.append(f"<p class='warn'>{spec.LOADED_MARK} Speed figures taken on a busy machine: "
                         + "; ".join(f"{_e(r.label)}: {_e(loaded_text(r))}" for r in loaded) + "</p>")
        parts.append(_plots(rows, dataset, protocol))
        if rows[0].task == "seg":
            parts.append(heatmap_svg(rows, f"{dataset} {protocol}: per-class IoU (%)"))
        if (dataset, protocol) in primary:
            parts.append(_sweep_html(dataset, rows))
            parts.append(_robustness_html(dataset, rows))
        parts.append("</section>")
    for i, (dataset, rows) in enumerate(board.weights_sections()):  # own sections: never ranked with trained rows
        parts.append(f"<section id='w{i}'><h2>{_e(dataset)} — published weights, evaluated by pcbench</h2>"
                     f"<p class='proto'>{_e(spec.WEIGHTS_NOTE)}</p>"
                     + _simple_table(spec.WEIGHTS_COLUMNS, rows, "weights") + "</section>")
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
