"""Results store: round trip, lookup by config hash, many writer processes, migration, export/import."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
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


# ---------------------------------------------------------------------------------------------- v3 identity
def _train_cfg(seed: int = 0, lr: float = 0.01, threads: int = 1) -> dict:
    return {"model": {"_target_": "m.Net", "width": 8}, "optim": {"lr": lr}, "seed": seed,
            "trainer": {"max_steps": 2, "threads": threads}, "paths": {"run_dir": f"/runs/{seed}"}}


def test_identity_drops_seed_and_placement_and_is_checked(tmp_path: Path) -> None:
    from pcbench.bench.record import identity_sha256
    from pcbench.train.config import config_identity_sha256

    def rec(cfg: dict) -> dict:
        return record_from_metrics(None, cell="c", config={"train": cfg, "probe": {"repeats": 1}}, status="running",
                                   host=HOST)

    a, b, c = rec(_train_cfg(0)), rec(_train_cfg(seed=5, threads=8)), rec(_train_cfg(lr=0.5))
    assert a["identity_sha256"] == config_identity_sha256(_train_cfg(0))  # the trainer's identity of the run
    assert a["identity_sha256"] == b["identity_sha256"] and a["config_sha256"] != b["config_sha256"]
    assert c["identity_sha256"] != a["identity_sha256"]
    plain = record_from_metrics(None, cell="c", config={"model": "x", "seed": 3}, status="running", host=HOST)
    assert plain["identity_sha256"] == identity_sha256({"model": "x", "seed": 9})
    with pytest.raises(ValueError, match="identity_sha256 .* does not match its config"):
        normalize_record({**a, "identity_sha256": c["identity_sha256"]})
    with ResultStore(tmp_path / "r.sqlite") as store:
        store.add(a)
        assert store.get(a["result_id"])["identity_sha256"] == a["identity_sha256"]


def _v2_store(path: Path, rows: list[tuple[str, dict, dict | None]]) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    for version, script, _ in MIGRATIONS[:2]:
        for stmt in script.split(";"):
            if stmt.strip():
                conn.execute(stmt)
        conn.execute(f"PRAGMA user_version={version}")
    for rid, config, extra in rows:
        conn.execute("INSERT INTO results (result_id, status, cell, config_json, config_sha256, extra_json, "
                     "recorded_at) VALUES (?, 'finished', 'c', ?, ?, ?, '2025-01-01T00:00:00+00:00')",
                     (rid, json.dumps(config), config_sha256(config), json.dumps(extra) if extra else None))
    conn.close()


def test_migration_to_v3_computes_identity_and_split_roles_of_old_rows(tmp_path: Path) -> None:
    from pcbench.train.config import config_identity_sha256

    scannet = {"splits": {"train": "train", "val": "val", "test": "val"}, "lr": 0.1}
    _v2_store(tmp_path / "v2.sqlite", [("s0", {"train": _train_cfg(0), "probe": {}}, scannet),
                                       ("s1", {"train": _train_cfg(1), "probe": {}}, None),
                                       ("lr", {"train": _train_cfg(0, lr=0.5), "probe": {}}, None)])
    with ResultStore(tmp_path / "v2.sqlite") as store:
        assert store.version == SCHEMA_VERSION == 3
        s0, s1, lr = store.get("s0"), store.get("s1"), store.get("lr")
        assert store.claims() == []
    assert s0["identity_sha256"] == s1["identity_sha256"] == config_identity_sha256(_train_cfg(7))
    assert lr["identity_sha256"] != s0["identity_sha256"]
    # ScanNet's final evaluation ran on val: the role is a typed field now, not something read out of extra
    assert s0["splits"] == {"train": "train", "val": "val", "final": "val", "final_role": "val"}
    assert s0["extra"] == {"lr": 0.1} and s1["splits"] is None
    assert s0 == normalize_record(s0)


def test_import_of_an_old_export_gets_identity_and_splits(tmp_path: Path) -> None:
    rec = synthetic_records()[0]
    old = {k: v for k, v in rec.items() if k not in ("identity_sha256", "splits")}
    old["extra"] = {**(old["extra"] or {}), "splits": {"train": "train", "val": "train", "test": "test"}}
    (tmp_path / "old.jsonl").write_text(json.dumps(old) + "\n")
    (got,) = read_jsonl(tmp_path / "old.jsonl")
    assert got["identity_sha256"] == rec["identity_sha256"] is not None
    splits = record_from_metrics({"splits": {"train": "train", "val": "train", "test": "test"}}, cell="c",
                                 config={"a": 1}, host=HOST)["splits"]
    assert splits == {"train": "train", "val": "train", "final": "test", "final_role": "test"}


# ------------------------------------------------------------------------------------ read-only readers
def _other_app_db(path: Path) -> bytes:
    """Another application's SQLite file (rollback journal), with its own table called ``results``."""
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE results (id INTEGER PRIMARY KEY, score REAL)")
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.executemany("INSERT INTO results (score) VALUES (?)", [(0.5,), (0.7,)])
    conn.commit()
    conn.close()
    return path.read_bytes()


