"""The results store: one SQLite file (stdlib ``sqlite3``) that every benchmark job writes its records into.

Why SQLite: one file to copy, no server, and with WAL journaling many processes can append at once while
a reader (the report) reads a consistent snapshot. Every write is one ``BEGIN IMMEDIATE`` transaction, so
concurrent jobs queue on the write lock (``timeout`` seconds) instead of losing or corrupting a row.
WAL needs shared memory between the processes, so it does not work on network filesystems (NFS, Lustre):
on a cluster let each job write a store on local disk (or its own file) and merge them with
``pcbench-results export`` / ``import``; ``ResultStore(path, wal=False)`` uses a rollback journal instead.

The schema is versioned with SQLite's ``PRAGMA user_version`` and upgraded in place by ``MIGRATIONS``
(applied in order, each in the same transaction as its version bump):

- v1: one ``results`` row per cell run with the metrics.json dict as a single ``metrics_json`` blob.
- v2: per-split metric columns (``val_json``, ``test_json``, ``test_vote_json``, ``test_selected_json``)
  split out of that blob by SQL (the rest of it goes to ``extra_json``), plus the sweep ``variant``, the
  paper ``recipe``, its ``fidelity`` (reference / pcbench variant), ``class_names_json``, ``allocator``,
  ``cuda_version``, ``python_version``, and indexes on the config hash and on (dataset, model).
- v3: ``identity_sha256`` (the config without seed and placement: a leaderboard row's identity; old rows get it
  computed from their stored config) and ``splits_json`` (split roles; old rows get it from ``extra.splits``),
  and the ``claims`` table: one row per cell being run, so two runners never run the same cell at once.

Readers (the report, ``pcbench-results export|list``) open a store with :meth:`ResultStore.open_readonly`:
SQLite's ``mode=ro``, no migration, no journal switch, and a file that is not a pcbench store is refused
before anything could touch it (an older store is migrated in memory for reading).
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pcbench.bench.record import (
    JSON_FIELDS,
    RECORD_FIELDS,
    identity_sha256,
    normalize_record,
    now_iso,
    split_roles,
)
from pcbench.io import atomic_path

__all__ = ["DEFAULT_RESULTS", "MIGRATIONS", "SCHEMA_VERSION", "ImportSummary", "ResultStore", "process_alive",
           "process_start", "read_jsonl", "read_jsonl_numbered", "schema_columns"]

#: Where the store lives unless ``results=<path>`` says otherwise (Hydra's outputs folder of the working dir).
DEFAULT_RESULTS = Path("outputs") / "results.sqlite"

_V1 = """
CREATE TABLE results (
    result_id TEXT PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('running', 'finished', 'failed')),
    error TEXT, log_path TEXT, run_dir TEXT,
    suite TEXT, cell TEXT NOT NULL, model TEXT, dataset TEXT, task TEXT, seed INTEGER,
    config_json TEXT, config_sha256 TEXT NOT NULL,
    selected_on TEXT, best_epoch INTEGER, last_epoch INTEGER, epochs INTEGER, steps INTEGER,
    metrics_json TEXT,
    train_samples_per_s REAL, eval_samples_per_s REAL, peak_memory_mib REAL, params INTEGER, wall_s REAL,
    probe_json TEXT,
    pcbench_version TEXT, git_commit TEXT, dataset_manifest_sha256 TEXT, torch_version TEXT,
    device TEXT, device_name TEXT, cpu_model TEXT, num_threads INTEGER, hostname TEXT,
    started_at TEXT, finished_at TEXT, recorded_at TEXT NOT NULL
);
CREATE INDEX results_status ON results (status);
"""

_V2 = """
ALTER TABLE results ADD COLUMN variant TEXT;
ALTER TABLE results ADD COLUMN recipe TEXT;
ALTER TABLE results ADD COLUMN fidelity TEXT;
ALTER TABLE results ADD COLUMN val_json TEXT;
ALTER TABLE results ADD COLUMN test_json TEXT;
ALTER TABLE results ADD COLUMN test_vote_json TEXT;
ALTER TABLE results ADD COLUMN test_selected_json TEXT;
ALTER TABLE results ADD COLUMN class_names_json TEXT;
ALTER TABLE results ADD COLUMN extra_json TEXT;
ALTER TABLE results ADD COLUMN cuda_version TEXT;
ALTER TABLE results ADD COLUMN allocator TEXT;
ALTER TABLE results ADD COLUMN python_version TEXT;
UPDATE results SET
    val_json = json_extract(metrics_json, '$.val'),
    test_json = json_extract(metrics_json, '$.test'),
    test_vote_json = json_extract(metrics_json, '$.test_vote'),
    test_selected_json = json_extract(metrics_json, '$.test_selected'),
    extra_json = NULLIF(json_remove(metrics_json, '$.val', '$.test', '$.test_vote', '$.test_selected'), '{}')
