"""The leaderboard page in a real browser: headless Chromium (Debian's package) driven by playwright.

Checks that the tables and plots render with a visible size, that sorting and the provenance toggle work, that
the console stays free of errors, and saves a screenshot (``PCBENCH_SCREENSHOT_DIR`` keeps a copy).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from pcbench.bench.report import write_report
from tests.bench._records import synthetic_records
from tests.bench.test_report import OPS

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p), None)


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory):
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install .[dev])")
    tmp = tmp_path_factory.mktemp("browser")
    (tmp / "ops.json").write_text(json.dumps(OPS))
    html = write_report(synthetic_records(), tmp / "report", ops=tmp / "ops.json")["html"]
    with sync_api.sync_playwright() as pw:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1500, "height": 1000})
        messages: list[tuple[str, str]] = []
        pg.on("console", lambda m: messages.append((m.type, m.text)))
        pg.on("pageerror", lambda e: messages.append(("pageerror", str(e))))
        pg.on("requestfailed", lambda r: messages.append(("requestfailed", r.url)))
        pg.goto(html.as_uri())
        pg.wait_for_load_state("load")
        yield pg, messages, tmp
        browser.close()


def _column(pg, table: str, col: int) -> list[str]:
    return pg.eval_on_selector_all(f"{table} tbody tr.main", f"rows => rows.map(r => r.cells[{col}].textContent.trim())")


def test_tables_and_plots_render(page) -> None:
    pg, messages, tmp = page
    assert pg.locator("table.leaderboard").count() == 4
    for i in range(4):
        box = pg.locator(f"#t{i}").bounding_box()
        assert box and box["width"] > 400 and box["height"] > 40
    assert pg.locator("svg.plot").count() == 8
    for i in range(8):
        box = pg.locator("svg.plot").nth(i).bounding_box()
        assert box and box["width"] > 300 and box["height"] > 200
    assert pg.locator("svg.plot circle").count() == 16
    assert pg.locator("svg.heatmap rect.cell").count() == 40
    assert pg.locator("table.ops tbody tr").count() == 2
    shot = tmp / "leaderboard.png"
    pg.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    if os.environ.get("PCBENCH_SCREENSHOT_DIR"):
        Path(os.environ["PCBENCH_SCREENSHOT_DIR"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(os.environ["PCBENCH_SCREENSHOT_DIR"]) / shot.name)
    assert [m for m in messages if m[0] in ("error", "pageerror", "requestfailed", "warning")] == []


def test_sorting_and_provenance_toggle(page) -> None:
    pg, messages, _ = page
    before = _column(pg, "#t0", 1)
    assert before == ["pct_cls", "pointnet2_ssg_cls"]
    pg.click("#t0 thead th:nth-child(5)")  # headline score: ascending first
    assert _column(pg, "#t0", 1) == before[::-1]
    assert pg.get_attribute("#t0 thead th:nth-child(5)", "aria-sort") == "ascending"
    pg.click("#t0 thead th:nth-child(5)")
    assert _column(pg, "#t0", 1) == before
    pg.click("#t0 thead th:nth-child(2)")  # text column
    assert _column(pg, "#t0", 1) == sorted(before)
    # each provenance row still follows its model row after sorting
    pairs = pg.eval_on_selector_all("#t0 tbody tr.main", "rows => rows.map(r => r.nextElementSibling.className)")
    assert pairs == ["prov-row", "prov-row"]
    prov = pg.locator("#t0 tr.prov-row").first
    assert not prov.is_visible()
    pg.locator("#t0 button.prov-toggle").first.click()
    assert prov.is_visible() and "config_sha256" in prov.inner_text()
    pg.locator("#t0 button.prov-toggle").first.click()
    assert not prov.is_visible()
    assert [m for m in messages if m[0] in ("error", "pageerror")] == []