def test_report_and_results_refuse_another_apps_sqlite_without_changing_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pcbench.cli import report, results

    db = tmp_path / "app.sqlite"
    before = _other_app_db(db)
    assert report.main([f"results={db}", f"out={tmp_path / 'rep'}"]) == 2
    assert "is not a pcbench results store" in capsys.readouterr().err
    for cmd in (["list"], ["export", f"out={tmp_path / 'x.jsonl'}"], ["import", str(tmp_path / "none.jsonl")]):
        assert results.main([cmd[0], f"results={db}", *cmd[1:]]) == 2
    with pytest.raises(ValueError, match="is not a pcbench results store .* left untouched"):
        ResultStore(db)  # a writer refuses it too, before it could create a table or switch the journal
    with pytest.raises(ValueError, match="is not a pcbench results store"):
        ResultStore.open_readonly(db)
    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.sqlite"]  # no -wal / -shm / report folder
    (tmp_path / "text.sqlite").write_text("not sqlite at all\n" * 100)
    with pytest.raises(ValueError, match="text.sqlite is not a pcbench results store"):
        ResultStore.open_readonly(tmp_path / "text.sqlite")
    with pytest.raises(ValueError, match="text.sqlite is not a pcbench results store"):
        ResultStore(tmp_path / "text.sqlite")
    (tmp_path / "empty.sqlite").touch()
    with pytest.raises(ValueError, match="empty database"):
        ResultStore.open_readonly(tmp_path / "empty.sqlite")
    assert (tmp_path / "empty.sqlite").stat().st_size == 0


def test_readonly_reader_reads_an_old_store_without_upgrading_it(tmp_path: Path) -> None:
    import random

    m = metrics_json(random.Random(1), seed=0, level=0.9, num_classes=5, vote=False, test_selected=False)
    _v1_store(tmp_path / "old.sqlite", {"val": m["val"], "test": m["test"]})
    before = (tmp_path / "old.sqlite").read_bytes()
    with ResultStore.open_readonly(tmp_path / "old.sqlite") as store:
        (rec,) = store.records()
        assert rec["test"] == m["test"] and rec["identity_sha256"] is not None
        with pytest.raises(ValueError, match="opened read-only"):
            store.fail(rec["result_id"], "x")
    assert (tmp_path / "old.sqlite").read_bytes() == before
    conn = sqlite3.connect(f"file:{tmp_path / 'old.sqlite'}?mode=ro", uri=True)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    conn.close()
    # a current store being written (WAL) is read consistently and stays writable by its writer
    with ResultStore(tmp_path / "cur.sqlite") as w:
        w.add(synthetic_records()[0])
        with ResultStore.open_readonly(tmp_path / "cur.sqlite") as r:
            assert len(r.records()) == 1
        w.add(synthetic_records()[1])
        assert len(w) == 2


