"""Leaderboard integrity: rows are configuration identities, seeds are counted once, split roles are typed,
exported text cannot inject formulas or markup, and one column spec feeds every writer."""

from __future__ import annotations

import ast
import csv
import io
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from pcbench.bench.record import identity_sha256 as record_identity
from pcbench.bench.record import record_from_metrics
from pcbench.bench.report import build_leaderboard, render_csv, render_markdown, write_report
from pcbench.train.config import config_identity_sha256
from tests.bench._records import HOST, synthetic_records

REPO = Path(__file__).resolve().parents[2]


def _run(oa: float, *, seed: int = 0, trainer: dict[str, Any] | None = None, finished_at: str = "2025-01-01T00:00:00",
         model: str = "pointnet2_ssg_cls", **fields: Any) -> dict[str, Any]:
    """A finished ModelNet40 record of one cell whose config carries ``trainer`` overrides."""
    config = {"model": {"name": model}, "data": {"name": "modelnet40"}, "seed": seed,
              "trainer": {"max_steps": 30, "num_workers": 0, **(trainer or {})}}
    rec = record_from_metrics({"test": {"oa": oa, "macc": oa - 0.05}, "seed": seed}, cell=f"{model}/modelnet40",
                              config=config, suite="s", model=model, dataset="modelnet40", task="cls", host=HOST,
                              finished_at=finished_at)
    rec.update(fields)
    return rec


def _rows(board, protocol: str = "test") -> list:
    return sorted((r for r in board.rows if r.protocol == protocol), key=lambda r: r.scores)


# -- item 6: a row is one configuration identity ------------------------------------------------------------
def test_two_configurations_of_one_cell_are_two_rows_not_two_seeds() -> None:
    recs = [_run(0.80, trainer={"max_steps": 30}), _run(0.90, trainer={"max_steps": 31})]
    board = build_leaderboard(recs)
    rows = _rows(board)
    assert [(r.n, r.scores) for r in rows] == [(1, [0.80]), (1, [0.90])]
    assert [r.identity for r in rows] == [config_identity_sha256(x["config"]) for x in recs]
    assert [r.differs for r in rows] == ["trainer.max_steps=30", "trainer.max_steps=31"]
    assert {r.rank for r in rows} == {1, 2}
    md = render_markdown(board)
    assert "trainer.max_steps=30" in md and "trainer.max_steps=31" in md
    lines = list(csv.DictReader(io.StringIO(render_csv(board))))
    assert sorted(x["config"] for x in lines) == ["trainer.max_steps=30", "trainer.max_steps=31"]
    assert {x["identity_sha256"] for x in lines} == {r.identity for r in rows}


def test_seeds_of_one_identity_are_one_row_and_placement_keys_do_not_split_it() -> None:
    # num_workers is a placement key: where a run executed, not what it computed
    recs = [_run(0.80, seed=0), _run(0.84, seed=1, trainer={"num_workers": 8}), _run(0.82, seed=2)]
    (row,) = _rows(build_leaderboard(recs))
    assert row.n == 3 and row.seeds == [0, 1, 2] and row.scores == [0.80, 0.84, 0.82]
    assert row.mean == pytest.approx((0.80 + 0.84 + 0.82) / 3) and row.differs == "" and row.repeats == {}


def test_a_repeated_seed_counts_once_by_its_latest_run_and_the_row_says_so() -> None:
    # Same identity and seed, recorded twice (different config_sha256: other worker count); the later one counts.
    old = _run(0.70, seed=0, finished_at="2025-01-01T00:00:00")
    new = _run(0.75, seed=0, trainer={"num_workers": 4}, finished_at="2025-03-01T00:00:00")
    other = _run(0.80, seed=1)
    assert old["config_sha256"] != new["config_sha256"]
    board = build_leaderboard([new, old, other])  # store order must not matter
    (row,) = _rows(board)
    assert row.n == 2 and row.seeds == [0, 1] and row.scores == [0.75, 0.80]
    assert [x["result_id"] for x in row.runs] == [new["result_id"], other["result_id"]]
    assert row.repeats_text == "seed 0 run 2x, latest kept"
    assert "seed 0 run 2x, latest kept" in render_markdown(board)
    line = next(csv.DictReader(io.StringIO(render_csv(board))))
    assert (line["n"], line["seeds"], line["seed_repeats"]) == ("2", "0 1", "seed 0 run 2x, latest kept")
    assert any("1 finished run(s) repeat a seed" in n for n in board.notes)


