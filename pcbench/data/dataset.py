"""Datasets over prepared folders (``pcbench-prep`` output: manifest.json + ragged HDF5 shards).

:class:`PreparedDataset` is the base every dataset builds on (ModelNet, ScanObjectNN, ScanNet):

* ``__init__`` only reads manifest.json (small) and checks the split; shards are opened lazily per
  process (:class:`pcbench.data.format.RaggedH5Reader`), so the object is cheap to build and safe to hand
  to DataLoader workers (fork or spawn).
* ``__getitem__(i)`` = :meth:`read` (stored arrays of sample i) -> :meth:`convert` (subclass hook:
  stored keys to the sample convention of :mod:`pcbench.data.transforms`) -> ``transform(sample, rng)``
  -> ``feat`` built from ``feat_keys`` when no transform made one.
* ``rng`` is ``numpy.random.default_rng([seed, epoch, i])``: augmentations are reproducible for a seed
  whatever the worker count or order; call :meth:`set_epoch` each epoch to draw new ones (with
  ``persistent_workers=True`` the workers keep their own copy, so prefer non-persistent workers or
  leave the epoch fixed). ``seed=None`` draws fresh entropy per call.

Subclasses set ``dataset_names`` (accepted manifest ``dataset`` values) and override :meth:`convert`.
"""

from __future__ import annotations

import bisect
import copy
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from .format import RaggedH5Reader, read_manifest
from .transforms import BuildFeat

__all__ = ["PreparedDataset", "die_with_parent", "seed_worker"]

Sample = dict[str, Any]