# ---------------------------------------------------------------------------------------------- claims
def test_claim_is_exclusive_and_a_dead_claimers_claim_is_taken_over(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    from pcbench.bench.store import process_alive, process_start

    host = socket.gethostname()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with ResultStore(tmp_path / "r.sqlite") as store:
            assert store.claim("a" * 64) == ("claimed", None)
            assert store.claim("a" * 64) == ("claimed", None)  # re-claiming our own cell is fine
            assert store.claim("b" * 64, pid=other.pid) == ("claimed", None)  # the other process's claim
            state, holder = store.claim("b" * 64)
            assert state == "held" and holder["pid"] == other.pid and holder["hostname"] == host
            assert process_alive(other.pid, process_start(other.pid))
            other.kill()
            other.wait()
            assert not process_alive(other.pid, holder["pid_start"])
            state, dead = store.claim("b" * 64)
            assert state == "taken_over" and dead["pid"] == other.pid
            assert {(c["config_sha256"][0], c["pid"]) for c in store.claims()} == {("a", os.getpid()),
                                                                                   ("b", os.getpid())}
            # a claim of another host cannot be checked from here: it is honoured
            assert store.claim("c" * 64, hostname="elsewhere", pid=1) == ("claimed", None)
            assert store.claim("c" * 64)[0] == "held"
            assert store.release("c" * 64) is False and store.claim("c" * 64)[0] == "held"
            # pid reuse: a live pid whose process started at another time is a different (gone) claimer
            store._conn.execute("INSERT INTO claims VALUES (?, NULL, ?, ?, '1', 'then')", ("d" * 64, host, 1))
            assert store.claim("d" * 64)[0] == ("taken_over" if process_start(1) != "1" else "held")
            assert store.release("a" * 64) is True and store.claim("a" * 64) == ("claimed", None)
            # a finished cell is not claimed at all
            cfg = {"x": 1}
            rid = store.add(record_from_metrics(None, cell="e", config=cfg, status="running", host=HOST))
            store.finish(rid, test={"oa": 0.5})
            state, rec = store.claim(config_sha256(cfg))
            assert state == "finished" and rec["result_id"] == rid
            assert config_sha256(cfg) not in {c["config_sha256"] for c in store.claims()}
    finally:
        other.kill()
        other.wait()


def _claimer(path: str, sha: str, ready: mp.Queue, done: mp.Event) -> None:  # type: ignore[type-arg]
    with ResultStore(path, timeout=120) as store:
        ready.put(store.claim(sha)[0])
        done.wait(120)  # hold the claim (stay alive) until every process has tried


def test_concurrent_claims_of_one_cell_grant_exactly_one(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    path = str(tmp_path / "r.sqlite")
    ResultStore(path).close()
    ready, done = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_claimer, args=(path, "f" * 64, ready, done)) for _ in range(4)]
    for p in procs:
        p.start()
    try:
        states = sorted(ready.get(timeout=120) for _ in procs)
    finally:
        done.set()
        for p in procs:
            p.join(60)
    assert states == ["claimed", "held", "held", "held"]


# ---------------------------------------------------------------------------------------------- import CLI
def test_import_cli_exits_1_naming_the_conflicting_line_and_fields(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from pcbench.cli import results

    recs = synthetic_records()[:3]
    db = tmp_path / "r.sqlite"
    with ResultStore(db) as store:
        store.add(recs[0])
    clash = {**recs[0], "test": {**recs[0]["test"], "oa": 0.01}}
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in (recs[1], clash, recs[2])) + "\n")
    assert results.main(["import", f"results={db}", str(tmp_path / "in.jsonl")]) == 1
    err = capsys.readouterr().err
    assert f"in.jsonl:2: result {recs[0]['result_id']} differs from the stored record in test" in err
    with ResultStore.open_readonly(db) as store:
        assert store.get(recs[0]["result_id"]) == recs[0] and len(store) == 3  # the others were merged
    assert results.main(["import", f"results={db}", str(tmp_path / "in.jsonl")]) == 1  # still a conflict
    (tmp_path / "same.jsonl").write_text(json.dumps(recs[1]) + "\n")
    assert results.main(["import", f"results={db}", str(tmp_path / "same.jsonl")]) == 0


