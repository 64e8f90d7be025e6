"""Results store: round trip, lookup by config hash, many writer processes, migration, export/import."""

from __future__ import annotations

import json
import multiprocessing as mp
import sqlite3
from pathlib import Path

import pytest

from pcbench.bench.record import RECORD_FIELDS, config_sha256, normalize_record, record_from_metrics
from pcbench.bench.store import MIGRATIONS, SCHEMA_VERSION, ResultStore, read_jsonl, schema_columns
from tests.bench._records import HOST, metrics_json, synthetic_records


def test_round_trip_every_field(tmp_path: Path) -> None:
    recs = synthetic_records()
    with ResultStore(tmp_path / "r.sqlite") as store:
        for r in recs:
            store.add(r)
        assert len(store) == len(recs)
        for r in recs:
            assert store.get(r["result_id"]) == r
        assert [r["result_id"] for r in store.records(status="failed")] == [recs[-1]["result_id"]]
        assert len(store.records(dataset="scannet20")) == 6


def test_schema_holds_every_record_field(tmp_path: Path) -> None:
    with ResultStore(tmp_path / "r.sqlite") as store:
        cols = [r[1] for r in store._conn.execute("PRAGMA table_info(results)")]
        assert store.version == SCHEMA_VERSION
        assert store._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert sorted(cols) == sorted(schema_columns())
    assert len(cols) == len(RECORD_FIELDS)


def test_finished_lookup_by_config_hash(tmp_path: Path) -> None:
    cfg = {"model": "pct_cls", "seed": 3}
    with ResultStore(tmp_path / "r.sqlite") as store:
        rid = store.add(record_from_metrics(None, cell="c", config=cfg, status="running", host=HOST))
        assert store.finished(config_sha256(cfg)) is None
        assert store.finished_hashes() == set()
        m = metrics_json(__import__("random").Random(0), seed=3, level=0.8, num_classes=4, vote=False,
                         test_selected=False)
        store.finish(rid, test=m["test"], val=m["val"])
        hit = store.finished(config_sha256(cfg))
        assert hit is not None and hit["result_id"] == rid and hit["test"] == m["test"]
        assert store.finished_hashes() == {config_sha256(cfg)}
        # key order does not change the identity of a config
        assert store.finished(config_sha256({"seed": 3, "model": "pct_cls"}))["result_id"] == rid
        assert store.finished(config_sha256({"model": "pct_cls", "seed": 4})) is None
        failed = store.fail(store.add(record_from_metrics(None, cell="d", config={"x": 1}, status="running",
                                                          host=HOST)), "ValueError: boom", "/tmp/log.txt")
        assert failed["status"] == "failed" and failed["log_path"] == "/tmp/log.txt"
        assert store.finished(config_sha256({"x": 1})) is None


def test_bad_records_are_refused_with_the_field_named(tmp_path: Path) -> None:
    good = synthetic_records()[0]
    with pytest.raises(ValueError, match="unknown fields \\['accuracy'\\]"):
        normalize_record({**good, "accuracy": 0.9})
    with pytest.raises(ValueError, match="'status' is 'done'"):
        normalize_record({**good, "status": "done"})
    with pytest.raises(ValueError, match="failed result needs 'error'"):
        normalize_record({**good, "status": "failed", "error": None})
    with pytest.raises(ValueError, match="test.oa=93.2 is not a fraction"):
        normalize_record({**good, "test": {**good["test"], "oa": 93.2}})
    with pytest.raises(ValueError, match="does not match its config"):
        normalize_record({**good, "config": {"other": 1}})
    with pytest.raises(ValueError, match="'seed' must be int"):
        normalize_record({**good, "seed": "zero"})
    with pytest.raises(ValueError, match="lacks \\['cell'\\]"):
        normalize_record({**good, "cell": None})
    with ResultStore(tmp_path / "r.sqlite") as store:
        store.add(good)
        with pytest.raises(ValueError, match="already in results="):
            store.add(good)
        with pytest.raises(ValueError, match="'nope' is not in results="):
            store.update("nope", status="finished")
    (tmp_path / "junk.sqlite").write_text("not a database, just text " * 100)
    with pytest.raises(ValueError, match="not a pcbench results store"):
        ResultStore(tmp_path / "junk.sqlite")
    with pytest.raises(ValueError, match="does not exist"):
        ResultStore(tmp_path / "absent.sqlite", create=False)
    with pytest.raises(ValueError, match="is a folder"):
        ResultStore(tmp_path)


def _writer(path: str, worker: int, n: int) -> None:
    with ResultStore(path, timeout=300) as store:
        for i in range(n):
            rec = record_from_metrics({"test": {"oa": 0.5}, "seed": i}, cell=f"w{worker}/c{i}",
                                      config={"worker": worker, "i": i}, status="running", host=HOST)
            rid = store.add(rec)
            store.finish(rid, test={"oa": 0.5 + i / 1000})


def test_concurrent_writer_processes_lose_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.sqlite")  # created, set to WAL and migrated by whichever process comes first
    workers, n = 8, 15
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, w, n)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    assert [p.exitcode for p in procs] == [0] * workers
    with ResultStore(path) as store:
        recs = store.records()
        assert store._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert len(recs) == workers * n
    assert {r["cell"] for r in recs} == {f"w{w}/c{i}" for w in range(workers) for i in range(n)}
    assert all(r["status"] == "finished" and r["test"]["oa"] == 0.5 + int(r["cell"].split("c")[-1]) / 1000
               for r in recs)


