"""Shared machinery of the dataset preparers: errors, input reading and hashing, atomic writes, the
output-folder guard, a fault-tolerant parallel map and skip-if-done bookkeeping.

The prepared-data format itself (manifest schema, ragged HDF5 reader and writer, format version) lives
in :mod:`pcbench.data.format`; it is re-exported here for the preparers.

Preparer contract (every module ``data_prep.<dataset>`` that ``pcbench-prep <dataset>`` dispatches to)
------------------------------------------------------------------------------------------------------
``OPTIONS: dict[str, Option]``
    Every ``key=value`` option the preparer accepts, with default, type, choices and a help line;
    ``pcbench-prep <dataset> --help`` prints them. Values arrive already parsed by :func:`parse_options`.
``check(raw: Path, options: dict, workers: int = 1, progress: bool | None = None) -> list[str]``
    Validate the raw folder as :func:`prepare` would (every sample is read and converted, nothing is
    written), honouring the same options (e.g. ``allow_missing``); return one human-readable line per
    problem that would make preparation fail a sample or refuse to start (each names the file, the
    field and the fix). ``[]`` means ready to prepare. Shows a progress bar like ``prepare``.
``prepare(raw: Path, out: Path, options: dict, workers: int) -> Report``
    Convert raw official files into ``out``: HDF5 shards written with :func:`write_ragged_h5` (through
    :func:`atomic_write`) plus ``manifest.json`` written with :func:`write_manifest`. Must be
    idempotent and resumable: units of work (e.g. one shard) are skipped when :class:`DoneLog` says
    their inputs, options and outputs are unchanged. One bad sample never loses the others: record it in
    ``Report.failed`` and go on (an unreadable input fails only its own sample; with ``allow_missing``
    it goes to ``Report.missing``); the CLI exits non-zero when ``Report.failed`` is not empty.
    Do the work inside ``with OutputFolder(out, dataset, command) as folder:`` (lock, ownership,
    manifest invalidation, never-worse-on-failure, see :class:`OutputFolder`).
    Typical body (see ``data_prep/modelnet.py``): build a list of :class:`ShardJob` (key, split, output
    shard path, raw input paths, payload), write a module-level ``process(job, raw, options) ->
    ShardResult``, call :func:`run_shard_jobs` (parallel, skip-if-done, failures into the Report), then
    assemble the manifest from the returned records and :meth:`OutputFolder.commit` it.
    Option values are typed by :func:`parse_options`; the CLI may fix some per dataset name
    (``data_prep.cli.DATASETS``: e.g. modelnet10 = modelnet with num_classes=10).

Prepared layout
---------------
``out/manifest.json`` (see :mod:`pcbench.data.format`) and HDF5 shards in the ragged format of
:func:`write_ragged_h5`, read back lazily with :class:`RaggedH5Reader`. Bookkeeping lives in
``out/.done/`` (one JSON record per finished unit of work) and may be deleted to force a full rebuild.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pcbench.data.format import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    REQUIRED_MANIFEST_KEYS,
    STATUS_COMPLETE,
    PrepError,
    RaggedH5Reader,
    incomplete_manifest,
    manifest_body,
    read_manifest,
    write_ragged_h5,
)
from pcbench.data.format import json_default as _json_default
from pcbench.io import TEMP_PREFIX, atomic_path, write_text

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "REQUIRED_MANIFEST_KEYS",
    "DoneLog",
    "InputUnreadable",
    "Option",
    "OutputFolder",
    "PrepError",
    "PrepLock",
    "RaggedH5Reader",
    "Report",
    "ShardJob",
    "ShardResult",
    "atomic_write",
    "atomic_write_text",
    "check_shard_jobs",
    "clean_stale_temps",
    "done_record",
    "hash_files",
    "input_key",
    "input_path",
    "input_problem",
    "parallel_map",
    "parse_options",
    "prep_command",
    "read_input",
    "read_manifest",
    "read_text_input",
    "require_folder",
    "run_shard_job",
    "run_shard_jobs",
    "sha256_bytes",
    "sha256_file",
    "verify_inputs",
    "verify_outputs",
    "write_manifest",
    "write_ragged_h5",
]

DONE_DIR = ".done"


class InputUnreadable(PrepError):
    """A raw input that exists (or is listed) but cannot be read: permission denied, a broken symbolic
    link, a symbolic link loop, a folder where a file should be. Fails only its own sample; with
    ``allow_missing=true`` the sample is skipped and listed in ``Report.missing``."""


# ------------------------------------------------------------------------------------ reading inputs
def _reason(err: OSError, path: Path) -> str:
    if err.errno == errno.ELOOP:
        return "symbolic link loop"
    if isinstance(err, FileNotFoundError):
        if os.path.islink(path):
            with contextlib.suppress(OSError):
                return f"broken symbolic link (to {os.readlink(path)!r})"
        return "not found"
    if isinstance(err, IsADirectoryError):
        return "is a folder, not a file"
    return (err.strerror or str(err)).lower()


def input_problem(path: str | os.PathLike) -> str | None:
    """None when ``path`` is a regular file (by ``stat``), else why not: "not found", "broken symbolic
    link (to ...)", "symbolic link loop", "is a folder, not a file", "permission denied", ..."""
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as err:
        return _reason(err, p)
    if stat.S_ISDIR(st.st_mode):
        return "is a folder, not a file"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    return None


