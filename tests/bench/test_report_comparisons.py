"""Issue 17 in the report: intervals and significance from resampling payloads (checked against scipy and a
by-hand paired bootstrap on the same draws), sweep curves, the robustness table, load flags, split headings,
units, the heat map's colour bar and label placement."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from pcbench.bench import comparisons
from pcbench.bench.leaderboard import build_leaderboard
from pcbench.bench.report import render_csv, render_markdown, write_report
from pcbench.bench.report_columns import num, si
from pcbench.bench.report_html import heatmap_svg, line_svg, place_labels, render_html, text_box
from pcbench.bench.report_sections import sweep_groups
from pcbench.bench.stats import load_payload
from tests.bench._records import synthetic_records
from tests.bench._rich_records import CORRUPTION_KINDS, rich_records


@pytest.fixture(scope="module")
def rich(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return rich_records(tmp_path_factory.mktemp("runs"))


def _payloads(recs: list[dict], model: str, sweep: int | None = None) -> list:
    out = []
    for r in recs:
        if r["status"] != "finished" or r["model"] != model or (sweep is not None and r["extra"]["sweep"]["model.k"]
                                                                 != sweep):
            continue
        ref = r["extra"]["resample"]
        path = Path(ref["path"]) if Path(ref["path"]).is_absolute() else Path(r["run_dir"]) / ref["path"]
        out.append((r["seed"], load_payload(path, ref["sha256"])))
    return [p for _, p in sorted(out, key=lambda x: x[0])]


def _section(board, dataset: str, protocol: str):
    return next(rows for d, p, rows in board.sections() if (d, p) == (dataset, protocol))


def _correct(payloads: list) -> np.ndarray:
    """[seeds, n] 1.0 where a seed classified a test sample right."""
    return np.stack([(p.target == p.pred).astype(float) for p in payloads])


# -- 1. intervals and significance -------------------------------------------------------------------------
def test_row_interval_equals_scipy_percentile_bootstrap_with_seeds_pooled(rich: list[dict]) -> None:
    board = build_leaderboard(rich)
    pct = next(r for r in _section(board, "modelnet40", "test") if r.model == "pct_cls")
    correct = _correct(_payloads(rich, "pct_cls"))
    assert correct.shape == (3, 400)
    # Seed-averaged OA on a resample = mean over the drawn samples of the seed-averaged correctness.
    ref = sps.bootstrap((correct.mean(0),), np.mean, n_resamples=1000, method="percentile", confidence_level=0.95,
                        rng=np.random.default_rng(comparisons.CI_SEED))
    assert pct.ci is not None and pct.ci.n_runs == 3 and pct.ci.n_resamples == 1000
    assert (pct.ci.low, pct.ci.high) == pytest.approx(tuple(ref.confidence_interval), abs=1e-12)
    assert pct.ci.estimate == pytest.approx(pct.mean, abs=1e-12)
    text = f"[{100 * pct.ci.low:.2f}, {100 * pct.ci.high:.2f}]"
    md = render_markdown(board)
    assert f"| 85.58 ± 2.27 | {text} | 3 |" in md
    assert "percentile bootstrap over test items (samples or scenes), 1000 resamples, seed 0" in md
    page = render_html(board)
    assert f">{text}</td>" in page and "1000 resamples, seed 0" in page
    csv_rows = render_csv(board).splitlines()
    head = csv_rows[0].replace('"', "").split(",")
    assert {"ci_low", "ci_high", "shared_rank", "p_above_better", "significant_vs_above"} <= set(head)


def test_adjacent_rows_get_paired_probability_and_shared_ranks_like_a_by_hand_bootstrap(rich: list[dict]) -> None:
    board = build_leaderboard(rich)
    rows = _section(board, "modelnet40", "test")
    assert [r.label for r in rows] == ["dgcnn_cls [model.k=32]", "pct_cls", "dgcnn_cls [model.k=16]",
                                       "pointnet2_ssg_cls", "dgcnn_cls [model.k=8]"]
    per_row = [_correct(_payloads(rich, "dgcnn_cls", 32)), _correct(_payloads(rich, "pct_cls")),
               _correct(_payloads(rich, "dgcnn_cls", 16)), _correct(_payloads(rich, "pointnet2_ssg_cls")),
               _correct(_payloads(rich, "dgcnn_cls", 8))]
    idx = np.random.default_rng(comparisons.CI_SEED).integers(0, 400, (1000, 400))  # the same draws for all rows
    dist = np.stack([c.mean(0)[idx].mean(1) for c in per_row])  # [rows, resamples]: seed-averaged OA
    # Who wins a resample, in exact integers: right answers summed over seeds and draws, scaled by seed counts.
    wins = np.stack([c.sum(0)[idx].sum(1).astype(np.int64) for c in per_row])
    seeds = [c.shape[0] for c in per_row]
    flags = []
    for i in range(4):
        d = dist[i] - dist[i + 1]
        lo, hi = np.quantile(d, [0.025, 0.975])
        sign = np.sign(wins[i] * seeds[i + 1] - wins[i + 1] * seeds[i])
        p = ((sign > 0).sum() + 0.5 * (sign == 0).sum()) / sign.size
        comp = rows[i + 1].vs_above
        assert comp.prob_a_better == pytest.approx(p, abs=1e-12) and (comp.low, comp.high) == pytest.approx((lo, hi))
        assert comp.significant == bool(lo > 0 or hi < 0)
        flags.append(comp.significant)
    assert rows[0].vs_above is None
    assert flags == [False, True, False, True]  # the data were made so: k=32 ~ pct, k=16 ~ pointnet2
    assert [r.rank_label for r in rows] == ["1-2", "1-2", "3-4", "3-4", "5"]
    md = render_markdown(board)
    assert "| 1-2 | pct_cls |" in md and f"{rows[1].vs_above.prob_a_better:.2f} (n.s.)" in md
    assert f"{rows[2].vs_above.prob_a_better:.2f} (significant)" in md
    page = render_html(board)
    assert '<td class="ns" data-v=' in page and '<td class="sig" data-v=' in page


def test_report_is_deterministic_and_reads_each_payload_once(rich: list[dict],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    comparisons._load_cached.cache_clear()
    calls: list[str] = []
    real = load_payload

    def counting(path, sha256=None):
        calls.append(str(path))
        return real(path, sha256)

    monkeypatch.setattr("pcbench.bench.stats.load_payload", counting)
    a, b = build_leaderboard(rich), build_leaderboard(rich)
    assert len(calls) == len(set(calls)) == 18  # one file per finished run, read once across both builds
    assert [(r.ci.low, r.ci.high, r.rank_label) for r in a.rows if r.ci] == \
        [(r.ci.low, r.ci.high, r.rank_label) for r in b.rows if r.ci]


def test_missing_changed_or_foreign_payloads_give_no_interval_and_say_why(tmp_path: Path) -> None:
    recs = rich_records(tmp_path)
    by = {(r["model"], r["seed"]): r for r in recs if r["status"] == "finished" and r["model"] != "dgcnn_cls"}
    pct0 = by[("pct_cls", 0)]
    Path(pct0["run_dir"], "resample_test.npz").unlink()
    p2 = by[("pointnet2_ssg_cls", 1)]
    p2["extra"] = {**p2["extra"], "resample": {**p2["extra"]["resample"], "sha256": "0" * 64}}
    ptv3 = by[("ptv3_seg", 2)]
    ptv3["test"] = {**ptv3["test"], "miou": ptv3["test"]["miou"] + 0.05}  # recorded score from another evaluation
    del by[("minkunet34c_seg", 0)]["extra"]["resample"]
    board = build_leaderboard(recs)
    row = {(r.model, r.protocol): r for r in board.rows}
    assert row[("pct_cls", "test")].ci is None and "is missing" in row[("pct_cls", "test")].ci_note
    assert row[("pointnet2_ssg_cls", "test")].ci is None and "differs from the recorded" in \
        row[("pointnet2_ssg_cls", "test")].ci_note
    assert row[("ptv3_seg", "val")].ci is None and "from another evaluation" in row[("ptv3_seg", "val")].ci_note
    assert row[("minkunet34c_seg", "val")].ci_note == "seed 0: no resampling payload recorded"
    assert row[("pct_cls", "test_vote")].ci is None and "not test_vote" in row[("pct_cls", "test_vote")].ci_note
    # a row without payloads breaks the chain of comparisons: it keeps a rank of its own
    rows = _section(board, "modelnet40", "test")
    assert [r.rank_label for r in rows] == ["1", "2", "3", "4", "5"]
    assert rows[1].vs_above is None and rows[2].vs_above is None
    page = render_html(board)
    assert re.search(r'title="no interval: seed 0: payload [^"]*resample_test.npz is missing"', page)


def test_rows_evaluated_on_another_split_are_not_compared_with_their_neighbours(tmp_path: Path) -> None:
    from pcbench.bench.stats import save_payload  # noqa: PLC0415
    from tests.bench._rich_records import cls_payload  # noqa: PLC0415

    recs = rich_records(tmp_path)
    rng = np.random.default_rng(5)
    target = rng.integers(0, 40, 300)  # pointnet2 evaluated 300 samples, the others 400
    for r in recs:
        if r.get("model") == "pointnet2_ssg_cls" and r["status"] == "finished":
            payload = cls_payload(rng, 0.8, target, 40)
            path = Path(r["run_dir"]) / "resample_test.npz"
            path.unlink()
            r["extra"]["resample"] = {"path": str(path), "sha256": save_payload(path, payload)}
            r["test"] = {**r["test"], **payload.metrics()}
    rows = _section(build_leaderboard(recs), "modelnet40", "test")
    assert [r.label for r in rows][3] == "pointnet2_ssg_cls" and rows[3].ci is not None
    assert rows[1].vs_above is not None and rows[2].vs_above is not None
    assert rows[3].vs_above is None and rows[4].vs_above is None
    assert [r.rank_label for r in rows] == ["1-2", "1-2", "3", "4", "5"]


def test_records_without_payloads_report_no_interval_and_say_so() -> None:
    board = build_leaderboard(synthetic_records())
    assert board.resamples == 0 and all(r.ci is None and r.rank_label == str(r.rank) for r in board.rows)
    md = render_markdown(board)
    assert "no confidence interval" in md and "| - | 3 | - |" in md


def test_malformed_extras_are_named_and_the_report_still_renders(tmp_path: Path) -> None:
    recs = rich_records(tmp_path)
    odd = [r for r in recs if r.get("model") == "pointnet2_ssg_cls"]
    odd[0]["extra"] = {**odd[0]["extra"], "resample": "resample_test.npz", "sweep": [1, 2],
                       "corruptions": "bad", "load_avg": "high"}
    odd[1]["extra"] = {**odd[1]["extra"], "resample": {"path": "<b>x</b>.npz", "sha256": "0" * 64}}
    board = build_leaderboard(recs)
    row = next(r for r in board.rows if r.model == "pointnet2_ssg_cls" and r.protocol == "test")
    assert row.ci is None and "not {'path': ..., 'sha256': ...}" in row.ci_note
    assert row.sweep == {} and row.loaded == [] and row.corruptions["runs"] == 2
    assert any("extra.sweep is [1, 2]" in n for n in board.notes)
    assert sum("extra.corruptions" in n and odd[0]["result_id"] in n for n in board.notes) == 1  # not per protocol
    odd[0]["extra"]["resample"] = odd[1]["extra"]["resample"]
    page = render_html(build_leaderboard(recs))
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;.npz is missing" in page


# -- 2. sweeps -------------------------------------------------------------------------------------------
def test_sweep_rows_are_listed_under_their_model_and_drawn_as_curves(rich: list[dict]) -> None:
    board = build_leaderboard(rich)
    rows = _section(board, "modelnet40", "test")
    groups = sweep_groups(rows)
    assert list(groups) == ["model.k"] and [m.model for m in groups["model.k"]] == ["dgcnn_cls"]
    assert [v for v, _ in groups["model.k"][0].points] == [8, 16, 32]
    assert {r.differs for r in rows if r.model == "dgcnn_cls"} == {"model.k=8", "model.k=16", "model.k=32"}
    md = render_markdown(board)
    block = md.split("### modelnet40: sweep of `model.k`")[1].split("###")[0]
    lines = [line for line in block.splitlines() if line.startswith("| ")][1:]
    assert lines[0].startswith("| **dgcnn_cls** |") and [line.split(" | ")[1] for line in lines[1:]] == \
        ["8", "16", "32"]
    page = render_html(board)
    svg = re.search(r'<svg[^>]*aria-label="modelnet40: OA vs model.k".*?</svg>', page).group(0)
    pts = [tuple(map(float, p.split(","))) for p in re.search(r'<polyline points="([^"]*)"', svg).group(1).split()]
    assert len(pts) == 3 and pts[0][0] < pts[1][0] < pts[2][0]
    # log2 axis: 8, 16, 32 evenly spaced; the OA rises, so y (down the page) falls
    assert pts[1][0] - pts[0][0] == pytest.approx(pts[2][0] - pts[1][0], abs=0.2)
    assert pts[0][1] > pts[1][1] > pts[2][1]
    assert svg.count("<path d=") == 3  # one error bar (the row's 95 % CI) per value
    assert 'aria-label="modelnet40: training throughput vs model.k"' in page


def test_line_plot_error_bars_span_the_given_interval() -> None:
    svg = line_svg([{"name": "m", "color": "#000", "points": [
        {"x": 1, "y": 0.5, "lo": 0.4, "hi": 0.6, "tip": "a"}, {"x": 2, "y": 0.7, "lo": 0.65, "hi": 0.75, "tip": "b"}]}],
        xlabel="x", ylabel="y", title="t")
    bars = re.findall(r'<path d="M[\d.]+,([\d.]+)h6M[\d.]+,[\d.]+V([\d.]+)', svg)
    cys = [float(c) for c in re.findall(r'<circle class="pt" cx="[\d.]+" cy="([\d.]+)"', svg)]
    for (lo, hi), cy, (ylo, yhi, y) in zip(bars, cys, ((0.4, 0.6, 0.5), (0.65, 0.75, 0.7)), strict=True):
        lo, hi = float(lo), float(hi)
        assert lo > cy > hi  # SVG y grows downwards
        assert (lo - cy) / (cy - hi) == pytest.approx((y - ylo) / (yhi - y), rel=0.05)


# -- 3. robustness ---------------------------------------------------------------------------------------
def test_robustness_table_averages_runs_and_severities(rich: list[dict]) -> None:
    board = build_leaderboard(rich)
    pct = next(r for r in _section(board, "modelnet40", "test") if r.model == "pct_cls")
    mine = [r["extra"]["corruptions"] for r in rich if r.get("model") == "pct_cls" and r["status"] == "finished"]
    assert pct.corruptions["runs"] == 3
    for k in CORRUPTION_KINDS:
        assert pct.corruptions[k] == pytest.approx([np.mean([m[k][s] for m in mine]) for s in range(5)])
    assert pct.corruptions["mce"] == pytest.approx(np.mean([m["mce"] for m in mine]))
    md = render_markdown(board)
    block = md.split("### modelnet40: corruption robustness (ModelNet-C)")[1].split("###")[0]
    line = next(x for x in block.splitlines() if x.startswith("| pct_cls |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    expect = [f"{100 * np.mean([np.mean(m[k]) for m in mine]):.2f}" for k in CORRUPTION_KINDS]
    assert cells[2:9] == expect and cells[9] == f"{np.mean([m['mce'] for m in mine]):.3f}" and cells[-1] == "3"
    assert "regenerated by pcbench" in block
    page = render_html(board)
    assert page.count("<table class='sortable robustness'>") == 1  # once per dataset, not per protocol
    assert 'aria-label="modelnet40: OA vs corruption severity"' in page
    assert "scannet20: corruption" not in md


def test_malformed_corruptions_are_named_not_shown(tmp_path: Path) -> None:
    recs = rich_records(tmp_path)
    bad = next(r for r in recs if r.get("model") == "pct_cls")
    bad["extra"]["corruptions"] = {"jitter": [0.5, 0.4]}
    board = build_leaderboard(recs)
    assert any(bad["result_id"] in n and "extra.corruptions" in n for n in board.notes)
    assert next(r for r in board.rows if r.model == "pct_cls").corruptions["runs"] == 2


# -- 4. the leaderboard that fits: units, load flags, headings, colour bar, labels --------------------------
def test_flops_and_params_take_a_unit_that_fits() -> None:
    assert [si(v) for v in (950, 12_345, 1_475_688, 2.21e9, 3.4e12)] == ["950", "12.3k", "1.48M", "2.21G", "3.4T"]
    assert num(1.5e6, "flops_per_sample") == "1.5M" and num(4.2e5, "params") == "420k"
    assert "0.00G" not in num(1.5e6, "flops_per_sample")


def test_speed_taken_on_a_busy_machine_is_flagged(rich: list[dict]) -> None:
    board = build_leaderboard(rich)
    rows = _section(board, "modelnet40", "test")
    flagged = [r.model for r in rows if r.loaded]
    assert flagged == ["pct_cls"]
    md = render_markdown(board)
    assert "| 60 ⚠ | 180 ⚠ | 4.17 ⚠ |" in md and "| 120 | 360 | 2.08 |" in md
    assert "3 of 3 run(s) probed while the 1-minute load average exceeded the core count (up to 5.2 on 2 cores)" in md
    page = render_html(board)
    assert page.count('<td class="loaded"') == 3 * 3  # three speed cells, in three modelnet40 sections


def test_train_peak_says_it_is_the_increase_of_peak_rss() -> None:
    md = render_markdown(build_leaderboard(synthetic_records()))
    assert "train peak +MiB" in md and "**train peak +MiB**: increase of peak memory" in md and "peak RSS" in md


def test_headings_say_what_the_split_is_from_the_runs_record(rich: list[dict]) -> None:
    recs = [dict(r) for r in rich]
    for r in recs:
        if r.get("model") == "pointnet2_ssg_cls":  # a suite whose "test" split is the training data
            r["extra"] = {**r["extra"], "splits": {"train": "train", "val": "val", "test": "train",
                                                   "final_role": "test"}}
    md = render_markdown(build_leaderboard(recs))
    head = next(line for line in md.splitlines() if line.startswith("## modelnet40 — test:"))
    assert "evaluated on 'train', the training split itself: not held out" in head and "honest" not in head
    assert head.startswith("## modelnet40 — test: runs differ:")
    md = render_markdown(build_leaderboard(rich))
    head = next(line for line in md.splitlines() if line.startswith("## modelnet40 — test:"))
    assert head == "## modelnet40 — test: split 'test', checkpoint selected on 'val', trained on 'train' (held out)"


def test_heatmap_colour_bar_has_ticks_and_unit() -> None:
    board = build_leaderboard(synthetic_records())
    svg = heatmap_svg(_section(board, "scannet20", "val"), "t")
    assert re.findall(r'class="cbar-tick"[^>]*>(\d+)<', svg) == ["0", "25", "50", "75", "100"]
    assert ">IoU %</text>" in svg


@pytest.mark.parametrize("spread", [0.0, 2.0, 6.0])
def test_labels_of_crowded_dots_do_not_overlap(spread: float) -> None:
    # Dots a few pixels apart (ptv2_cls / ptv3_cls in the issue): every label clear of the others and the dots.
    rng = np.random.default_rng(int(spread))
    anchors = [(200 + spread * i + rng.random(), 150 + spread * (i % 3)) for i in range(4)]
    labels = ["ptv2_cls", "ptv3_cls", "pct_cls [model.k=16]", "pointnet2_ssg_cls"]
    spots = place_labels(anchors, labels, (58, 30, 454, 266))
    boxes = [text_box(x, y, lab, a) for (x, y, a), lab in zip(spots, labels, strict=True)]
    dots = [(x - 5, y - 5, x + 5, y + 5) for x, y in anchors]
    for i, a in enumerate(boxes):
        assert 58 <= a[0] and a[2] <= 454 and 30 <= a[1] and a[3] <= 266
        assert all(min(a[2], d[2]) <= max(a[0], d[0]) or min(a[3], d[3]) <= max(a[1], d[1]) for d in dots)
        for b in boxes[i + 1:]:
            assert min(a[2], b[2]) <= max(a[0], b[0]) or min(a[3], b[3]) <= max(a[1], b[1])


def test_write_report_resamples_each_row_once_and_each_chain_once(rich: list[dict], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The report's cost is bounded by its rows: one resampling per row's interval and one joint resampling per
    chain of comparable rows (all adjacent pairs on the same draws), never one per pair or per seed."""
    from pcbench.bench import stats

    calls: list[tuple[list[int], int]] = []
    real = stats._distribution

    def counted(rows, metric, n_resamples, seed):  # noqa: ANN001, ANN202
        calls.append(([len(r) for r in rows], n_resamples))
        return real(rows, metric, n_resamples, seed)

    monkeypatch.setattr(stats, "_distribution", counted)
    write_report([dict(r, identity_sha256=r["result_id"][:8]) for r in rich], tmp_path)
    singles = [c for c in calls if len(c[0]) == 1]
    chains = [c for c in calls if len(c[0]) > 1]
    with_payload = [r for r in rich if r["status"] == "finished" and (r.get("extra") or {}).get("resample")]
    assert len(singles) == len(with_payload) == 18 and all(n == 1000 for _, n in calls)
    assert sorted(len(rows) for rows, _ in chains) == [6, 12]  # the two sections whose rows all have payloads
