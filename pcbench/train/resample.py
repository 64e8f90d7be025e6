"""The resampling payload a run keeps beside its result: ``<run dir>/resample_test.npz`` (:data:`PAYLOAD_FILE`).

* classification: per test sample its true class and predicted class (correctness is ``pred == target``);
* segmentation: one confusion matrix per test scene (``confusion[i, t, p]`` = points of scene ``i`` with true
  class ``t`` predicted as ``p``).

The trainer writes it (pcbench/train/trainer.py, final evaluation of the plain pass); the statistics that
resample it live in pcbench/bench/stats.py, which re-exports these names. It sits in pcbench.train because the
data flow runs train -> bench only. numpy only (no torch), so the store and the report import it cheaply.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pcbench.io import atomic_path

__all__ = ["PAYLOAD_FILE", "PAYLOAD_FORMAT", "TASKS", "ResamplePayload", "load_payload", "save_payload"]

PAYLOAD_FILE = "resample_test.npz"  # its name inside a run directory
PAYLOAD_FORMAT = "pcbench-resample/1"
TASKS = ("classification", "segmentation")


def _as_int_array(value: Any, field: str, ndim: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != ndim:
        raise ValueError(f"resample payload field '{field}' must have {ndim} dimension(s), got shape "
                         f"{list(arr.shape)}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating) or not np.array_equal(arr, np.round(arr)):
            raise ValueError(f"resample payload field '{field}' must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=True)


@dataclass(frozen=True, eq=False)
class ResamplePayload:
    """What one run keeps for resampling its test score: per-sample classes or per-scene confusion matrices.

    Build it with :meth:`classification` or :meth:`segmentation`; the fields are validated and copied.
    ``items`` optionally names the test items (sample or scene ids) so that two payloads can be checked to
    come from the same split in the same order; without it only the item count is compared.
    """

    task: str
    num_classes: int
    target: np.ndarray | None = None  # [n] int64, classification
    pred: np.ndarray | None = None  # [n] int64, classification
    confusion: np.ndarray | None = None  # [n, C, C] int64, segmentation
    items: np.ndarray | None = None  # [n] str

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"resample payload task must be one of {TASKS}, got {self.task!r}")
        if int(self.num_classes) < 1:
            raise ValueError(f"resample payload num_classes must be >= 1, got {self.num_classes}")
        object.__setattr__(self, "num_classes", int(self.num_classes))
        c = self.num_classes
        if self.task == "classification":
            if self.target is None or self.pred is None or self.confusion is not None:
                raise ValueError("a classification payload holds 'target' and 'pred' (one class per test sample) "
                                 "and no 'confusion'; use ResamplePayload.classification(target, pred, num_classes)")
            target, pred = _as_int_array(self.target, "target", 1), _as_int_array(self.pred, "pred", 1)
            if target.shape != pred.shape:
                raise ValueError(f"resample payload: 'target' has {target.size} samples but 'pred' has "
                                 f"{pred.size}; both hold one class per test sample")
            for name, arr in (("target", target), ("pred", pred)):
                if arr.size and (arr.min() < 0 or arr.max() >= c):
                    bad = arr[(arr < 0) | (arr >= c)][:5].tolist()
                    raise ValueError(f"resample payload field '{name}' holds classes {bad} outside "
                                     f"[0, {c}); check num_classes={c}")
            object.__setattr__(self, "target", target)
            object.__setattr__(self, "pred", pred)
            n = target.size
        else:
            if self.confusion is None or self.target is not None or self.pred is not None:
                raise ValueError("a segmentation payload holds 'confusion' (one confusion matrix per test scene) "
                                 "and no 'target'/'pred'; use ResamplePayload.segmentation(confusion)")
            cm = _as_int_array(self.confusion, "confusion", 3)
            if cm.shape[1:] != (c, c):
                raise ValueError(f"resample payload field 'confusion' has shape {list(cm.shape)}; expected "
                                 f"[scenes, {c}, {c}] for num_classes={c}")
            if cm.size and cm.min() < 0:
                raise ValueError("resample payload field 'confusion' holds negative counts; it must count points")
            object.__setattr__(self, "confusion", cm)
            n = cm.shape[0]
        if n < 1:
            raise ValueError("resample payload has no test items; a run that evaluated nothing has no interval")
        if self.items is not None:
            items = np.asarray(self.items).astype(str)
            if items.shape != (n,):
                raise ValueError(f"resample payload field 'items' has shape {list(items.shape)}; expected [{n}] "
                                 f"(one id per test item)")
            object.__setattr__(self, "items", items)

    @classmethod
    def classification(cls, target: Any, pred: Any, num_classes: int, items: Any = None) -> ResamplePayload:
        """Payload of a classifier: true and predicted class of every test sample, in split order."""
        return cls("classification", num_classes, target=target, pred=pred, items=items)

    @classmethod
    def segmentation(cls, confusion: Any, items: Any = None) -> ResamplePayload:
        """Payload of a segmenter: ``confusion[i, t, p]`` = points of test scene i with class t predicted as p."""
        cm = np.asarray(confusion)
        if cm.ndim != 3:
            raise ValueError(f"resample payload field 'confusion' must have 3 dimensions [scenes, C, C], got "
                             f"shape {list(cm.shape)}")
        return cls("segmentation", cm.shape[1], confusion=cm, items=items)

    @property
    def n_items(self) -> int:
        """Number of test items (samples or scenes)."""
        return int(self.target.size if self.task == "classification" else self.confusion.shape[0])

    def confusion_matrix(self) -> np.ndarray:
        """The run's whole confusion matrix [C, C] int64 (rows: target, columns: prediction)."""
        c = self.num_classes
        if self.task == "classification":
            return np.bincount(self.target * c + self.pred, minlength=c * c).reshape(c, c)
        return self.confusion.sum(0)

    def metrics(self) -> dict[str, float]:
        """``oa``, ``macc``, ``miou`` (+ ``*_present``) of the whole split (NaN where undefined), as pcbench.train.metrics."""
        cm = self.confusion_matrix().astype(np.float64)
        tp = np.diagonal(cm)
        return {k: float(v) for k, v in _metrics(tp, cm.sum(1), cm.sum(0)).items()}