def test_import_of_a_line_nested_too_deep_is_a_one_line_error(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from pcbench.cli import results

    rec = synthetic_records()[0]
    (tmp_path / "deep.jsonl").write_text(json.dumps(rec) + "\n" + '{"extra": ' + "[" * 200_000 + "\n")
    with pytest.raises(ValueError, match=r"deep.jsonl:2: .*nested too deep"):
        read_jsonl(tmp_path / "deep.jsonl")
    assert results.main(["import", f"results={tmp_path / 'r.sqlite'}", str(tmp_path / "deep.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "deep.jsonl:2:" in err and "Traceback" not in err
    assert not (tmp_path / "r.sqlite").exists()


def test_release_frees_a_claim_of_another_host(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pcbench.cli import results

    db = tmp_path / "r.sqlite"
    with ResultStore(db) as store:
        store.claim("ab" * 32, hostname="node7", pid=4242)
        store.claim("cd" * 32)
        with pytest.raises(ValueError, match="at least 8 lowercase hex"):
            store.drop_claims("abab")
    assert results.main(["list", f"results={db}"]) == 0
    assert f"claimed  {'ab' * 6} by pid 4242 on host node7" in capsys.readouterr().out
    assert results.main(["release", f"results={db}", "abababab"]) == 0
    assert f"released {'ab' * 6}: claimed by pid 4242 on host node7" in capsys.readouterr().out
    with ResultStore(db) as store:
        assert [c["config_sha256"] for c in store.claims()] == ["cd" * 32]
        assert store.claim("ab" * 32) == ("claimed", None)


def test_split_roles_of_a_metrics_json_reach_the_report_as_typed_field() -> None:
    from pcbench.bench.report import build_leaderboard

    m = metrics_json(__import__("random").Random(2), seed=0, level=0.6, num_classes=3, vote=False,
                     test_selected=False)
    m["splits"] = {"train": "train", "val": "val", "test": "val"}  # ScanNet: the final evaluation is on val
    rec = record_from_metrics(m, cell="c", config={"m": 1}, model="ptv3_seg", dataset="scannet20", task="seg",
                              host=HOST)
    assert rec["splits"]["final_role"] == "val" and "splits" not in (rec["extra"] or {})
    sections = [(d, p) for d, p, _ in build_leaderboard([rec]).sections()]
    assert ("scannet20", "val") in sections and not any(p.startswith("test") for _, p in sections)


def test_a_store_created_between_two_reads_is_not_taken_for_a_foreign_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Another process commits the new store's schema between the inspector's version read and its table
    # read: in one read transaction both see the same snapshot (before: version 0 and tables -> "foreign").
    from pcbench.bench import store as store_mod

    path = tmp_path / "s.sqlite"
    creator = sqlite3.connect(path, isolation_level=None)
    creator.execute("PRAGMA journal_mode=wal")
    creator.execute("BEGIN IMMEDIATE")
    for version, script, _ in MIGRATIONS:
        for stmt in script.split(";"):
            if stmt.strip():
                creator.execute(stmt)
        creator.execute(f"PRAGMA user_version={version}")
    connect = sqlite3.connect

    class CommitsInBetween:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
            cur = self.conn.execute(sql, *args)
            if sql.startswith("PRAGMA user_version") and creator.in_transaction:
                creator.execute("COMMIT")
            return cur

        def close(self) -> None:
            self.conn.close()

    monkeypatch.setattr(store_mod.sqlite3, "connect", lambda *a, **k: CommitsInBetween(connect(*a, **k)))
    assert store_mod._inspect(path, reading=False) == 0  # the snapshot before the commit: a new, empty store
    monkeypatch.undo()
    creator.close()
    assert store_mod._inspect(path, reading=True) == SCHEMA_VERSION
