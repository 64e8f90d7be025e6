import builtins
import json
import os
import sys

import pytest
import torch

from benchmarks import harness
from benchmarks.harness import Case, Entry, markdown_table, optional_entry, run_cases


class _FakeClock:
    """A perf_counter that only advances when an entry "works": timings are exact, whatever the load."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def work(self, ms: float):
        def fn() -> None:
            self.now += ms / 1e3

        return fn


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _FakeClock:
    c = _FakeClock()
    monkeypatch.setattr(harness.time, "perf_counter", c)
    return c


def test_ratio_is_relative_to_fastest_peer(tmp_path, clock):
    case = Case("op", "toy", [Entry("pcbench", clock.work(4)), Entry("slow", clock.work(16)),
                              Entry("fast", clock.work(2))])
    rows = run_cases([case], out_dir=tmp_path, repeats=3, warmup=1, title="t", verbose=False)
    by = {r["impl"]: r for r in rows}
    assert by["pcbench"]["median_ms"] == pytest.approx(4.0)
    assert by["pcbench"]["fastest_peer"] == "fast"
    assert by["pcbench"]["ratio_to_fastest_peer"] == pytest.approx(2.0)
    record = json.loads((tmp_path / "t.json").read_text())
    assert record["environment"]["torch"] and len(record["rows"]) == 3
    assert "| op | toy | pcbench | 4.00 | 2.00x |" in (tmp_path / "t.md").read_text()


def test_failing_peer_is_reported_not_fatal():
    def boom():
        raise MemoryError("too big")

    rows = run_cases([Case("op", "x", [Entry("pcbench", lambda: None), Entry("peer", boom)])], verbose=False,
                     repeats=1, warmup=0)
    peer = next(r for r in rows if r["impl"] == "peer")
    assert peer["median_ms"] is None and "MemoryError" in peer["error"]
    assert "failed" in markdown_table(rows)


@pytest.mark.parametrize("error", [ImportError("No module named 'ghost'"),
                                   OSError("libusb-1.0.so.0: cannot open shared object file")])
def test_unavailable_peer_is_a_row_not_dropped(clock, error):
    def build():
        raise error

    entry = optional_entry("ghost", build, "note")
    assert entry.name == "ghost" and entry.unavailable == f"{type(error).__name__}: {error}"
    assert optional_entry("real", lambda: (lambda: 1)).fn() == 1
    case = Case("op", "x", [Entry("pcbench", clock.work(3)), entry, Entry("peer", clock.work(6))])
    rows = run_cases([case], verbose=False, repeats=1, warmup=0)
    by = {r["impl"]: r for r in rows}
    assert by["ghost"]["median_ms"] is None and by["ghost"]["error"] == f"unavailable: {entry.unavailable}"
    assert by["pcbench"]["ratio_to_fastest_peer"] == pytest.approx(0.5)
    assert by["pcbench"]["peers_timed"] == ["peer"] and by["pcbench"]["peers_unavailable"] == ["ghost"]
    table = markdown_table(rows)
    assert f"| op | x | ghost | unavailable: {type(error).__name__}: " in table and "failed" not in table


def test_knn_benchmark_shows_a_peer_that_fails_to_import(monkeypatch):
    # open3d without libusb raises OSError at import: the kNN case keeps an "unavailable" open3d row.
    from benchmarks import bm_ops_knn  # noqa: PLC0415

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.split(".")[0] in ("open3d", "pykdtree"):
            raise OSError(f"{name}: libusb-1.0.so.0: cannot open shared object file") if name.startswith(
                "open3d") else ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    coord = torch.rand(64, 3, generator=torch.Generator().manual_seed(0))
    case = bm_ops_knn.knn_case("toy", coord, torch.tensor([64]), 4)
    names = [e.name for e in case.entries]
    assert "open3d nns" in names and "pykdtree" in names
    rows = run_cases([case], verbose=False, repeats=1, warmup=0)
    table = markdown_table(rows)
    assert "| open3d nns | unavailable: OSError: open3d: libusb-1.0.so.0" in table
    assert "| pykdtree | unavailable: ImportError: No module named 'pykdtree" in table
    ours = next(r for r in rows if r["impl"] == "pcbench")
    assert ours["peers_unavailable"] == ["open3d nns", "pykdtree"]


def test_time_fn_counts_warmup_and_repeats():
    from benchmarks.harness import time_fn

    calls = []
    assert len(time_fn(lambda: calls.append(1), repeats=4, warmup=2)) == 4
    assert len(calls) == 6


def test_run_json_worker_result_failure_and_timeout() -> None:
    from benchmarks.harness import run_json_worker

    env = dict(os.environ)
    ok = [sys.executable, "-c", "print('log line'); print('{\"a\": 1}'); print('{\"a\": 2}')"]
    assert run_json_worker(ok, env, 60) == ({"a": 2}, None)
    bad = [sys.executable, "-c", "import sys; print('{\"a\": 1}'); sys.exit('no peer here')"]
    assert run_json_worker(bad, env, 60) == (None, "exit 1: no peer here")
    silent = [sys.executable, "-c", "pass"]
    assert run_json_worker(silent, env, 60) == (None, "exit 0: no output")
    slow = [sys.executable, "-c", "import time; time.sleep(30)"]
    assert run_json_worker(slow, env, 0.5) == (None, "timeout after 0.5 s")
