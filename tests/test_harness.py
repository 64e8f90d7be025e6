import json

from benchmarks.harness import Case, Entry, markdown_table, optional_entry, run_cases


def _sleep_ms(ms: float):
    import time

    return lambda: time.sleep(ms / 1e3)


def test_ratio_is_relative_to_fastest_peer(tmp_path):
    case = Case("op", "toy", [Entry("pcbench", _sleep_ms(4)), Entry("slow", _sleep_ms(16)), Entry("fast", _sleep_ms(2))])
    rows = run_cases([case], out_dir=tmp_path, repeats=3, warmup=1, title="t", verbose=False)
    by = {r["impl"]: r for r in rows}
    assert by["pcbench"]["fastest_peer"] == "fast"
    assert 1.3 < by["pcbench"]["ratio_to_fastest_peer"] < 3.5
    record = json.loads((tmp_path / "t.json").read_text())
    assert record["environment"]["torch"] and len(record["rows"]) == 3
    assert "| op | toy | pcbench |" in (tmp_path / "t.md").read_text()


def test_failing_peer_is_reported_not_fatal():
    def boom():
        raise MemoryError("too big")

    rows = run_cases([Case("op", "x", [Entry("pcbench", lambda: None), Entry("peer", boom)])], verbose=False,
                     repeats=1, warmup=0)
    peer = next(r for r in rows if r["impl"] == "peer")
    assert peer["median_ms"] is None and "MemoryError" in peer["error"]
    assert "failed" in markdown_table(rows)


def test_optional_entry_missing_module():
    def build():
        import not_a_real_module_xyz  # noqa: F401

        return lambda: None

    assert optional_entry("ghost", build) is None
    assert optional_entry("real", lambda: (lambda: 1)).fn() == 1


def test_time_fn_counts_warmup_and_repeats():
    from benchmarks.harness import time_fn

    calls = []
    assert len(time_fn(lambda: calls.append(1), repeats=4, warmup=2)) == 4
    assert len(calls) == 6