def _v1_store(path: Path, metrics: dict) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    for stmt in MIGRATIONS[0][1].split(";"):
        if stmt.strip():
            conn.execute(stmt)
    conn.execute("PRAGMA user_version=1")
    conn.execute("INSERT INTO results (result_id, status, cell, model, dataset, seed, config_json, config_sha256, "
                 "metrics_json, best_epoch, device, recorded_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                 ("abc", "finished", "pct_cls/modelnet40/seed=0", "pct_cls", "modelnet40", 0, json.dumps({"s": 0}),
                  config_sha256({"s": 0}), json.dumps(metrics), 7, "cpu", "2025-01-01T00:00:00+00:00"))
    conn.close()


def test_migration_from_v1_splits_the_metrics_blob(tmp_path: Path) -> None:
    import random

    m = metrics_json(random.Random(1), seed=0, level=0.9, num_classes=5, vote=True, test_selected=True)
    blob = {k: m[k] for k in ("val", "test", "test_vote", "test_selected")} | {"lr": 0.1}
    _v1_store(tmp_path / "old.sqlite", blob)
    with ResultStore(tmp_path / "old.sqlite") as store:
        assert store.version == SCHEMA_VERSION
        rec = store.get("abc")
        cols = {r[1] for r in store._conn.execute("PRAGMA table_info(results)")}
        indexes = {r[1] for r in store._conn.execute("PRAGMA index_list(results)")}
    assert "metrics_json" not in cols and {"results_config", "results_dataset_model"} <= indexes
    for split in ("val", "test", "test_vote", "test_selected"):
        assert rec[split] == m[split]
    assert rec["extra"] == {"lr": 0.1}
    assert rec["best_epoch"] == 7 and rec["variant"] is None and rec["recipe"] is None
    assert rec == normalize_record(rec)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite"
    ResultStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(ValueError, match=f"schema version {SCHEMA_VERSION + 1}, newer than this pcbench"):
        ResultStore(path)


def test_export_import_round_trip_and_idempotent_merge(tmp_path: Path) -> None:
    recs = synthetic_records()
    half = len(recs) // 2
    with ResultStore(tmp_path / "a.sqlite") as a, ResultStore(tmp_path / "b.sqlite") as b:
        for r in recs[:half]:
            a.add(r)
        for r in recs[half - 2:]:  # machines overlap by two records
            b.add(r)
        assert a.export_jsonl(tmp_path / "a.jsonl") == half
        assert b.export_jsonl(tmp_path / "b.jsonl") == len(recs) - half + 2
    assert read_jsonl(tmp_path / "a.jsonl") == recs[:half]
    with ResultStore(tmp_path / "merged.sqlite") as m:
        assert m.import_jsonl(tmp_path / "a.jsonl") == {"added": half, "updated": 0, "unchanged": 0, "stale": 0,
                                                          "conflicts": 0}
        s = m.import_jsonl(tmp_path / "b.jsonl")
        assert s == {"added": len(recs) - half, "updated": 0, "unchanged": 2, "stale": 0, "conflicts": 0}
        assert m.import_jsonl(tmp_path / "a.jsonl")["unchanged"] == half
        assert len(m) == len(recs)
        assert sorted(m.records(), key=lambda r: r["result_id"]) == sorted(recs, key=lambda r: r["result_id"])


def test_import_replaces_running_by_finished_and_keeps_conflicts(tmp_path: Path) -> None:
    rec = record_from_metrics(None, cell="c", config={"a": 1}, status="running", host=HOST)
    done = {**rec, "status": "finished", "test": {"oa": 0.7}}
    with ResultStore(tmp_path / "r.sqlite") as store:
        store.add(rec)
        assert store.import_records([done]) == {"added": 0, "updated": 1, "unchanged": 0, "stale": 0, "conflicts": 0}
        assert store.get(rec["result_id"])["test"] == {"oa": 0.7}
        older = store.import_records([rec])  # an older running copy never overwrites, and is no conflict
        assert older["stale"] == 1 and older["conflicts"] == 0 and older.conflicting == []
        clash = store.import_records([{**done, "test": {"oa": 0.1}}])
        assert clash["conflicts"] == 1 and clash.conflicting == [(rec["result_id"], ["test"])]
        assert store.get(rec["result_id"])["test"] == {"oa": 0.7}
        assert len(store) == 1


def test_import_names_the_bad_line_and_writes_nothing(tmp_path: Path) -> None:
    recs = synthetic_records()[:3]
    lines = [json.dumps(r) for r in recs]
    lines[1] = json.dumps({**recs[1], "status": "exploded"})
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    with ResultStore(tmp_path / "r.sqlite") as store:
        with pytest.raises(ValueError, match=r"bad.jsonl:2: not a pcbench result record: .*'exploded'"):
            store.import_jsonl(tmp_path / "bad.jsonl")
        (tmp_path / "trunc.jsonl").write_text(lines[0] + "\n" + lines[2][:40] + "\n")
        with pytest.raises(ValueError, match="trunc.jsonl:2"):
            store.import_jsonl(tmp_path / "trunc.jsonl")
        assert len(store) == 0


def test_absent_class_nan_is_stored_as_null_and_exports_standard_json(tmp_path: Path) -> None:
    nan = float("nan")
    rec = record_from_metrics({"val": {"miou": 0.5, "iou_per_class": [0.5, nan, 0.5], "oa": nan}}, cell="c",
                              config={"a": 1}, host=HOST)
    assert rec["val"] == {"miou": 0.5, "iou_per_class": [0.5, None, 0.5], "oa": None}
    with ResultStore(tmp_path / "r.sqlite") as store:
        store.add(rec)
        store.export_jsonl(tmp_path / "x.jsonl")
    line = (tmp_path / "x.jsonl").read_text()
    assert "NaN" not in line and json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard {c}"))
