"""The prepared-data format: ``manifest.json`` schema and ragged HDF5 shards, read and written here.

``pcbench-prep`` (``data_prep/``) writes prepared folders with these functions and :mod:`pcbench.data`
reads them; the format lives in the library so that the preparers import it, never the reverse.

Folder layout
-------------
``out/manifest.json``
    JSON object with ``format_version`` (:data:`FORMAT_VERSION`), ``status`` and, when complete, every
    key of :data:`REQUIRED_MANIFEST_KEYS`. ``status`` is ``"complete"`` (a folder written before the key
    existed has none and counts as complete) or ``"incomplete"``: a preparation that changes the folder
    replaces the manifest with an incomplete one (:func:`incomplete_manifest`) before it writes its first
    shard, so a folder that holds a mix of old and new shards is refused with the command that finishes it.
``out/<split>/<name>.h5``
    Ragged shards (:func:`write_ragged_h5`, :class:`RaggedH5Reader`) listed in ``splits`` and ``outputs``.

Only numpy and h5py are imported (h5py lazily, no torch), so preparation workers stay light.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "REQUIRED_MANIFEST_KEYS",
    "STATUS_COMPLETE",
    "STATUS_INCOMPLETE",
    "PrepError",
    "RaggedH5Reader",
    "check_manifest",
    "incomplete_manifest",
    "json_default",
    "manifest_body",
    "read_manifest",
    "write_ragged_h5",
]

#: Version of the prepared on-disk layout (manifest + ragged shards). Bump on incompatible changes.
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
STATUS_COMPLETE = "complete"
STATUS_INCOMPLETE = "incomplete"
RAGGED_VERSION = 1

#: Keys every complete manifest carries (``check_manifest`` refuses a manifest without them).
REQUIRED_MANIFEST_KEYS = (
    "dataset",  # e.g. "modelnet40"
    "preparer_version",  # version string of the preparer module
    "command",  # the pcbench-prep command that re-creates this folder
    "options",  # parsed options
    "classes",  # class names, index = label
    "splits",  # {split: {"files": [{"path", "num_samples", ...}], "num_samples": int}}
    "inputs",  # {raw relpath: sha256}
    "outputs",  # {out relpath: sha256}
    "label_stats",  # {split: {class name: count}}
    "validation",  # the Report of the run that wrote the manifest
)


class PrepError(Exception):
    """A problem with raw or prepared files, with the file, the field and the fix spelled out.

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

    def __reduce__(self):  # keep the structured fields (and the subclass) across process boundaries
        return (type(self), (self.message, self.path, self.field, self.fix))


def json_default(o: Any) -> Any:
    """``json.dumps(default=...)`` for numpy scalars/arrays and paths."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ------------------------------------------------------------------------------------------ manifest
def check_manifest(manifest: Mapping[str, Any]) -> None:
    """ValueError naming the missing keys when a complete manifest lacks one of :data:`REQUIRED_MANIFEST_KEYS`."""
    missing = [k for k in REQUIRED_MANIFEST_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"manifest is missing keys {missing}; every preparer must fill {list(REQUIRED_MANIFEST_KEYS)}")


def manifest_body(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The complete manifest as written: ``format_version``, ``status``, ``created_utc`` and ``manifest``."""
    check_manifest(manifest)
    return {"format_version": FORMAT_VERSION, "status": STATUS_COMPLETE,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **manifest}


def incomplete_manifest(dataset: str, command: str, owned_outputs: Iterable[str]) -> dict[str, Any]:
    """The manifest that stands in a folder while a preparation rewrites it.

    ``owned_outputs`` lists every file a preparation wrote there (old and planned), so a later run
    knows which files it may replace or delete.
    """
    return {"format_version": FORMAT_VERSION, "status": STATUS_INCOMPLETE, "dataset": dataset, "command": command,
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "owned_outputs": sorted(set(owned_outputs))}


def _reprepare(manifest: Mapping[str, Any], out_dir: str | os.PathLike) -> str:
    return str(manifest.get("command") or f"pcbench-prep {manifest.get('dataset', '<dataset>')} raw=<raw> out={out_dir}")


