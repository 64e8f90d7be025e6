"""Shared machinery of the dataset preparers: errors, hashing, atomic writes, manifests, ragged HDF5
shards, a fault-tolerant parallel map and skip-if-done bookkeeping.

Preparer contract (every module ``data_prep.<dataset>`` that ``pcbench-prep <dataset>`` dispatches to)
------------------------------------------------------------------------------------------------------
``OPTIONS: dict[str, Option]``
    Every ``key=value`` option the preparer accepts, with default, type, choices and a help line;
    ``pcbench-prep <dataset> --help`` prints them. Values arrive already parsed by :func:`parse_options`.
``check(raw: Path, options: dict) -> list[str]``
    Inspect the raw folder without writing anything; return one human-readable line per missing or
    malformed input (each names the file, the field and the fix). ``[]`` means ready to prepare.
``prepare(raw: Path, out: Path, options: dict, workers: int) -> Report``
    Convert raw official files into ``out``: HDF5 shards written with :func:`write_ragged_h5` (through
    :func:`atomic_write`) plus ``manifest.json`` written with :func:`write_manifest`. Must be
    idempotent and resumable: units of work (e.g. one shard) are skipped when :class:`DoneLog` says
    their inputs, options and outputs are unchanged. One bad sample never loses the others: record it in
    ``Report.failed`` and go on; the CLI exits non-zero when ``Report.failed`` is not empty.
    Take ``with PrepLock(out):`` around the work so that two runs never write one folder.
    Typical body (see ``data_prep/modelnet.py``): build a list of :class:`ShardJob` (key, split, output
    shard path, raw input paths, payload), write a module-level ``process(job, raw, options) ->
    ShardResult``, call :func:`run_shard_jobs` (parallel, skip-if-done, failures into the Report), then
    assemble the manifest from the returned records and :func:`write_manifest` it.
    Option values are typed by :func:`parse_options`; the CLI may fix some per dataset name
    (``data_prep.cli.DATASETS``: e.g. modelnet10 = modelnet with num_classes=10).

Prepared layout
---------------
``out/manifest.json`` (see :func:`write_manifest` for the required keys) and HDF5 shards in the ragged
format of :func:`write_ragged_h5`, read back lazily with :class:`RaggedH5Reader`. Bookkeeping lives in
``out/.done/`` (one JSON record per finished unit of work) and may be deleted to force a full rebuild.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "REQUIRED_MANIFEST_KEYS",
    "DoneLog",
    "Option",
    "PrepError",
    "PrepLock",
    "RaggedH5Reader",
    "Report",
    "ShardJob",
    "ShardResult",
    "atomic_write",
    "atomic_write_text",
    "clean_stale_temps",
    "hash_files",
    "parallel_map",
    "parse_options",
    "prep_command",
    "done_record",
    "read_manifest",
    "remove_stale_shards",
    "run_shard_job",
    "run_shard_jobs",
    "sha256_bytes",
    "sha256_file",
    "verify_outputs",
    "write_manifest",
    "write_ragged_h5",
]

#: Version of the prepared on-disk layout (manifest + ragged shards). Bump on incompatible changes.
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TEMP_PREFIX = ".pcbench-tmp-"
DONE_DIR = ".done"


class PrepError(Exception):
    """A preparation problem with the file, the field and the fix spelled out.

    ``str(err)`` reads ``<path>: <field>: <message>. Fix: <fix>`` (parts omitted when not given).
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None, field: str | None = None,
                 fix: str | None = None) -> None:
        self.message = message
        self.path = None if path is None else str(path)
        self.field = field
        self.fix = fix
        parts = [p for p in (self.path, field) if p]
        text = ": ".join([*parts, message])
        if fix:
            text += f". Fix: {fix}"
        super().__init__(text)

    def __reduce__(self):  # keep the structured fields across process boundaries
        return (PrepError, (self.message, self.path, self.field, self.fix))


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