def _npz_scalar(data: Any, field: str, path: Path) -> Any:
    if field not in data:
        raise ValueError(f"{path}: not a pcbench resample payload (field '{field}' missing); re-run the evaluation "
                         f"to write it")
    return data[field][()]


def save_payload(path: str | os.PathLike, payload: ResamplePayload) -> str:
    """Write ``payload`` to ``path`` (npz, atomic) and return the sha256 of the written file."""
    arrays: dict[str, np.ndarray] = {
        "format": np.array(PAYLOAD_FORMAT), "task": np.array(payload.task),
        "num_classes": np.array(payload.num_classes, dtype=np.int64),
    }
    if payload.task == "classification":
        arrays["target"], arrays["pred"] = payload.target, payload.pred
    else:
        arrays["confusion"] = payload.confusion
    if payload.items is not None:
        arrays["items"] = payload.items
    buf = io.BytesIO()  # np.savez appends ".npz" to a file name, so it writes to a buffer that is written atomically
    np.savez_compressed(buf, **arrays)
    data = buf.getvalue()
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def load_payload(path: str | os.PathLike, sha256: str | None = None) -> ResamplePayload:
    """Read a payload written by :func:`save_payload`; with ``sha256`` the file must have that digest."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"resample payload {path} does not exist; evaluate the run's checkpoint again "
                                f"to write it")
    raw = path.read_bytes()
    if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
        raise ValueError(f"{path}: sha256 {hashlib.sha256(raw).hexdigest()} differs from the recorded {sha256}; "
                         f"the file changed after the run recorded it: evaluate the run again")
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable npz file ({e}); evaluate the run again to rewrite it") from e
    fmt = str(_npz_scalar(data, "format", path))
    if fmt != PAYLOAD_FORMAT:
        raise ValueError(f"{path}: payload format {fmt!r} is not {PAYLOAD_FORMAT!r}; evaluate the run again with "
                         f"this pcbench")
    task, num_classes = str(_npz_scalar(data, "task", path)), int(_npz_scalar(data, "num_classes", path))
    try:
        return ResamplePayload(task, num_classes, target=data.get("target"), pred=data.get("pred"),
                               confusion=data.get("confusion"), items=data.get("items"))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def _metrics(tp: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> dict[str, np.ndarray]:
    """oa / macc / miou of counts [..., C] (true positives, target counts, prediction counts); NaN if nothing counted.

    ``macc`` / ``miou`` average over all C classes of the label set, a class without targets (or without targets
    and predictions) counting 0: the convention of pcbench/train/metrics.py (``metrics_from_confusion``), so a
    payload's figures equal the run's recorded ones and a resample's denominator does not move with the classes
    it happened to draw.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        total = rows.sum(-1)
        counted = total > 0
        oa = np.where(counted, tp.sum(-1) / np.maximum(total, 1), np.nan)
        out = {"oa": oa}
        union = rows + cols - tp
        c = tp.shape[-1]
        present = rows > 0
        k = present.sum(-1)
        for name, denom in (("macc", rows), ("miou", union)):
            ratio = np.where(denom > 0, tp / np.maximum(denom, 1), 0.0)
            out[name] = np.where(counted, ratio.sum(-1) / c, np.nan)
            # ``*_present``: over the classes with targets (ScanNet's "unseen validation categories" convention)
            out[f"{name}_present"] = np.where(k > 0, (ratio * present).sum(-1) / np.maximum(k, 1), np.nan)
    return out