class PreparedDataset(Dataset):
    """One split of a prepared dataset folder; samples are dicts of numpy arrays (see module docstring).

    Args:
        root: folder written by ``pcbench-prep`` (holds manifest.json).
        split: split name from the manifest (e.g. "train", "test", "val").
        transform: ``callable(sample, rng) -> sample`` (e.g. :class:`pcbench.data.transforms.Compose`).
        feat_keys: per-point keys concatenated into ``feat`` when the transform did not build one; empty:
            ``feat`` has 0 channels (models that take xyz only, e.g. PointNet++ without normals).
        seed: base seed of the per-sample generators (None = not reproducible).
        loop: repeat the split this many times per epoch (short scene lists, e.g. ScanNet training).
    """

    dataset_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, root: str | os.PathLike, split: str, transform: Callable[[Sample, np.random.Generator], Sample]
                 | None = None, feat_keys: Sequence[str] = ("coord",), seed: int | None = 0, loop: int = 1) -> None:
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        name = self.manifest.get("dataset")
        if self.dataset_names and name not in self.dataset_names:
            raise ValueError(f"root={str(self.root)!r} holds a prepared {name!r} dataset, but {type(self).__name__} "
                             f"reads {list(self.dataset_names)}; point root at the right prepared folder")
        splits = self.manifest["splits"]
        if split not in splits:
            raise ValueError(f"split={split!r} not in {str(self.root)!r}; available: {sorted(splits)}")
        if loop < 1:
            raise ValueError(f"loop must be >= 1, got {loop}")
        self.split, self.transform, self.seed, self.loop = split, transform, seed, loop
        self.feat_keys = tuple(feat_keys)
        self._build_feat = BuildFeat(self.feat_keys) if self.feat_keys else None
        files = splits[split]["files"]
        self._paths = [self.root / f["path"] for f in files]
        self._ends = np.cumsum([f["num_samples"] for f in files]).tolist()
        self._readers: list[RaggedH5Reader | None] = [None] * len(files)
        self.epoch = 0
        self.stream: int | None = None  # a TTA pass's own random stream (see with_stream)

    # ------------------------------------------------------------------------------ manifest helpers
    @property
    def classes(self) -> list[str]:
        """Class names; label ``i`` means ``classes[i]``."""
        return list(self.manifest["classes"])

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.manifest["classes"])

    @property
    def ignore_index(self) -> int:
        """The label of points/objects left out of losses and metrics (manifest ``ignore_index``, default -1)."""
        return int(self.manifest.get("ignore_index", -1))

    @property
    def in_channels(self) -> int:
        """Channels of the ``feat`` built from ``feat_keys`` (read from the stored array shapes, no sample loaded).

        A transform that builds its own ``feat`` may change this; the trainer builds feat from ``feat_keys``.
        """
        import h5py  # noqa: PLC0415

        shards = [self.root / f["path"] for s in self.manifest["splits"].values() for f in s["files"]]
        if not shards:
            raise ValueError(f"{str(self.root)!r} holds no prepared shard; re-run the pcbench-prep command in "
                             "its manifest.json")
        with h5py.File(shards[0], "r") as f:
            width = 0
            for key in self.feat_keys:
                if key not in f:
                    raise ValueError(f"feat key {key!r} is not stored in {str(self.root)!r} (stored: "
                                     f"{sorted(k for k in f if '__' not in k)}); drop it from feat_keys or "
                                     "re-prepare the dataset with it")
                width += int(np.prod(f[key].shape[1:], dtype=np.int64))
        return width

    def labels(self, key: str = "label") -> np.ndarray:
        """Per-sample class labels [len(self)] int64 of a classification split (for samplers and statistics).

        Reads only the small per-sample ``key`` array of each shard.
        """
        parts = []
        for shard in range(len(self._paths)):
            try:
                parts.append(np.asarray(self._reader(shard).per_sample(key), dtype=np.int64))
            except ValueError as err:
                raise ValueError(f"{err}; labels() is for classification datasets") from None
        out = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return np.tile(out, self.loop)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch`` (see module docstring)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return (self._ends[-1] if self._ends else 0) * self.loop

    # -------------------------------------------------------------------------------------- reading
    def _locate(self, index: int) -> tuple[int, int]:
        n = self._ends[-1] if self._ends else 0
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples in split {self.split!r}")
        index = (index % len(self)) % n
        shard = bisect.bisect_right(self._ends, index)
        return shard, index - (self._ends[shard - 1] if shard else 0)

    def read(self, index: int) -> Sample:
        """Stored arrays of sample ``index`` plus ``name`` (no conversion, no transform)."""
        shard, row = self._locate(index)
        reader = self._reader(shard)
        sample: Sample = dict(reader.get(row))
        sample["name"] = reader.name(row)
        return sample

    def _reader(self, shard: int) -> RaggedH5Reader:
        reader = self._readers[shard]
        if reader is None:  # a damaged shard names itself and the command that rewrites it
            reader = self._readers[shard] = RaggedH5Reader(self._paths[shard], self.manifest.get("command"))
        return reader

    def convert(self, stored: Sample) -> Sample:
        """Subclass hook: stored arrays -> transform sample convention (default: as stored, coord float32)."""
        out = dict(stored)
        out["coord"] = np.asarray(stored["coord"], dtype=np.float32)
        return out

    def rng(self, index: int) -> np.random.Generator:
        """The generator handed to the transform for sample ``index`` in the current epoch."""
        if self.seed is None:
            return np.random.default_rng()
        if self.stream is None:
            return np.random.default_rng([self.seed, self.epoch, index])
        return np.random.default_rng([self.seed, self.epoch, index, self.stream])

    def with_stream(self, stream: int) -> PreparedDataset:
        """A shallow copy whose sample generators are ``default_rng([seed, epoch, index, stream])``.

        TTA pass ``p`` reads through ``with_stream(p)``: without it every pass of a sample would draw the same
        numbers, so random passes (random scales, point shuffles) would repeat one draw instead of voting.
        """
        if stream < 0:
            raise ValueError(f"stream must be >= 0, got {stream}")
        out = copy.copy(self)
        out.stream = int(stream)
        return out

    def __getitem__(self, index: int) -> Sample:
        if -len(self) <= index < 0:
            index += len(self)  # the rng stream belongs to the non-negative index
        sample = self.convert(self.read(index))
        rng = self.rng(index)
        if self.transform is not None:
            sample = self.transform(sample, rng)
        if "feat" not in sample:
            if self._build_feat is not None:
                sample = self._build_feat(sample, rng)
            else:
                sample = {**sample, "feat": np.zeros((len(sample["coord"]), 0), np.float32)}
        return sample

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_readers"] = [None] * len(self._readers)  # each process opens its own handles
        return state


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux ``PR_SET_PDEATHSIG``; no-op elsewhere).

    DataLoader workers only notice a dead parent when their index queue times out, and a worker blocked
    elsewhere (or a trainer killed by the OOM killer mid-evaluation) can leave them holding gigabytes.
    """
    import ctypes  # noqa: PLC0415
    import multiprocessing  # noqa: PLC0415
    import signal  # noqa: PLC0415
    import sys  # noqa: PLC0415

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # the parent died before prctl took effect
        os._exit(1)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed Python's and numpy's global RNGs from torch's per-worker seed, and
    make the worker die with its parent (:func:`die_with_parent`).

    The datasets here do not use global RNGs, but transforms from elsewhere might.
    """
    die_with_parent()
    s = torch.initial_seed() % 2**32
    np.random.seed(s)  # noqa: NPY002 - seeding the legacy global RNG is the point here
    random.seed(s)