def hash_files(paths: Iterable[Path], root: Path, cache: Mapping[str, Mapping[str, Any]] | None = None
               ) -> dict[str, dict[str, Any]]:
    """``{relpath: {"sha256", "size", "mtime_ns"}}`` for ``paths`` (relative to ``root``).

    A ``cache`` entry (from an earlier call) is reused without reading the file when size and mtime_ns
    are unchanged, so re-running over thousands of unchanged inputs costs one ``stat`` each.
    """
    out: dict[str, dict[str, Any]] = {}
    for p in paths:
        rel = Path(p).relative_to(root).as_posix()
        st = os.stat(p)
        old = (cache or {}).get(rel)
        if old and old.get("size") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns:
            out[rel] = dict(old)
        else:
            out[rel] = {"sha256": sha256_file(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return out


# ------------------------------------------------------------------------------------------ atomic io
@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and ``os.replace`` it onto ``path``.

    On an exception the temporary file is removed and ``path`` is untouched; after a hard kill only a
    hidden ``.pcbench-tmp-*`` file can remain, never a half-written ``path`` (see
    :func:`clean_stale_temps`). Works for any writer that takes a file name (h5py, numpy, open()).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; the result should look like a normal file
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        with contextlib.suppress(OSError):  # make the rename itself durable; not supported everywhere
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


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

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
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
    """Outcome of one ``prepare`` call; ``failed`` holds ``(sample or unit, message)`` pairs."""

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
            lines.append(f"  skipped {len(self.missing)} listed but absent inputs (allow_missing=true), "
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
#: Keys every manifest must carry (write_manifest refuses to write without them).
REQUIRED_MANIFEST_KEYS = (
    "dataset",  # e.g. "modelnet40"
    "preparer_version",  # version string of the preparer module
    "command",  # the pcbench-prep command that re-creates this folder
    "options",  # parsed options
    "classes",  # class names, index = label
    "splits",  # {split: {"files": [shard relpaths], "num_samples": int}}
    "inputs",  # {raw relpath: sha256}
    "outputs",  # {out relpath: sha256}
    "label_stats",  # {split: {class name: count}}
    "validation",  # Report.to_dict() of the run that wrote the manifest
)


def write_manifest(out_dir: str | os.PathLike, manifest: Mapping[str, Any]) -> Path:
    """Write ``out_dir/manifest.json`` atomically, adding ``format_version`` and ``created_utc``."""
    missing = [k for k in REQUIRED_MANIFEST_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"manifest is missing keys {missing}; every preparer must fill {list(REQUIRED_MANIFEST_KEYS)}")
    body = {"format_version": FORMAT_VERSION, "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **manifest}
    path = Path(out_dir) / MANIFEST_NAME
    atomic_write_text(path, json.dumps(body, indent=1, sort_keys=False, default=_json_default) + "\n")
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_manifest(out_dir: str | os.PathLike) -> dict[str, Any]:
    """Load ``out_dir/manifest.json``; PrepError (with the command to re-prepare) on absence or a format mismatch."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        raise PrepError("no prepared dataset here (manifest.json missing)", path, None,
                        "prepare it first: pcbench-prep <dataset> raw=<raw folder> out=" + str(Path(out_dir)))
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PrepError(f"unreadable JSON ({err})", path, None, "delete the folder and prepare it again") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        cmd = manifest.get("command") or f"pcbench-prep {manifest.get('dataset', '<dataset>')} raw=<raw> out={out_dir}"
        raise PrepError(
            f"prepared with format_version {version!r}, this pcbench reads version {FORMAT_VERSION}", path,
            "format_version", f"re-prepare with: {cmd}")
    return manifest


def verify_outputs(out_dir: str | os.PathLike, manifest: Mapping[str, Any] | None = None) -> list[str]:
    """Compare every file listed in ``manifest['outputs']`` with its recorded sha256; returns the problems."""
    root = Path(out_dir)
    manifest = manifest if manifest is not None else read_manifest(root)
    problems = []
    for rel, digest in manifest["outputs"].items():
        p = root / rel
        if not p.is_file():
            problems.append(f"{p}: missing")
        elif sha256_file(p) != digest:
            problems.append(f"{p}: sha256 differs from manifest.json (file changed or corrupt)")
    return problems


# --------------------------------------------------------------------------------- ragged HDF5 store
def write_ragged_h5(path: str | os.PathLike, samples: Sequence[Mapping[str, np.ndarray]], names: Sequence[str],
                    attrs: Mapping[str, Any] | None = None) -> None:
    """Write samples with per-sample varying lengths into one HDF5 file (call it inside :func:`atomic_write`).

    Every sample has the same keys. For a key whose values have ``ndim >= 1`` the arrays are
    concatenated along axis 0 into dataset ``<key>`` and ``<key>__offset`` [S+1] int64 holds the start
    rows (sample i owns rows ``offset[i]:offset[i+1]``); trailing shapes and dtypes must agree across
    samples. A 0-d value (e.g. a class label) is stacked into dataset ``<key>`` [S]. ``names`` [S]
    (UTF-8) identifies the samples; ``attrs`` go to the file's attributes (JSON-encoded).
    """
    import h5py  # noqa: PLC0415 - keep module import light

    if len(samples) != len(names):
        raise ValueError(f"names has {len(names)} entries but samples has {len(samples)}; give one name per sample")
    keys = list(samples[0].keys()) if samples else []
    for i, s in enumerate(samples):
        if list(s.keys()) != keys:
            raise ValueError(f"sample {i} ({names[i]}) has keys {list(s.keys())}, expected {keys}")
    with h5py.File(path, "w") as f:
        f.attrs["pcbench_ragged_version"] = 1
        f.attrs["keys"] = json.dumps(keys)
        for k, v in (attrs or {}).items():
            f.attrs[k] = json.dumps(v, default=_json_default)
        f.create_dataset("names", data=np.array(list(names), dtype=object), dtype=h5py.string_dtype())
        for key in keys:
            arrs = [np.asarray(s[key]) for s in samples]
            a0 = arrs[0]
            for i, a in enumerate(arrs):
                if a.ndim != a0.ndim or a.shape[1:] != a0.shape[1:] or a.dtype != a0.dtype:
                    raise ValueError(
                        f"sample {i} ({names[i]}) key {key!r}: shape {a.shape} dtype {a.dtype} does not match "
                        f"sample 0 shape {a0.shape} dtype {a0.dtype}; give every sample the same trailing shape and dtype")
            if a0.ndim == 0:
                f.create_dataset(key, data=np.stack(arrs))
            else:
                lengths = np.array([a.shape[0] for a in arrs], dtype=np.int64)
                offset = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
                f.create_dataset(key, data=np.concatenate(arrs, axis=0))
                f.create_dataset(f"{key}__offset", data=offset)


class RaggedH5Reader:
    """Random access to the samples of one :func:`write_ragged_h5` file without loading it.

    Offsets and names are read once (small); sample arrays are sliced from the file on demand. The
    HDF5 handle is opened lazily and re-opened after a fork (it is keyed by process id), and pickling
    drops it, so one reader can be shared with DataLoader workers.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._meta: tuple[list[str], dict[str, np.ndarray | None], list[str], dict[str, Any]] | None = None
        self._h5: Any = None
        self._dsets: dict[str, Any] = {}
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_h5"] = None
        state["_dsets"] = {}
        state["_pid"] = None
        return state

    def _file(self) -> Any:
        if self._h5 is None or self._pid != os.getpid():
            import h5py  # noqa: PLC0415

            if not self.path.is_file():
                raise PrepError("prepared shard not found", self.path, None,
                                "re-run the pcbench-prep command recorded in manifest.json")
            # an inherited handle from the parent must not be used (HDF5 state is per process)
            self._h5 = h5py.File(self.path, "r")
            self._dsets = {}
            self._pid = os.getpid()
        return self._h5

    def _dset(self, key: str) -> Any:
        # h5py's name lookup costs ~0.1 ms; per-sample reads of several keys add up, so keep the handles
        f = self._file()
        d = self._dsets.get(key)
        if d is None:
            d = self._dsets[key] = f[key]
        return d

    def _load_meta(self):
        if self._meta is None:
            f = self._file()
            if "pcbench_ragged_version" not in f.attrs:
                raise PrepError("not a pcbench ragged shard (attribute pcbench_ragged_version missing)", self.path,
                                None, "re-prepare the dataset with pcbench-prep")
            keys = json.loads(f.attrs["keys"])
            offsets = {k: (f[f"{k}__offset"][()] if f"{k}__offset" in f else None) for k in keys}
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in f["names"][()]]
            attrs = {k: json.loads(v) for k, v in f.attrs.items() if k not in ("keys", "pcbench_ragged_version")}
            self._meta = (keys, offsets, names, attrs)
        return self._meta

    def close(self) -> None:
        """Close the HDF5 handle of this process (it is re-opened on the next access)."""
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5 = None
        self._dsets = {}

    def __len__(self) -> int:
        return len(self._load_meta()[2])

    @property
    def keys(self) -> list[str]:
        """Per-sample keys stored in the file."""
        return list(self._load_meta()[0])

    @property
    def names(self) -> list[str]:
        """Sample names, in storage order."""
        return list(self._load_meta()[2])

    @property
    def attrs(self) -> dict[str, Any]:
        """File attributes given to :func:`write_ragged_h5`."""
        return dict(self._load_meta()[3])

    def lengths(self, key: str) -> np.ndarray:
        """Rows per sample [S] of a ragged key."""
        off = self._load_meta()[1][key]
        if off is None:
            raise ValueError(f"key {key!r} holds one value per sample, it has no lengths")
        return np.diff(off)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self.get(i)

    def get(self, i: int, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Sample ``i`` as ``{key: array}`` (0-d arrays for per-sample scalars); ``keys`` limits the read."""
        all_keys, offsets, names, _ = self._load_meta()
        n = len(names)
        if not -n <= i < n:
            raise IndexError(f"sample index {i} out of range for {n} samples in {self.path}")
        i %= n
        out = {}
        for k in keys if keys is not None else all_keys:
            off = offsets[k]
            d = self._dset(k)
            out[k] = np.asarray(d[i] if off is None else d[int(off[i]):int(off[i + 1])])
        return out

    def name(self, i: int) -> str:
        """Name of sample ``i`` (no copy of the name list)."""
        return self._load_meta()[2][i]


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
    if sys.platform.startswith("linux"):  # die with the parent: a killed run must not leave writers behind
        with contextlib.suppress(Exception):
            import ctypes  # noqa: PLC0415
            import signal  # noqa: PLC0415

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def parallel_map(fn: Callable[[Any], Any], items: Sequence[Any], workers: int = 1, desc: str = "",
                 progress: bool | None = None) -> Iterator[tuple[Any, Any]]:
    """Apply ``fn`` to every item, yielding ``(item, result)`` or ``(item, exception)`` as they finish.

    ``workers <= 1`` runs in this process in order (easy to debug); otherwise a spawn-started
    process pool is used (``fn`` must be a module-level function; the allocator settings from
    DESIGN.md are set for the workers). An exception in one item is returned for that item and the
    others go on; if a worker process dies hard, the items still pending are returned with the error.
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
            with ProcessPoolExecutor(max_workers=min(workers, len(items)), mp_context=mp.get_context("spawn"),
                                     initializer=_worker_init) as pool:
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
        except (FileNotFoundError, json.JSONDecodeError):
            return None

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
    ``info`` (JSON-able, e.g. labels and point counts per sample) is kept in the skip-if-done record so
    that a skipped unit still contributes to the manifest; ``attrs`` go to the shard's attributes.
    """

    samples: list[dict[str, np.ndarray]]
    names: list[str]
    failed: list[tuple[str, str]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)


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
    try:
        inputs = hash_files([raw / p for p in job.inputs], raw, log.input_cache(job.key))
    except OSError:
        return None
    return log.record(job.key) if log.is_done(job.key, inputs, _unit_options(options, job, salt)) else None


def run_shard_job(process: Callable[[ShardJob, Path, dict[str, Any]], ShardResult], raw: Path, out: Path,
                  options: dict[str, Any], job: ShardJob, salt: str = "") -> dict[str, Any]:
    """Run one job unless :class:`DoneLog` says it is done; returns its record plus ``skipped`` (bool).

    Module-level so that ``functools.partial(run_shard_job, process, raw, out, options)`` can be handed
    to :func:`parallel_map`. The shard is written atomically before the record, so a kill at any point
    leaves either the finished unit or nothing that counts. ``salt`` (e.g. the preparer version)
    invalidates earlier records when it changes.
    """
    log = DoneLog(out)
    rec = done_record(raw, out, options, job, salt)
    if rec is not None:
        return {**rec, "skipped": True}
    inputs = hash_files([raw / p for p in job.inputs], raw, log.input_cache(job.key))
    res = process(job, raw, options)
    with atomic_write(out / job.output) as tmp:
        write_ragged_h5(tmp, res.samples, res.names, attrs={"split": job.split, **res.attrs})
    rec = log.mark(job.key, inputs, _unit_options(options, job, salt), [job.output],
                   extra={"split": job.split, "names": list(res.names), "failed": [list(f) for f in res.failed],
                          "info": res.info})
    return {**rec, "skipped": False}


def run_shard_jobs(process: Callable[[ShardJob, Path, dict[str, Any]], ShardResult], raw: Path, out: Path,
                   options: dict[str, Any], jobs: Sequence[ShardJob], workers: int, report: Report,
                   desc: str = "", salt: str = "") -> list[dict[str, Any]]:
    """Run every job (in parallel, skipping finished ones) and update ``report``; returns the records in job order.

    A job that raises is recorded in ``report.failed`` under its key and has no record; the others go on.
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
        report.failed.extend((str(a), str(b)) for a, b in rec.get("failed", []))
    for job, res in parallel_map(fn, pending, workers=workers, desc=desc):
        if isinstance(res, BaseException):
            report.failed.append((job.key, str(res)))
            continue
        records[job.key] = res
        if res["skipped"]:
            report.skipped += 1
        else:
            report.done += 1
        report.samples += len(res.get("names", []))
        report.failed.extend((str(a), str(b)) for a, b in res.get("failed", []))
    return [records[j.key] for j in jobs if j.key in records]


def remove_stale_shards(out: Path, jobs: Sequence[ShardJob], pattern: str = "*/shard_*.h5") -> list[str]:
    """Delete shards matching ``pattern`` that no current job writes, and the records of other units.

    An earlier run with another layout (e.g. another ``shard_size``) leaves such files behind; only
    files of the preparer's own naming pattern are touched, nothing else in ``out``.
    """
    keep = {j.output for j in jobs}
    gone = []
    for p in Path(out).glob(pattern):
        rel = p.relative_to(out).as_posix()
        if rel not in keep:
            p.unlink()
            gone.append(rel)
    DoneLog(out).prune(j.key for j in jobs)
    return gone