def _unreadable_fix(path: Path) -> str:
    return (f"check it with `ls -lL {path}` and restore the file, its link target or its read permission; "
            "or prepare with allow_missing=true to skip it")


def read_input(path: str | os.PathLike) -> bytes:
    """The bytes of a raw input file; InputUnreadable naming the file and the reason when it cannot be read."""
    p = Path(path)
    try:
        return p.read_bytes()
    except OSError as err:
        raise InputUnreadable(f"cannot read ({_reason(err, p)})", p, None, _unreadable_fix(p)) from None


def read_text_input(path: str | os.PathLike, what: str, fix: str) -> str:
    """A UTF-8 text input (split list, label table, class names); PrepError naming the file, the bad
    byte's offset or the read error, and ``fix``."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as err:
        raise PrepError(f"cannot read the {what} ({_reason(err, p)})", p, None, fix) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise PrepError(f"the {what} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}, "
                        f"line {line})", p, None, fix) from None


def require_folder(path: str | os.PathLike, fix: str) -> Path:
    """``path`` if it is a readable folder; PrepError saying whether it is absent, a file or unreadable."""
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as err:
        msg = "folder not found" if isinstance(err, FileNotFoundError) and not os.path.islink(p) else \
            f"folder unreadable ({_reason(err, p)})"
        raise PrepError(msg, p, "raw", fix) from None
    if not stat.S_ISDIR(st.st_mode):
        raise PrepError("is a file, not a folder", p, "raw", fix)
    try:
        with os.scandir(p):
            pass
    except OSError as err:
        raise PrepError(f"folder unreadable ({_reason(err, p)})", p, "raw", fix) from None
    return p


def input_key(path: str | os.PathLike, raw: str | os.PathLike) -> str:
    """Manifest key of an input: its path relative to raw (symlinks not resolved) or ``external:<abs path>``."""
    p, r = Path(os.path.abspath(path)), Path(os.path.abspath(raw))
    return p.relative_to(r).as_posix() if p.is_relative_to(r) else f"external:{p}"


def input_path(key: str, raw: str | os.PathLike) -> Path:
    """The file an :func:`input_key` names."""
    return Path(key.removeprefix("external:")) if key.startswith("external:") else Path(raw) / key


# --------------------------------------------------------------------------------------------- hashing
def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of a byte string."""
    return hashlib.sha256(data).hexdigest()


#: stat fields that must all be unchanged for a cached hash to be reused. ctime_ns cannot be set by a
#: user (os.utime restores mtime but moves ctime to now), so an input edited in place with its
#: modification time restored is hashed again; ino catches a file replaced by another one.
_STAT_KEYS = ("size", "mtime_ns", "ctime_ns", "ino")


def _stat_entry(st: os.stat_result) -> dict[str, int]:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}


def hash_files(paths: Iterable[Path], root: Path, cache: Mapping[str, Mapping[str, Any]] | None = None
               ) -> dict[str, dict[str, Any]]:
    """``{relpath: {"sha256", "size", "mtime_ns", "ctime_ns", "ino"}}`` for ``paths`` (relative to ``root``).

    A ``cache`` entry (from an earlier call) is reused without reading the file when size, mtime,
    ctime and inode are all unchanged, so re-running over thousands of unchanged inputs costs one
    ``stat`` each. A file that cannot be read gets ``{"sha256": None, "error": reason}`` instead of
    raising: the unit goes on, and the sample that needs the file fails (or is skipped) by itself.
    """
    out: dict[str, dict[str, Any]] = {}
    for p in paths:
        p = Path(p)
        rel = p.relative_to(root).as_posix()
        try:
            entry = _stat_entry(os.stat(p))
            old = (cache or {}).get(rel)
            if old and old.get("sha256") and all(old.get(k) == entry[k] for k in _STAT_KEYS):
                out[rel] = dict(old)
            else:
                out[rel] = {"sha256": sha256_file(p), **entry}
        except OSError as err:
            out[rel] = {"sha256": None, "error": _reason(err, p)}
    return out