WHERE metrics_json IS NOT NULL;
ALTER TABLE results DROP COLUMN metrics_json;
CREATE INDEX results_config ON results (config_sha256, status);
CREATE INDEX results_dataset_model ON results (dataset, model);
"""

_V3 = """
ALTER TABLE results ADD COLUMN identity_sha256 TEXT;
ALTER TABLE results ADD COLUMN splits_json TEXT;
CREATE INDEX results_identity ON results (identity_sha256, status);
CREATE TABLE claims (
    config_sha256 TEXT PRIMARY KEY,
    result_id TEXT, hostname TEXT NOT NULL, pid INTEGER NOT NULL, pid_start TEXT, claimed_at TEXT NOT NULL
);
"""


def _backfill_v3(conn: sqlite3.Connection) -> None:
    """Identity and split roles of the rows written before v3, from their stored config and extras."""
    rows = conn.execute("SELECT result_id, config_json, extra_json FROM results").fetchall()
    for rid, config_json, extra_json in rows:
        ident = identity_sha256(json.loads(config_json)) if config_json else None
        extra = json.loads(extra_json) if extra_json else {}
        splits = split_roles(extra.pop("splits", None) if isinstance(extra.get("splits"), dict) else None)
        conn.execute("UPDATE results SET identity_sha256 = ?, splits_json = ?, extra_json = ? WHERE result_id = ?",
                     (ident, json.dumps(splits, sort_keys=True) if splits else None,
                      json.dumps(extra, sort_keys=True) if extra else None, rid))


#: (version, SQL, Python step or None) in order; a store at version v gets every step after v.
MIGRATIONS: tuple[tuple[int, str, Callable[[sqlite3.Connection], None] | None], ...] = (
    (1, _V1, None), (2, _V2, None), (3, _V3, _backfill_v3))
SCHEMA_VERSION = MIGRATIONS[-1][0]

_RANK = {"running": 0, "failed": 1, "finished": 1}


def _column(field: str) -> str:
    return f"{field}_json" if field in JSON_FIELDS else field


def schema_columns() -> list[str]:
    """The ``results`` columns of the current schema, in RECORD_FIELDS order."""
    return [_column(f) for f in RECORD_FIELDS]


class ImportSummary(dict):
    """Counts of an import: added, updated (a running row replaced by its finished version), unchanged,
    stale (an older running copy of a stored finished/failed result: the stored row is kept), conflicts (same
    result_id, different content of the same standing: the stored row is kept). ``conflicting`` lists
    ``(result_id, [fields that differ])`` of each conflict."""

    def __init__(self, **counts: int) -> None:
        super().__init__(**counts)
        self.conflicting: list[tuple[str, list[str]]] = []


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, /proc/<pid>/stat), or None where unknown: with the
    pid it names one process, so a claim of a dead process is not mistaken for one of a later process that got
    the same pid."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[19] if len(fields) > 19 else None


def process_alive(pid: int, start: str | None = None) -> bool:
    """Whether process ``pid`` of this host runs (a zombie does not), and is the one that started at ``start``."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return True  # no /proc (not Linux): kill(pid, 0) is all we know
    if state and state[0] in ("Z", "X"):
        return False
    return start is None or (len(state) > 19 and state[19] == start)


_CLAIM_COLUMNS = ("config_sha256", "result_id", "hostname", "pid", "pid_start", "claimed_at")