def test_runner_records_are_grouped_by_their_trainer_config() -> None:
    # pcbench-bench stores {"train": <trainer config>, "probe": <probe settings>} (suite.cell_identity)
    def cell(oa: float, seed: int, steps: int, repeats: int = 1) -> dict[str, Any]:
        rec = _run(oa, seed=seed)
        train = {"model": {"name": "pct_cls"}, "seed": seed, "trainer": {"max_steps": steps}}
        rec["config"] = {"train": train, "probe": {"repeats": repeats}}
        rec["identity_sha256"] = record_identity(rec["config"])  # what the store computes for such a record
        return rec

    rows = _rows(build_leaderboard([cell(0.80, 0, 30), cell(0.82, 1, 30, repeats=3), cell(0.90, 0, 31)]))
    assert [(r.n, r.seeds, r.differs) for r in rows] == [(2, [0, 1], "trainer.max_steps=30"),
                                                         (1, [0], "trainer.max_steps=31")]
    assert rows[1].identity == config_identity_sha256({"model": {"name": "pct_cls"}, "trainer": {"max_steps": 31}})


def test_the_identity_field_is_preferred_over_the_stored_config() -> None:
    a = _run(0.80, seed=0, identity_sha256="a" * 64)
    b = _run(0.90, seed=1, trainer={"max_steps": 31}, identity_sha256="a" * 64)  # the field says: one config
    c = _run(0.70, seed=0, identity_sha256="c" * 64)  # same config as a, but the field says otherwise
    rows = _rows(build_leaderboard([a, b, c]))
    assert sorted((r.identity[0], r.n) for r in rows) == [("a", 2), ("c", 1)]


def test_a_failed_seed_is_cleared_only_by_a_finished_run_of_the_same_identity() -> None:
    fail = record_from_metrics(None, cell="pointnet2_ssg_cls/modelnet40", config=_run(0.8)["config"], status="failed",
                               model="pointnet2_ssg_cls", dataset="modelnet40", task="cls", host=HOST, error="boom")
    assert build_leaderboard([fail, _run(0.8, trainer={"max_steps": 31})]).failed == [fail]
    assert build_leaderboard([fail, _run(0.8, trainer={"num_workers": 3})]).failed == []


# -- split roles come from the typed field ------------------------------------------------------------------
def _seg_records(splits: dict[str, Any], where: str) -> list[dict[str, Any]]:
    out = []
    for r in synthetic_records():
        if r.get("dataset") == "scannet20" and r["status"] == "finished":
            r = {**r, "test": {k: (v - 0.01 if isinstance(v, float) else v) for k, v in r["val"].items()}}
            if where == "field":
                r["splits"] = splits
            else:
                r["extra"] = {**(r.get("extra") or {}), "splits": splits}
            out.append(r)
    return out


@pytest.mark.parametrize(("splits", "where"), [
    ({"train": "train", "val": "val", "final": "val", "final_role": "val"}, "field"),  # the store's typed field
    ({"train": "train", "val": "val", "test": "val", "final": "val", "final_role": "val"}, "extra"),  # metrics.json
    ({"train": "train", "val": "val", "test": "validation"}, "extra"),  # an old record: role from the split name
])
def test_the_final_split_role_decides_the_protocol(splits: dict[str, Any], where: str) -> None:
    board = build_leaderboard(_seg_records(splits, where))
    assert {p for _, p, _ in board.sections()} == {"val"}
    for row in board.rows:
        assert row.n == 3 and all(s == pytest.approx(v) for s, v in zip(
            row.scores, [x["test"]["miou"] for x in _seg_records(splits, where) if x["model"] == row.model],
            strict=True))