# ------------------------------------------------------------------------------------------ atomic io
# atomic_write / atomic_write_text: the names the preparers use for pcbench.io's one implementation
atomic_write = atomic_path
atomic_write_text = write_text


def clean_stale_temps(out_dir: str | os.PathLike) -> list[Path]:
    """Delete temporary files left by killed runs under ``out_dir``; returns what was removed.

    Call it only while holding :class:`PrepLock` (no other run can own those files then).
    """
    removed = []
    root = Path(out_dir)
    if root.is_dir():
        for p in root.rglob(f"{TEMP_PREFIX}*"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


class PrepLock:
    """Exclusive lock on an output folder (``out/.pcbench-prep.lock``) so that two runs never mix writes."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.path = Path(out_dir) / ".pcbench-prep.lock"
        self._fd: int | None = None

    def __enter__(self) -> PrepLock:
        import fcntl  # noqa: PLC0415 - POSIX only; imported where used

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise PrepError(f"cannot write here ({_reason(err, self.path)})", self.path.parent, "out",
                            "choose an out= folder you can write to, or fix its permissions") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise PrepError("another pcbench-prep run is writing this folder", self.path.parent, None,
                            "wait for it to finish, or choose another out=") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None
# ------------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class Option:
    """One ``key=value`` option of a preparer: default, type (str/int/float/bool), choices and help."""

    default: Any
    help: str
    type: type = str
    choices: tuple[Any, ...] | None = None


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_options(spec: Mapping[str, Option], given: Mapping[str, Any], dataset: str = "<dataset>"
                  ) -> dict[str, Any]:
    """Defaults of ``spec`` overridden by ``given`` (strings from the command line or typed values).

    Raises PrepError naming the option, its value and the accepted values on unknown keys, unparsable
    values and values outside ``choices``.
    """
    out = {k: o.default for k, o in spec.items()}
    for key, raw in given.items():
        if key not in spec:
            raise PrepError(f"unknown option {key}={raw!r}", None, key,
                            f"use one of {', '.join(sorted(spec))} (see `pcbench-prep {dataset} --help`)")
        opt = spec[key]
        try:
            if isinstance(raw, str) and opt.type is bool:
                low = raw.strip().lower()
                if low not in _TRUE | _FALSE:
                    raise ValueError(raw)
                value: Any = low in _TRUE
            elif isinstance(raw, str) and opt.type is not str:
                value = opt.type(raw.strip())
            elif opt.type is float and isinstance(raw, int) and not isinstance(raw, bool):
                value = float(raw)
            elif not isinstance(raw, opt.type) or (opt.type is int and isinstance(raw, bool)):
                raise ValueError(raw)
            else:
                value = raw
        except ValueError:
            kind = "true/false" if opt.type is bool else opt.type.__name__
            raise PrepError(f"cannot read {key}={raw!r} as {kind}", None, key, f"give a {kind} value") from None
        if opt.choices is not None and isinstance(value, str) and value not in opt.choices:
            folded = {str(c).lower(): c for c in opt.choices}
            value = folded.get(value.lower(), value)  # variant=pb_t50_rs means PB_T50_RS
        if opt.choices is not None and value not in opt.choices:
            raise PrepError(f"{key}={value!r} is not accepted", None, key,
                            f"use one of {', '.join(map(str, opt.choices))}")
        out[key] = value
    return out


def prep_command(dataset: str, raw: str | os.PathLike, out: str | os.PathLike, options: Mapping[str, Any],
                 defaults: Mapping[str, Option] | None = None) -> str:
    """The ``pcbench-prep`` command line that reproduces a preparation (non-default options only)."""
    parts = ["pcbench-prep", dataset, f"raw={raw}", f"out={out}"]
    for k, v in sorted(options.items()):
        if defaults is not None and k in defaults and defaults[k].default == v:
            continue
        parts.append(f"{k}={str(v).lower() if isinstance(v, bool) else v}")
    return " ".join(parts)


# ------------------------------------------------------------------------------------------- reports
@dataclass
class Report:
    """Outcome of one ``prepare`` call; ``failed`` holds ``(sample or unit, message)`` pairs, ``missing``
    the inputs skipped under ``allow_missing=true`` (absent, or unreadable with the reason)."""

    dataset: str
    out: str
    done: int = 0
    skipped: int = 0
    samples: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when no sample or unit failed."""
        return not self.failed

    def summary(self) -> str:
        """A few human-readable lines for the end of a CLI run."""
        lines = [
            f"{self.dataset}: {self.samples} samples written to {self.out} in {self.seconds:.1f} s "
            f"({self.done} units prepared, {self.skipped} already done and skipped)"
        ]
        if self.missing:
            lines.append(f"  skipped {len(self.missing)} listed but absent or unreadable inputs (allow_missing=true), "
                         f"e.g. {', '.join(self.missing[:5])}")
        lines += [f"  warning: {w}" for w in self.warnings[:20]]
        if self.failed:
            lines.append(f"  FAILED {len(self.failed)}:")
            lines += [f"    {name}: {msg}" for name, msg in self.failed[:50]]
            if len(self.failed) > 50:
                lines.append(f"    ... and {len(self.failed) - 50} more (see manifest.json 'validation')")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the manifest's ``validation`` block)."""
        return asdict(self)


# ------------------------------------------------------------------------------------------ manifest
def write_manifest(out_dir: str | os.PathLike, manifest: Mapping[str, Any]) -> Path:
    """Write a complete ``out_dir/manifest.json`` atomically (adds ``format_version``, ``status``, ``created_utc``)."""
    body = manifest_body(manifest)
    path = Path(out_dir) / MANIFEST_NAME
    atomic_write_text(path, json.dumps(body, indent=1, sort_keys=False, default=_json_default) + "\n")
    return path


def _manifest_map(manifest: Mapping[str, Any], key: str, path: Path) -> Mapping[str, str]:
    value = manifest.get(key)
    if not isinstance(value, Mapping):
        raise PrepError(f"manifest.json has no {key!r} table ({type(value).__name__} found)", path / MANIFEST_NAME,
                        key, f"re-prepare with: {manifest.get('command') or 'the pcbench-prep command that made it'}")
    return value


def verify_outputs(out_dir: str | os.PathLike, manifest: Mapping[str, Any] | None = None) -> list[str]:
    """Compare every file listed in ``manifest['outputs']`` with its recorded sha256; returns the problems."""
    root = Path(out_dir)
    manifest = manifest if manifest is not None else read_manifest(root)
    problems = []
    for rel, digest in _manifest_map(manifest, "outputs", root).items():
        p = root / rel
        if not p.is_file():
            problems.append(f"{p}: missing")
        elif sha256_file(p) != digest:
            problems.append(f"{p}: sha256 differs from manifest.json (file changed or corrupt)")
    return problems


def verify_inputs(raw: str | os.PathLike, manifest: Mapping[str, Any], out_dir: str | os.PathLike = ".") -> list[str]:
    """Re-hash every raw input listed in ``manifest['inputs']`` (no stat cache); returns the problems.

    Catches inputs changed after preparation, including edits whose modification time was restored.
    """
    problems = []
    for key, digest in _manifest_map(manifest, "inputs", Path(out_dir)).items():
        p = input_path(key, raw)
        why = input_problem(p)
        if why is not None:
            problems.append(f"{p}: input {why}")
            continue
        try:
            now = sha256_file(p)
        except OSError as err:
            problems.append(f"{p}: input unreadable ({_reason(err, p)})")
            continue
        if now != digest:
            problems.append(f"{p}: input changed since preparation (sha256 differs from manifest.json); "
                            "re-run the preparation to use it")
    return problems


# ------------------------------------------------------------------------------------- parallel map
class WorkerError(Exception):
    """An exception raised inside a worker that could not be sent back as itself (text kept)."""


def _call(fn: Callable[[Any], Any], item: Any) -> tuple[bool, Any]:
    try:
        return True, fn(item)
    except Exception as err:  # noqa: BLE001 - every failure is reported to the caller, never lost
        try:
            import pickle  # noqa: PLC0415

            pickle.loads(pickle.dumps(err))
            return False, err
        except Exception:  # noqa: BLE001
            return False, WorkerError("".join(traceback.format_exception(err)).strip())


def _worker_init() -> None:
    # one thread per worker (the pool already uses every core); torch reads this when (if) it is imported,
    # so workers that never touch torch do not pay its import
    os.environ["OMP_NUM_THREADS"] = "1"
    import signal  # noqa: PLC0415

    # Ctrl-C reaches the whole process group; the parent alone decides (it stops the pool at once),
    # so a worker must not turn it into a failed item and go on with the next one
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):  # die with the parent: a killed run must not leave writers behind
        with contextlib.suppress(Exception):
            import ctypes  # noqa: PLC0415

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _stop_pool(pool: Any) -> None:
    """Cancel every queued item and end the worker processes now (Ctrl-C, or the consumer stopped)."""
    procs = list((getattr(pool, "_processes", None) or {}).values())  # public API only from Python 3.14
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        with contextlib.suppress(Exception):
            p.terminate()
    for p in procs:
        with contextlib.suppress(Exception):
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