class ResultStore:
    """Read and write benchmark results in one SQLite file; safe for many writer processes at once.

    Use one ``ResultStore`` per process (SQLite connections must not cross ``fork``). ``timeout`` is how long
    a writer waits for the lock held by another before giving up with ``sqlite3.OperationalError``.
    """

    def __init__(self, path: str | os.PathLike[str] = DEFAULT_RESULTS, *, timeout: float = 120.0,
                 wal: bool = True, create: bool = True) -> None:
        self.path = Path(path)
        self.readonly = False
        if self.path.is_dir():
            raise ValueError(f"results={self.path} is a folder; give a file path such as {self.path / 'results.sqlite'}")
        if not self.path.exists():
            if not create:
                raise ValueError(f"results={self.path} does not exist; run a suite first (pcbench-bench) or "
                                 "import records into it (pcbench-results import results=<path> FILE.jsonl)")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        else:  # before this connection may create a table or switch the journal of someone else's file
            _inspect(self.path, reading=False, timeout=timeout)
        self._conn = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None)
        try:
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._set_journal(wal, timeout)
            self._conn.execute("PRAGMA synchronous=FULL")
            self.migrate()
        except sqlite3.DatabaseError as err:
            self._conn.close()
            raise ValueError(f"results={self.path} is not a pcbench results store ({err}); point results= at "
                             "a .sqlite file made by pcbench or at a new path") from err

    @classmethod
    def open_readonly(cls, path: str | os.PathLike[str] = DEFAULT_RESULTS, *, timeout: float = 120.0) -> ResultStore:
        """Open a store for reading only (SQLite ``mode=ro``): the file is never changed, a file that is not a
        pcbench store is refused, and an older schema is migrated in a private in-memory copy."""
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"results={path} is a folder; give the .sqlite file pcbench-bench wrote")
        if not path.is_file():
            raise ValueError(f"results={path} does not exist; run a suite first (pcbench-bench) or import records "
                             "into it (pcbench-results import results=<path> FILE.jsonl)")
        version = _inspect(path, reading=True, timeout=timeout)
        self = cls.__new__(cls)
        self.path, self.readonly = path, False
        self._conn = sqlite3.connect(_readonly_uri(path), uri=True, timeout=timeout, isolation_level=None)
        if version < SCHEMA_VERSION:  # upgrade a copy for this reader; the file keeps its version
            memory = sqlite3.connect(":memory:", isolation_level=None)
            self._conn.backup(memory)
            self._conn.close()
            self._conn = memory
            self.migrate()
        self.readonly = True
        return self

    # -- connection and schema -------------------------------------------------------------------------
    def _set_journal(self, wal: bool, timeout: float) -> None:
        want = "wal" if wal else "delete"
        deadline = time.monotonic() + timeout
        while True:  # switching the journal mode needs a moment alone with the file; retry while others write
            try:
                mode = self._conn.execute(f"PRAGMA journal_mode={want}").fetchone()[0]
                break
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        if mode != want and not (want == "delete" and mode == "wal"):
            raise ValueError(f"results={self.path}: SQLite kept journal_mode={mode} instead of {want} (a "
                             "filesystem without shared memory?); use a local disk path or wal=False")

    @property
    def version(self) -> int:
        """The schema version of the file (``PRAGMA user_version``)."""
        return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self, target: int = SCHEMA_VERSION) -> int:
        """Upgrade the file to ``target`` (default: current) inside one transaction; returns the version."""
        if self.version == target:
            return target
        with self._write():
            current = self.version  # re-read under the write lock: another process may have migrated it
            if current > SCHEMA_VERSION:
                raise ValueError(f"results={self.path} has schema version {current}, newer than this pcbench "
                                 f"({SCHEMA_VERSION}); upgrade pcbench to read it")
            for version, script, step in MIGRATIONS:
                if current < version <= target:
                    for statement in _statements(script):
                        self._conn.execute(statement)
                    if step is not None:
                        step(self._conn)
                    self._conn.execute(f"PRAGMA user_version={version}")
                    current = version
        return current

    def close(self) -> None:
        """Close the connection (the file stays consistent either way)."""
        self._conn.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    class _Tx:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def __enter__(self) -> sqlite3.Connection:
            self.conn.execute("BEGIN IMMEDIATE")  # take the write lock now: no upgrade deadlock later
            return self.conn

        def __exit__(self, exc_type: type | None, *exc: object) -> None:
            self.conn.execute("ROLLBACK" if exc_type else "COMMIT")

    def _write(self) -> ResultStore._Tx:
        if self.readonly:
            raise ValueError(f"results={self.path} was opened read-only (ResultStore.open_readonly); open it with "
                             "ResultStore(path) to write")
        return ResultStore._Tx(self._conn)

    # -- rows <-> records ---------------------------------------------------------------------------------
    def _check_current(self) -> None:
        if self.version != SCHEMA_VERSION:
            raise ValueError(f"results={self.path} is at schema version {self.version}, not {SCHEMA_VERSION}; "
                             "call migrate() first")

    @staticmethod
    def _to_row(record: Mapping[str, Any]) -> dict[str, Any]:
        return {_column(f): (json.dumps(v, sort_keys=True) if f in JSON_FIELDS and v is not None else v)
                for f, v in record.items()}

    @staticmethod
    def _from_row(row: sqlite3.Row | tuple, names: list[str]) -> dict[str, Any]:
        values = dict(zip(names, row, strict=True))
        return {f: (json.loads(values[_column(f)]) if f in JSON_FIELDS and values[_column(f)] is not None
                    else values[_column(f)]) for f in RECORD_FIELDS}

    def _select(self, where: str = "", params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        self._check_current()
        cols = schema_columns()
        cur = self._conn.execute(f"SELECT {', '.join(cols)} FROM results {where}", tuple(params))
        return [self._from_row(r, cols) for r in cur.fetchall()]

    # -- writing ------------------------------------------------------------------------------------------
    def add(self, record: Mapping[str, Any]) -> str:
        """Insert a new record (normalized first); ValueError if its result_id is already stored."""
        rec = normalize_record(record)
        rec["recorded_at"] = rec["recorded_at"] or now_iso()
        self._check_current()
        row = self._to_row(rec)
        with self._write() as conn:
            try:
                conn.execute(f"INSERT INTO results ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                             tuple(row.values()))
            except sqlite3.IntegrityError as err:
                raise ValueError(f"result_id {rec['result_id']} is already in results={self.path}; use update() "
                                 "to change it or a new id (record_from_metrics makes one)") from err
        return rec["result_id"]

    def update(self, result_id: str, **fields: Any) -> dict[str, Any]:
        """Change fields of a stored record (e.g. running -> finished with its metrics); returns the record."""
        with self._write() as conn:
            current = self._select("WHERE result_id = ?", (result_id,))
            if not current:
                raise ValueError(f"result_id {result_id!r} is not in results={self.path}")
            rec = normalize_record({**current[0], **fields})
            row = self._to_row(rec)
            conn.execute(f"UPDATE results SET {', '.join(f'{c} = ?' for c in row)} WHERE result_id = ?",
                         (*row.values(), result_id))
        return rec

    def finish(self, result_id: str, **fields: Any) -> dict[str, Any]:
        """Mark a running record finished and store its metrics/probe fields."""
        return self.update(result_id, status="finished", finished_at=fields.pop("finished_at", now_iso()), **fields)

    def fail(self, result_id: str, error: str, log_path: str | None = None, **fields: Any) -> dict[str, Any]:
        """Mark a record failed with the error text and the log to read."""
        return self.update(result_id, status="failed", error=error, log_path=log_path,
                           finished_at=fields.pop("finished_at", now_iso()), **fields)

    # -- reading ------------------------------------------------------------------------------------------
    def get(self, result_id: str) -> dict[str, Any] | None:
        """The record with this id, or None."""
        rows = self._select("WHERE result_id = ?", (result_id,))
        return rows[0] if rows else None

    def records(self, status: str | None = None, suite: str | None = None,
                dataset: str | None = None) -> list[dict[str, Any]]:
        """Every record matching the filters, oldest first."""
        conds, params = [], []
        for col, val in (("status", status), ("suite", suite), ("dataset", dataset)):
            if val is not None:
                conds.append(f"{col} = ?")
                params.append(val)
        where = ("WHERE " + " AND ".join(conds) + " " if conds else "") + "ORDER BY recorded_at, rowid"
        return self._select(where, params)

    def finished(self, config_sha256: str) -> dict[str, Any] | None:
        """The latest finished record of a resolved-config hash (the runner skips such cells), or None."""
        rows = self._select("WHERE config_sha256 = ? AND status = 'finished' ORDER BY finished_at DESC, rowid "
                            "DESC LIMIT 1", (config_sha256,))
        return rows[0] if rows else None

    def finished_hashes(self) -> set[str]:
        """Config hashes with at least one finished record."""
        self._check_current()
        cur = self._conn.execute("SELECT DISTINCT config_sha256 FROM results WHERE status = 'finished'")
        return {r[0] for r in cur.fetchall()}

    # -- claims: one live runner per cell --------------------------------------------------------------
    def claim(self, config_sha256: str, result_id: str | None = None, *, hostname: str | None = None,
              pid: int | None = None) -> tuple[str, dict[str, Any] | None]:
        """Claim the cell ``config_sha256`` for this process, atomically (one write transaction).

        Returns ``("finished", record)`` when a finished record exists (nothing to run, nothing claimed),
        ``("held", claim)`` when a live process holds it (or one on another host, whose liveness cannot be
        checked from here), ``("taken_over", claim)`` when the holder was a process of this host that is gone
        (its claim is replaced by ours), or ``("claimed", None)``.
        """
        host = hostname or socket.gethostname()
        pid = os.getpid() if pid is None else int(pid)
        start = process_start(pid)
        self._check_current()
        with self._write() as conn:
            done = self._select("WHERE config_sha256 = ? AND status = 'finished' ORDER BY finished_at DESC, rowid "
                                "DESC LIMIT 1", (config_sha256,))
            if done:
                return "finished", done[0]
            row = conn.execute(f"SELECT {', '.join(_CLAIM_COLUMNS)} FROM claims WHERE config_sha256 = ?",
                               (config_sha256,)).fetchone()
            holder = dict(zip(_CLAIM_COLUMNS, row, strict=True)) if row else None
            state = "claimed"
            if holder is not None:
                mine = (holder["hostname"], holder["pid"], holder["pid_start"]) == (host, pid, start)
                if not mine and (holder["hostname"] != host or process_alive(holder["pid"], holder["pid_start"])):
                    return "held", holder
                state = "claimed" if mine else "taken_over"
            conn.execute(f"INSERT OR REPLACE INTO claims ({', '.join(_CLAIM_COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?)",
                         (config_sha256, result_id, host, pid, start, now_iso()))
        return state, (holder if state == "taken_over" else None)

    def release(self, config_sha256: str, *, hostname: str | None = None, pid: int | None = None) -> bool:
        """Drop this process's claim of a cell (True if it held one); another process's claim stays."""
        host = hostname or socket.gethostname()
        pid = os.getpid() if pid is None else int(pid)
        with self._write() as conn:
            cur = conn.execute("DELETE FROM claims WHERE config_sha256 = ? AND hostname = ? AND pid = ?",
                               (config_sha256, host, pid))
        return cur.rowcount > 0

    def drop_claims(self, prefix: str) -> list[dict[str, Any]]:
        """Remove every claim whose config hash starts with ``prefix`` (at least 8 characters), whoever holds it;
        returns them. For a claim of another host whose runner is known to be gone (its liveness cannot be
        checked from here)."""
        if len(prefix) < 8 or any(c not in "0123456789abcdef" for c in prefix):
            raise ValueError(f"config hash prefix {prefix!r}: give at least 8 lowercase hex characters of the "
                             "cell's config hash (pcbench-results list shows them)")
        with self._write() as conn:
            rows = conn.execute(f"SELECT {', '.join(_CLAIM_COLUMNS)} FROM claims WHERE config_sha256 LIKE ?",
                                (prefix + "%",)).fetchall()
            conn.execute("DELETE FROM claims WHERE config_sha256 LIKE ?", (prefix + "%",))
        return [dict(zip(_CLAIM_COLUMNS, r, strict=True)) for r in rows]

    def claims(self) -> list[dict[str, Any]]:
        """Every current claim (config_sha256, result_id, hostname, pid, pid_start, claimed_at), oldest first."""
        self._check_current()
        cur = self._conn.execute(f"SELECT {', '.join(_CLAIM_COLUMNS)} FROM claims ORDER BY claimed_at, rowid")
        return [dict(zip(_CLAIM_COLUMNS, r, strict=True)) for r in cur.fetchall()]

    def __len__(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM results").fetchone()[0])

    # -- export / import ----------------------------------------------------------------------------------
    def export_jsonl(self, out: str | os.PathLike[str], status: str | None = None) -> int:
        """Write every record (or those with ``status``) as JSON lines, atomically; returns the count."""
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        recs = self.records(status=status)
        with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for rec in recs:
                f.write(json.dumps(rec, sort_keys=True) + "\n")
        return len(recs)

    def import_records(self, records: Iterable[Mapping[str, Any]]) -> ImportSummary:
        """Merge records by result_id in one transaction: new ids are added, the same result twice stays
        one row, a stored ``running`` row is replaced by its finished/failed version."""
        summary = ImportSummary(added=0, updated=0, unchanged=0, stale=0, conflicts=0)
        recs = [normalize_record(r) for r in records]
        self._check_current()
        with self._write() as conn:
            for rec in recs:
                rec["recorded_at"] = rec["recorded_at"] or now_iso()
                have = self._select("WHERE result_id = ?", (rec["result_id"],))
                row = self._to_row(rec)
                if not have:
                    conn.execute(f"INSERT INTO results ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                                 tuple(row.values()))
                    summary["added"] += 1
                elif have[0] == rec:
                    summary["unchanged"] += 1
                elif _RANK[have[0]["status"]] < _RANK[rec["status"]]:
                    conn.execute(f"UPDATE results SET {', '.join(f'{c} = ?' for c in row)} WHERE result_id = ?",
                                 (*row.values(), rec["result_id"]))
                    summary["updated"] += 1
                elif _RANK[have[0]["status"]] > _RANK[rec["status"]]:
                    summary["stale"] += 1
                else:
                    summary["conflicts"] += 1
                    differ = sorted(k for k in RECORD_FIELDS if k != "recorded_at" and have[0][k] != rec[k])
                    summary.conflicting.append((rec["result_id"], differ or ["recorded_at"]))
        return summary

    def import_jsonl(self, path: str | os.PathLike[str]) -> ImportSummary:
        """Import a file written by ``export_jsonl`` (all lines checked before anything is written)."""
        return self.import_records(read_jsonl(path))


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Records of a JSON-lines export; ValueError naming the file and line of a bad one."""
    return [rec for _, rec in read_jsonl_numbered(path)]


def read_jsonl_numbered(path: str | os.PathLike[str]) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` of a JSON-lines export; ValueError naming the file and line of a bad one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is not a file; give a .jsonl written by pcbench-results export")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
                out.append((n, normalize_record(rec)))
            except RecursionError as err:  # the parser recurses per nesting level; no record is that deep
                raise ValueError(f"{path}:{n}: not a pcbench result record: JSON nested too deep "
                                 f"(more than Python's recursion limit of {sys.getrecursionlimit()} levels)") from err
            except ValueError as err:  # json.JSONDecodeError is a ValueError
                raise ValueError(f"{path}:{n}: not a pcbench result record: {err}") from err
    return out


def _readonly_uri(path: Path) -> str:
    return "file:" + urllib.parse.quote(str(path.resolve())) + "?mode=ro"


def _inspect(path: Path, reading: bool, timeout: float = 120.0) -> int:
    """The schema version of an existing file, read without changing it; ValueError if it is not a pcbench
    store (another application's database, or not SQLite at all). An empty database is a new store for a
    writer and refused by a reader."""
    try:  # timeout: wait while another process holds a lock (e.g. creating the store right now)
        conn = sqlite3.connect(_readonly_uri(path), uri=True, isolation_level=None, timeout=timeout)
    except sqlite3.Error as err:
        raise ValueError(f"results={path} cannot be opened ({err}); check the path and its permissions") from err
    try:  # one read transaction: a store being created by another process is seen before or after, never half
        conn.execute("BEGIN")
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        tables = sorted(r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
        columns = {r[1] for r in conn.execute("PRAGMA table_info(results)")}
        conn.execute("COMMIT")
    except sqlite3.OperationalError as err:  # locked too long, unreadable: not a statement about the contents
        raise ValueError(f"results={path} cannot be read ({err}); check the path, its permissions and whether "
                         "another process holds it locked") from err
    except sqlite3.DatabaseError as err:
        raise ValueError(f"results={path} is not a pcbench results store ({err}); it was left untouched. Point "
                         "results= at a .sqlite file made by pcbench (or, to write, at a new path)") from err
    finally:
        conn.close()
    if version > SCHEMA_VERSION:
        raise ValueError(f"results={path} has schema version {version}, newer than this pcbench "
                         f"({SCHEMA_VERSION}); upgrade pcbench to read it")
    if not tables and version == 0:
        if reading:
            raise ValueError(f"results={path} is an empty database, not a pcbench results store; run a suite "
                             "into it first (pcbench-bench results=<path>)")
        return 0
    if version < 1 or not {"result_id", "config_sha256", "status"} <= columns:
        raise ValueError(f"results={path} is not a pcbench results store (SQLite schema version {version}, tables "
                         f"{tables[:8]}); it was left untouched. Point results= at a .sqlite file made by pcbench "
                         "(or, to write, at a new path)")
    return version


def _statements(script: str) -> Iterator[str]:
    """Split a migration script into statements (sqlite3's executescript would commit our transaction)."""
    for stmt in script.split(";"):
        if stmt.strip():
            yield stmt.strip()