def test_a_typed_test_role_is_not_second_guessed_from_the_split_name() -> None:
    recs = _seg_records({"train": "train", "val": "val", "test": "val", "final": "val", "final_role": "test"}, "field")
    assert {p for _, p, _ in build_leaderboard(recs).sections()} == {"test"}


def test_typed_records_build_a_leaderboard_without_importing_torch() -> None:
    code = (
        "import sys\n"
        "from tests.bench._records import synthetic_records\n"
        "from pcbench.bench.report import build_leaderboard, render_csv, render_markdown\n"
        "recs = [dict(r, identity_sha256=r['model'], splits={'final': 'test', 'final_role': 'test'})\n"
        "        for r in synthetic_records()]\n"
        "board = build_leaderboard(recs)\n"
        "render_markdown(board); render_csv(board)\n"
        "print(len(board.rows), sorted(m for m in ('torch', 'numpy') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                         timeout=120)
    assert out.stdout.split(None, 1)[1].strip() == "[]", out.stdout


# -- item 7: exported text cannot inject ----------------------------------------------------------------------
PAYLOADS = {"model": '=HYPERLINK("http://evil.example","x")', "variant": "@SUM(1+1)*cmd|' /C calc'!A0",
            "recipe": "+1+cmd", "fidelity": "-2+3", "device_name": "\tcmd", "git_commit": "\rcmd"}


def _hostile_board():
    rec = _run(0.5, model="pointnet2_ssg_cls")  # below the published 90.7: a negative delta
    rec.update({k: v for k, v in PAYLOADS.items()})
    return build_leaderboard([rec, _run(0.85, model="pct_cls")])


def test_csv_text_cells_cannot_start_a_formula_and_numbers_stay_numbers() -> None:
    text = render_csv(_hostile_board())
    lines = list(csv.reader(io.StringIO(text)))
    head, cells = lines[0], lines[1:]
    for line in cells:
        for cell in line:
            if cell[:1] in ("=", "+", "-", "@", "\t", "\r"):
                float(cell)  # only a number may start with - or +
    hostile = dict(zip(head, next(x for x in cells if "HYPERLINK" in "".join(x)), strict=True))
    assert hostile["model"] == "'" + PAYLOADS["model"]
    assert hostile["variant"] == "'" + PAYLOADS["variant"]
    assert hostile["recipe"] == "'" + PAYLOADS["recipe"]
    assert hostile["fidelity"] == "'" + PAYLOADS["fidelity"]
    assert hostile["hardware"] == "'" + PAYLOADS["device_name"] + " (2 threads)"
    plain = dict(zip(head, next(x for x in cells if x[head.index("model")] == "pct_cls"), strict=True))
    assert float(plain["delta"]) == pytest.approx(0.85 - 0.932) and plain["delta"].startswith("-0.08")
    # numbers are written unquoted, text quoted: a reader told so gets floats back, the delta negative
    typed = list(csv.reader(io.StringIO(text), quoting=csv.QUOTE_NONNUMERIC))
    delta = [line[head.index("delta")] for line in typed[1:]]
    assert "" in delta and [d for d in delta if d != ""] == [pytest.approx(0.85 - 0.932)]  # "": none published


def _pipes(line: str) -> int:
    """Unescaped pipes of a Markdown table line (a pipe after an odd run of backslashes is escaped)."""
    return sum(1 for m in re.finditer(r"(\\*)\|", line) if len(m.group(1)) % 2 == 0)


def test_markdown_escapes_html_and_table_pipes() -> None:
    recs = [_run(0.8, model="pct_cls", variant="a\\|b", recipe="<img src=x onerror=alert(1)>",
                 fidelity="<script>alert(1)</script>"),
            record_from_metrics(None, cell="<script>x</script>|c", config={"seed": 0}, status="failed", host=HOST,
                                error="R&D <b>bold</b>\nsecond line | tail")]
    md = render_markdown(build_leaderboard(recs), title="<i>t</i>")
    assert "<script" not in md and "<img" not in md and "<b>" not in md and "<i>" not in md
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in md and "&lt;img src=x onerror=alert(1)&gt;" in md
    assert "R&amp;D &lt;b&gt;bold&lt;/b&gt; second line \\| tail" in md
    tables: list[list[str]] = []
    for line in md.splitlines():
        if line.startswith("|"):
            if not tables or not tables[-1]:
                tables.append([])
            tables[-1].append(line)
        elif tables and tables[-1]:
            tables.append([])
    for table in filter(None, tables):
        assert len({_pipes(line) for line in table}) == 1, table


# -- design: one column spec, no import cycle --------------------------------------------------------------
class _Heads(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[str]] = []
        self._in_th = False
        self._in_head = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "table" and {"leaderboard", "efficiency"} & set((dict(attrs).get("class") or "").split()):
            self.tables.append([])
            self._in_head = False
        self._in_head = self._in_head or (tag == "thead" and bool(self.tables) and not self.tables[-1])
        self._in_th = tag == "th" and self._in_head

    def handle_endtag(self, tag: str) -> None:
        if tag == "thead":
            self._in_head = False
        if tag in ("th", "thead"):
            self._in_th = False

    def handle_data(self, data: str) -> None:
        if self._in_th and self.tables and data.strip():
            self.tables[-1].append(data.strip())


def test_one_column_spec_feeds_the_markdown_csv_and_html_writers(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from pcbench.bench import report_columns  # noqa: PLC0415 - new module; the other tests run on older code too
    from pcbench.bench.report_columns import Column  # noqa: PLC0415

    extra = Column("epochs_run", "epochs run", "epochs the runs trained", lambda r: r.runs[0].get("last_epoch"),
                   numeric=True)
    monkeypatch.setattr(report_columns, "LEADER_COLUMNS", (*report_columns.LEADER_COLUMNS, extra))
    paths = write_report(synthetic_records(), tmp_path)
    md, text, page = (paths[k].read_text() for k in ("md", "csv", "html"))
    heads = _Heads()
    heads.feed(page)
    acc, eff = (report_columns.table_columns("html", t) for t in (report_columns.ACC, report_columns.EFF))
    leader = heads.tables[:8]  # per section an accuracy then an efficiency table
    for k, (metric, table) in enumerate(zip(("OA", "OA", "OA", "mIoU"), leader[::2], strict=True)):
        assert table == [c.title(metric) for c in acc] and table[-1] == "epochs run"
        assert leader[2 * k + 1] == [c.title(metric) for c in eff] and "epochs run" not in leader[2 * k + 1]
    for kind, width in (("leaderboard", len(acc)), ("efficiency", len(eff))):
        tables = re.findall(rf"<table class='sortable {kind}'.*?</tbody></table>", page)
        assert len(tables) == 4
        for table in tables:
            body = re.sub(r"<table class='prov'>.*?</table>", "", table)
            cells = [row.count("<td") for row in re.findall(r"<tr class='main'.*?</tr>", body)]
            assert cells and set(cells) == {width}  # every row has one cell per header
    md_heads = [line for line in md.splitlines() if line.startswith("| # |")]
    assert len(md_heads) == 8 and sum(h.endswith("| epochs run |") for h in md_heads) == 4
    rows = list(csv.DictReader(io.StringIO(text)))
    assert all(r["epochs_run"] == "10" for r in rows) and len(rows) == 8


def _imports(module: str) -> set[str]:
    tree = ast.parse((REPO / (module.replace(".", "/") + ".py")).read_text())
    found = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    found |= {f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
              for a in n.names}
    return found | {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}


def test_the_report_modules_import_in_one_direction() -> None:
    # report -> report_html -> report_columns -> leaderboard -> published; nothing points back up.
    chain = ["pcbench.bench.report", "pcbench.bench.report_html", "pcbench.bench.report_columns",
             "pcbench.bench.leaderboard", "pcbench.bench.published"]
    for i, module in enumerate(chain):
        assert not _imports(module) & set(chain[:i + 1]), module


def test_hostile_records_stay_text_in_the_html_page() -> None:
    from pcbench.bench.report_html import render_html  # noqa: PLC0415

    page = render_html(_hostile_board(), "<script>t</script>")
    assert "<script>t</script>" not in page and page.count("<script>") == 1
    assert "=HYPERLINK(&quot;http://evil.example&quot;,&quot;x&quot;)" in page