def parallel_map(fn: Callable[[Any], Any], items: Sequence[Any], workers: int = 1, desc: str = "",
                 progress: bool | None = None) -> Iterator[tuple[Any, Any]]:
    """Apply ``fn`` to every item, yielding ``(item, result)`` or ``(item, exception)`` as they finish.

    ``workers <= 1`` runs in this process in order (easy to debug); otherwise a spawn-started
    process pool is used (``fn`` must be a module-level function; the workers get the allocator
    settings of ``pcbench._malloc.TUNED_MALLOC``). An exception in one item is returned for that item and the
    others go on; if a worker process dies hard, the items still pending are returned with the error.
    Ctrl-C (KeyboardInterrupt), or the consumer closing the generator, cancels the queued items and
    terminates the workers at once (their unfinished atomic writes leave only temporary files).
    A tqdm bar on stderr shows progress (``progress=None``: only when stderr is a terminal).
    """
    from tqdm import tqdm  # noqa: PLC0415

    if progress is None:
        progress = sys.stderr.isatty()
    bar = tqdm(total=len(items), desc=desc, disable=not progress, unit="unit", dynamic_ncols=True)
    try:
        if workers <= 1 or len(items) <= 1:
            for it in items:
                ok, res = _call(fn, it)
                bar.update(1)
                yield it, res
            return
        import multiprocessing as mp  # noqa: PLC0415
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait  # noqa: PLC0415
        from concurrent.futures.process import BrokenProcessPool  # noqa: PLC0415

        from pcbench._malloc import TUNED_MALLOC  # noqa: PLC0415

        env_keep = {k: os.environ.get(k) for k in (*TUNED_MALLOC, "OMP_NUM_THREADS")}
        # glibc reads these only at process start: set them before spawning so workers inherit them
        for k, v in TUNED_MALLOC.items():
            os.environ.setdefault(k, v)
        os.environ["OMP_NUM_THREADS"] = "1"
        try:
            pool = ProcessPoolExecutor(max_workers=min(workers, len(items)), mp_context=mp.get_context("spawn"),
                                       initializer=_worker_init)
            try:
                futs = {pool.submit(_call, fn, it): it for it in items}
                pending = set(futs)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        it = futs[fut]
                        try:
                            ok, res = fut.result()
                        except BrokenProcessPool as err:
                            res = WorkerError(f"worker process died while handling this item ({err}); "
                                              "re-run to resume (finished work is kept)")
                        bar.update(1)
                        yield it, res
            except BaseException:
                _stop_pool(pool)
                raise
            pool.shutdown(wait=True)
        finally:
            for k, v in env_keep.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    finally:
        bar.close()