def read_manifest(out_dir: str | os.PathLike) -> dict[str, Any]:
    """Load a complete ``out_dir/manifest.json``.

    PrepError, with the command that fixes it, when the manifest is absent, unreadable, of another
    format version, missing required keys, or marks an unfinished preparation.
    """
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        raise PrepError("no prepared dataset here (manifest.json missing)", path, None,
                        "prepare it first: pcbench-prep <dataset> raw=<raw folder> out=" + str(Path(out_dir)))
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PrepError(f"unreadable JSON ({err})", path, None, "delete the folder and prepare it again") from None
    except OSError as err:
        raise PrepError(f"cannot read ({err.strerror})", path, None, "check the file's permissions") from None
    if not isinstance(manifest, dict):
        raise PrepError(f"expected a JSON object, got {type(manifest).__name__}", path, None,
                        "delete the folder and prepare it again")
    version = manifest.get("format_version")
    cmd = _reprepare(manifest, out_dir)
    if version != FORMAT_VERSION:
        raise PrepError(f"prepared with format_version {version!r}, this pcbench reads version {FORMAT_VERSION}",
                        path, "format_version", f"re-prepare with: {cmd}")
    status = manifest.get("status", STATUS_COMPLETE)
    if status == STATUS_INCOMPLETE:
        raise PrepError(f"a preparation started at {manifest.get('started_utc', '?')} did not finish; the shards here "
                        "may mix old and new samples", path, "status", f"finish it with: {cmd}")
    if status != STATUS_COMPLETE:
        raise PrepError(f"unknown status {status!r}", path, "status", f"re-prepare with: {cmd}")
    try:
        check_manifest(manifest)
    except ValueError as err:
        raise PrepError(str(err).split(";")[0], path, None, f"re-prepare with: {cmd}") from None
    return manifest


# --------------------------------------------------------------------------------- ragged HDF5 store
def write_ragged_h5(path: str | os.PathLike, samples: Sequence[Mapping[str, np.ndarray]], names: Sequence[str],
                    attrs: Mapping[str, Any] | None = None) -> None:
    """Write samples with per-sample varying lengths into one HDF5 file (wrap it in an atomic write).

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
        f.attrs["pcbench_ragged_version"] = RAGGED_VERSION
        f.attrs["keys"] = json.dumps(keys)
        for k, v in (attrs or {}).items():
            f.attrs[k] = json.dumps(v, default=json_default)
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
    drops it, so one reader can be shared with DataLoader workers. A missing, truncated or corrupt
    file raises PrepError naming the file and ``command`` (the ``pcbench-prep`` command that rewrites
    it, from the manifest) as the fix.
    """

    def __init__(self, path: str | os.PathLike, command: str | None = None) -> None:
        self.path = Path(path)
        self.command = command
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

    def _error(self, message: str) -> PrepError:
        fix = (f"re-prepare with: {self.command}" if self.command
               else "re-run the pcbench-prep command recorded in manifest.json")
        return PrepError(message, self.path, None, fix)

    def _file(self) -> Any:
        if self._h5 is None or self._pid != os.getpid():
            import h5py  # noqa: PLC0415

            if not self.path.is_file():
                raise self._error("prepared shard not found")
            # an inherited handle from the parent must not be used (HDF5 state is per process)
            try:
                self._h5 = h5py.File(self.path, "r")
            except OSError as err:
                raise self._error(f"unreadable shard, truncated or corrupt ({err})") from None
            self._dsets = {}
            self._pid = os.getpid()
        return self._h5

    def _dset(self, key: str) -> Any:
        # h5py's name lookup costs ~0.1 ms; per-sample reads of several keys add up, so keep the handles
        f = self._file()
        d = self._dsets.get(key)
        if d is None:
            try:
                d = self._dsets[key] = f[key]
            except (KeyError, OSError) as err:
                raise self._error(f"dataset {key!r} unreadable, truncated or corrupt shard ({err})") from None
        return d

    def _load_meta(self):
        if self._meta is None:
            f = self._file()
            if "pcbench_ragged_version" not in f.attrs:
                raise self._error("not a pcbench ragged shard (attribute pcbench_ragged_version missing)")
            try:
                keys = json.loads(f.attrs["keys"])
                offsets = {k: (f[f"{k}__offset"][()] if f"{k}__offset" in f else None) for k in keys}
                names = [n.decode() if isinstance(n, bytes) else str(n) for n in f["names"][()]]
                attrs = {k: json.loads(v) for k, v in f.attrs.items() if k not in ("keys", "pcbench_ragged_version")}
            except (KeyError, OSError, ValueError) as err:
                raise self._error(f"unreadable shard index, truncated or corrupt ({err})") from None
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

    def per_sample(self, key: str) -> np.ndarray:
        """The whole per-sample (0-d per sample) array ``key`` [S], e.g. every class label of the shard."""
        keys, offsets, _, _ = self._load_meta()
        if key not in keys or offsets[key] is not None:
            raise ValueError(f"{self.path} has no per-sample {key!r} (keys: {keys})")
        try:
            return np.asarray(self._dset(key)[()])
        except OSError as err:
            raise self._error(f"dataset {key!r} unreadable, truncated or corrupt shard ({err})") from None

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
            try:
                out[k] = np.asarray(d[i] if off is None else d[int(off[i]):int(off[i + 1])])
            except (OSError, ValueError) as err:
                raise self._error(f"sample {i} key {k!r} unreadable, truncated or corrupt shard ({err})") from None
        return out

    def name(self, i: int) -> str:
        """Name of sample ``i`` (no copy of the name list)."""
        return self._load_meta()[2][i]