# ----------------------------------------------------------------------------------- skip-if-done log
class DoneLog:
    """Skip-if-done records: one JSON file per finished unit of work in ``out/.done/``.

    A unit is done when its record exists, its input hashes and options equal the current ones and
    every output it lists still exists with the recorded sha256. Write the outputs first (atomically),
    then :meth:`mark`; a kill in between leaves no record, so the unit is simply redone.
    """

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.root = Path(out_dir)
        self.dir = self.root / DONE_DIR

    def _record_path(self, unit: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in unit)
        return self.dir / f"{safe}-{sha256_bytes(unit.encode())[:10]}.json"

    def record(self, unit: str) -> dict[str, Any] | None:
        """The stored record of ``unit`` or None."""
        p = self._record_path(unit)
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def records(self) -> list[dict[str, Any]]:
        """Every readable record in the log."""
        out = []
        if self.dir.is_dir():
            for p in sorted(self.dir.glob("*.json")):
                with contextlib.suppress(OSError, json.JSONDecodeError, UnicodeDecodeError):
                    rec = json.loads(p.read_text(encoding="utf-8"))
                    if isinstance(rec, dict):
                        out.append(rec)
        return out

    def is_done(self, unit: str, inputs: Mapping[str, Mapping[str, Any]], options: Mapping[str, Any],
                verify_outputs: bool = True) -> bool:
        """True when ``unit`` finished with these inputs (``hash_files`` output) and options."""
        rec = self.record(unit)
        if rec is None:
            return False
        if {k: v["sha256"] for k, v in inputs.items()} != rec.get("inputs"):
            return False
        if json.loads(json.dumps(dict(options), default=_json_default)) != rec.get("options"):
            return False
        for rel, digest in rec.get("outputs", {}).items():
            p = self.root / rel
            if not p.is_file() or (verify_outputs and sha256_file(p) != digest):
                return False
        return True

    def mark(self, unit: str, inputs: Mapping[str, Mapping[str, Any]], options: Mapping[str, Any],
             outputs: Sequence[str], extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Record ``unit`` as finished with ``outputs`` (paths relative to the out folder); returns the record."""
        rec = {
            "unit": unit,
            "inputs": {k: v["sha256"] for k, v in inputs.items()},
            "input_stats": {k: dict(v) for k, v in inputs.items()},
            "options": json.loads(json.dumps(dict(options), default=_json_default)),
            "outputs": {rel: sha256_file(self.root / rel) for rel in outputs},
            **(dict(extra) if extra else {}),
        }
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self._record_path(unit), json.dumps(rec, default=_json_default))
        return rec

    def prune(self, keep: Iterable[str]) -> list[str]:
        """Delete the records of units not in ``keep`` (e.g. after a shard_size change); returns their names."""
        keep_paths = {self._record_path(u) for u in keep}
        gone = []
        if self.dir.is_dir():
            for p in self.dir.glob("*.json"):
                if p not in keep_paths:
                    p.unlink()
                    gone.append(p.name)
        return gone

    def input_cache(self, unit: str) -> dict[str, Any]:
        """The stat cache of ``unit``'s last record, for :func:`hash_files`."""
        rec = self.record(unit)
        return rec.get("input_stats", {}) if rec else {}


# ------------------------------------------------------------------------------------ output folder
def _stat_key(p: Path) -> tuple[int, ...] | None:
    try:
        st = os.stat(p)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class OutputFolder:
    """One preparation's hold on ``out=``: never deletes what it did not write, never leaves the folder
    worse than it found it, and marks the folder while it is half rewritten.

    * Ownership: a file belongs to pcbench-prep when ``manifest.json`` (``outputs``, ``owned_outputs``,
      ``retained_outputs``) or a ``.done/`` record lists it. :meth:`claim` refuses to overwrite any
      other file; nothing else is ever deleted.
    * :meth:`begin_writes` (called before the first shard is written) replaces ``manifest.json`` with an
      incomplete manifest carrying the new command, so readers refuse the half-rewritten folder with the
      command that finishes it (:func:`pcbench.data.format.read_manifest`).
    * :meth:`commit` writes the new manifest. Only when every planned output was written does it delete
      the owned files the new manifest no longer lists (e.g. after a ``shard_size`` change); otherwise they
      stay, listed as ``retained_outputs``. When some units failed and nothing was written, the previous
      manifest is put back unchanged (the folder is as it was).
    * On an exception (Ctrl-C included) temporary files are removed and, if no shard was written yet,
      the previous manifest is put back; otherwise the incomplete manifest stays.
    """

    def __init__(self, out: str | os.PathLike, dataset: str, command: str) -> None:
        self.root = Path(out)
        self.dataset = dataset
        self.command = command
        self.planned: list[str] = []
        self.owned: set[str] = set()
        self._old_bytes: bytes | None = None
        self._old_complete = False
        self._lock: PrepLock | None = None
        self._snapshot: dict[str, tuple[int, ...] | None] = {}
        self._started = False
        self._committed = False

    def __enter__(self) -> OutputFolder:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PrepError(f"cannot create the output folder ({_reason(err, self.root)})", self.root, "out",
                            "choose an out= folder you can write to, or fix its permissions") from None
        self._lock = PrepLock(self.root).__enter__()
        try:
            clean_stale_temps(self.root)
            old: dict[str, Any] = {}
            path = self.root / MANIFEST_NAME
            if path.is_file():
                self._old_bytes = path.read_bytes()
                with contextlib.suppress(ValueError):
                    parsed = json.loads(self._old_bytes.decode("utf-8"))
                    old = parsed if isinstance(parsed, dict) else {}
            self._old_complete = old.get("status", STATUS_COMPLETE) == STATUS_COMPLETE and isinstance(
                old.get("outputs"), dict)
            self.owned = ({str(k) for k in old.get("outputs") or {}} | {str(k) for k in old.get("owned_outputs") or []}
                          | {str(k) for k in old.get("retained_outputs") or []})
            for rec in DoneLog(self.root).records():
                self.owned |= set(rec.get("outputs") or {})
        except BaseException:
            self._lock.__exit__()
            raise
        return self

    def claim(self, outputs: Iterable[str]) -> None:
        """Plan to write ``outputs`` (relative paths); PrepError when one exists and is not ours."""
        self.planned = list(dict.fromkeys(outputs))
        foreign = [rel for rel in self.planned if rel not in self.owned and os.path.lexists(self.root / rel)]
        if foreign:
            raise PrepError(
                f"{len(foreign)} file(s) that pcbench-prep did not write are in the way, e.g. {', '.join(foreign[:3])} "
                "(no manifest.json or .done/ record here lists them); nothing was changed", self.root, "out",
                "choose an empty out= folder, or move those files elsewhere")

    def begin_writes(self) -> None:
        """Mark the folder as being rewritten (call once, before the first shard is written or deleted)."""
        if self._started:
            return
        self._snapshot = {rel: _stat_key(self.root / rel) for rel in self.planned}
        body = incomplete_manifest(self.dataset, self.command, self.owned | set(self.planned))
        atomic_write_text(self.root / MANIFEST_NAME, json.dumps(body, indent=1) + "\n")
        self._started = True

    def changed(self) -> bool:
        """True when a planned output was written (or removed) since :meth:`begin_writes`."""
        return self._started and any(_stat_key(self.root / rel) != key for rel, key in self._snapshot.items())

    def _restore(self) -> None:
        path = self.root / MANIFEST_NAME
        if self._old_bytes is None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        else:
            with atomic_write(path) as tmp:
                tmp.write_bytes(self._old_bytes)

    def commit(self, manifest: Mapping[str, Any], report: Any, complete: bool, units: Iterable[str] = ()) -> bool:
        """Write the new manifest (see the class docstring); False when the previous one was kept instead.

        ``complete``: every planned output exists from this run or a finished earlier one; ``units``:
        the skip-if-done keys of this run (records of other units are dropped when complete).
        """
        if not complete and not self.changed() and self._old_bytes is not None and self._old_complete:
            self._restore()
            self._committed = True
            report.warnings.append("nothing could be prepared, so out= keeps the previous preparation unchanged "
                                   "(manifest.json and its shards as they were)")
            return False
        outputs = set(manifest["outputs"])
        body = dict(manifest)
        if complete:
            for rel in sorted(self.owned - outputs):
                parts = Path(rel).parts
                if Path(rel).is_absolute() or ".." in parts or rel in (MANIFEST_NAME, DONE_DIR) or parts[:1] == (DONE_DIR,):
                    continue  # a damaged record must never point the clean-up outside the shards
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    (self.root / rel).unlink()
            DoneLog(self.root).prune(units)
        else:
            retained = sorted(r for r in (self.owned | set(self.planned)) - outputs if os.path.lexists(self.root / r))
            if retained:
                body["retained_outputs"] = retained
        write_manifest(self.root, body)
        self._committed = True
        return True

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is not None:
                clean_stale_temps(self.root)  # workers are gone by now: their temporary files are orphans
                if self._started and not self._committed and not self.changed():
                    self._restore()
        finally:
            if self._lock is not None:
                self._lock.__exit__()


# ------------------------------------------------------------------------------------ shard job driver
@dataclass
class ShardJob:
    """One unit of work: read some raw inputs, write one ragged shard ``out/<output>``.

    ``inputs`` are raw files (relative to the raw root) whose sha256 decide whether the unit is done;
    ``payload`` is anything picklable the process function needs (e.g. the sample list of the chunk).
    """

    key: str
    split: str
    output: str
    inputs: list[str]
    payload: Any = None


@dataclass
class ShardResult:
    """What a process function returns for a :class:`ShardJob`.

    ``samples``/``names`` go to the shard; ``failed`` lists ``(sample, message)`` for samples left out;
    ``skipped`` lists ``(sample, reason)`` for unreadable samples left out under ``allow_missing=true``;
    ``warnings`` go to the report; ``info`` (JSON-able, e.g. labels and point counts per sample) is kept
    in the skip-if-done record so that a skipped unit still contributes to the manifest; ``attrs`` go
    to the shard's attributes.
    """

    samples: list[dict[str, np.ndarray]]
    names: list[str]
    failed: list[tuple[str, str]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _unit_options(options: Mapping[str, Any], job: ShardJob, salt: str) -> dict[str, Any]:
    # what a unit's result depends on besides its input files: the options, the job description
    # (e.g. which labels its objects get) and the preparer version (salt)
    payload = json.dumps(job.payload, sort_keys=True, default=str).encode()
    return {**options, "_job": sha256_bytes(payload), "_salt": salt}


def done_record(raw: Path, out: Path, options: dict[str, Any], job: ShardJob, salt: str = "") -> dict[str, Any] | None:
    """The record of ``job`` if it is finished with the current inputs, options, payload and ``salt``, else None.

    Cheap: no record means not done; unchanged inputs cost one ``stat`` each.
    """
    log = DoneLog(out)
    if log.record(job.key) is None:
        return None
    inputs = hash_files([raw / p for p in job.inputs], raw, log.input_cache(job.key))
    return log.record(job.key) if log.is_done(job.key, inputs, _unit_options(options, job, salt)) else None


def _result_lists(res: ShardResult) -> dict[str, Any]:
    return {"failed": [list(f) for f in res.failed], "missing": [list(s) for s in res.skipped],
            "warnings": list(res.warnings)}


def run_shard_job(process: Callable[[ShardJob, Path, dict[str, Any]], ShardResult], raw: Path, out: Path,
                  options: dict[str, Any], job: ShardJob, salt: str = "") -> dict[str, Any]:
    """Run one job unless :class:`DoneLog` says it is done; returns its record plus ``skipped`` and ``written``.

    Module-level so that ``functools.partial(run_shard_job, process, raw, out, options)`` can be handed
    to :func:`parallel_map`. The shard is written atomically before the record, so a kill at any point
    leaves either the finished unit or nothing that counts. ``salt`` (e.g. the preparer version)
    invalidates earlier records when it changes. A unit whose every sample failed or was skipped writes
    nothing (``written`` False), so it never replaces an earlier good shard with an empty one.
    """
    log = DoneLog(out)
    rec = done_record(raw, out, options, job, salt)
    if rec is not None:
        return {**rec, "skipped": True, "written": True}
    inputs = hash_files([raw / p for p in job.inputs], raw, log.input_cache(job.key))
    res = process(job, raw, options)
    if not res.samples and (res.failed or res.skipped):
        return {"unit": job.key, "split": job.split, "names": [], "info": res.info, "skipped": False,
                "written": False, **_result_lists(res)}
    with atomic_write(out / job.output) as tmp:
        write_ragged_h5(tmp, res.samples, res.names, attrs={"split": job.split, **res.attrs})
    rec = log.mark(job.key, inputs, _unit_options(options, job, salt), [job.output],
                   extra={"split": job.split, "names": list(res.names), "info": res.info, **_result_lists(res)})
    return {**rec, "skipped": False, "written": True}


def _absorb(report: Report, rec: Mapping[str, Any]) -> None:
    report.failed.extend((str(a), str(b)) for a, b in rec.get("failed", []))
    report.missing.extend(f"{a} ({b})" for a, b in rec.get("missing", []))
    report.warnings.extend(str(w) for w in rec.get("warnings", []))


def run_shard_jobs(process: Callable[[ShardJob, Path, dict[str, Any]], ShardResult], raw: Path, out: Path,
                   options: dict[str, Any], jobs: Sequence[ShardJob], workers: int, report: Report,
                   desc: str = "", salt: str = "", before_write: Callable[[], None] | None = None
                   ) -> list[dict[str, Any]]:
    """Run every job (in parallel, skipping finished ones) and update ``report``; returns the records in job order.

    ``before_write`` is called once before the first unfinished job starts (see
    :meth:`OutputFolder.begin_writes`). A job that raises is recorded in ``report.failed`` under its key
    and has no record; one that wrote nothing has no record either; the others go on.
    """
    import functools  # noqa: PLC0415

    fn = functools.partial(run_shard_job, process, raw, out, options, salt=salt)
    records: dict[str, dict[str, Any]] = {}
    pending = []
    for job in jobs:  # finished units are found here, so a fully done re-run starts no worker process
        rec = done_record(raw, out, options, job, salt)
        if rec is None:
            pending.append(job)
            continue
        records[job.key] = {**rec, "skipped": True}
        report.skipped += 1
        report.samples += len(rec.get("names", []))
        _absorb(report, rec)
    if pending and before_write is not None:
        before_write()
    for job, res in parallel_map(fn, pending, workers=workers, desc=desc):
        if isinstance(res, BaseException):
            report.failed.append((job.key, str(res)))
            continue
        _absorb(report, res)
        if not res["written"]:
            continue
        records[job.key] = res
        if res["skipped"]:
            report.skipped += 1
        else:
            report.done += 1
        report.samples += len(res.get("names", []))
    return [records[j.key] for j in jobs if j.key in records]


def _check_job(process: Callable[[ShardJob, Path, dict[str, Any]], ShardResult], raw: Path,
               options: dict[str, Any], job: ShardJob) -> dict[str, Any]:
    res = process(job, raw, options)
    return _result_lists(res)  # only the verdicts travel back, not the converted arrays


def check_shard_jobs(process: Callable[[ShardJob, Path, dict[str, Any]], ShardResult], raw: Path,
                     options: dict[str, Any], jobs: Sequence[ShardJob], workers: int = 1, desc: str = "",
                     progress: bool | None = None) -> list[str]:
    """Run ``process`` on every job without writing anything (``--check``); one line per sample that
    preparation would fail (samples skipped under ``allow_missing=true`` are not problems)."""
    import functools  # noqa: PLC0415

    problems: list[str] = []
    fn = functools.partial(_check_job, process, raw, options)
    for job, res in parallel_map(fn, list(jobs), workers=workers, desc=f"checking {desc}".strip(), progress=progress):
        if isinstance(res, BaseException):  # the whole unit (e.g. one h5 file) is unusable
            problems.append(str(res) if isinstance(res, PrepError) else f"{job.key}: {res}")
            continue
        problems += [str(msg) for _, msg in res["failed"]]
    return problems
