"""ScanNet v2 scenes from a folder prepared by ``pcbench-prep scannet`` (ScanNet20 or ScanNet200 labels).

A sample is one whole scene (mesh vertices) as a dict of tensors:
``coord`` [N,3] float32 (metres), ``color`` [N,3] float32 in [0, 1], ``normal`` [N,3] float32 (unit),
``label`` [N] int64 (train ids of the chosen label set, ``ignore_index`` = -1 for unannotated or
other classes, and for every point of test scenes), ``instance`` [N] int64 (-1 = none) and ``name``
(scene id). Transforms (``pcbench.data.transforms``) take and return such dicts.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from data_prep.common import PrepError, RaggedH5Reader, read_manifest

LABEL_SETS = {"scannet20": "label20", "scannet200": "label200"}
SPLITS = ("train", "val", "test")


class ScanNetDataset(Dataset):
    """Scenes of one split of a prepared ScanNet folder; reads one scene per item, lazily, from the shards.

    Args:
        root: folder written by ``pcbench-prep scannet`` (holds ``manifest.json``).
        split: "train", "val" or "test" (test scenes carry no labels: every label is ``ignore_index``).
        label_set: "scannet20" (20 benchmark classes) or "scannet200" (200 classes).
        transform: callable applied to every sample dict (e.g. a ``transforms.Compose``).
        axis_align: apply each scene's stored ``axisAlignment`` now (for folders prepared without it);
            scenes that have no matrix (test scenes) are left as they are. ``False`` keeps coordinates
            as prepared; a folder prepared with ``axis_align=true`` is aligned already.
        scenes: optional subset of scene ids (in this order).
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", label_set: str = "scannet20",
                 transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None, axis_align: bool = False,
                 scenes: Sequence[str] | None = None) -> None:
        self.root = Path(root)
        manifest = read_manifest(self.root)
        if manifest.get("dataset") != "scannet":
            raise ValueError(f"root={str(root)!r} holds a prepared {manifest.get('dataset')!r} dataset, not scannet; "
                             "give the out= folder of `pcbench-prep scannet`")
        if split not in manifest["splits"]:
            raise ValueError(f"split={split!r} was not prepared in {root} (it has {sorted(manifest['splits'])}); "
                             f"use one of them or re-prepare with splits= including {split!r}")
        if label_set not in LABEL_SETS:
            raise ValueError(f"label_set={label_set!r} is unknown; use one of {sorted(LABEL_SETS)}")
        self.split = split
        self.label_set = label_set
        self.transform = transform
        self.axis_align = bool(axis_align)
        info = manifest["label_sets"][label_set]
        self.classes: list[str] = list(info["names"])
        self.ignore_index: int = int(manifest.get("ignore_index", -1))
        self.manifest = manifest
        names = list(manifest["splits"][split]["scenes"])
        if scenes is not None:
            missing = [s for s in scenes if s not in set(names)]
            if missing:
                raise ValueError(f"scenes {missing[:5]} are not in the prepared {split!r} split of {root}; "
                                 f"pick from its {len(names)} scenes")
            names = list(scenes)
        self.scenes = names
        self._where = [(manifest["scenes"][s]["file"], int(manifest["scenes"][s]["index"])) for s in names]
        self._readers: dict[str, RaggedH5Reader] = {}
        self._label_key = LABEL_SETS[label_set]

    @property
    def num_classes(self) -> int:
        """Number of classes of the chosen label set (20 or 200)."""
        return len(self.classes)

    def label_counts(self) -> np.ndarray:
        """Points per class in this split (from the manifest's label statistics) [num_classes] int64."""
        key = "label_stats" if self.label_set == "scannet20" else "label_stats_200"
        stats = self.manifest[key][self.split]
        return np.array([stats[c] for c in self.classes], dtype=np.int64)

    def num_points(self) -> np.ndarray:
        """Vertices per scene [len(self)] (from the manifest; no file is opened)."""
        return np.array([self.manifest["scenes"][s]["num_points"] for s in self.scenes], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.scenes)

    def _reader(self, rel: str) -> RaggedH5Reader:
        r = self._readers.get(rel)
        if r is None:
            path = self.root / rel
            if not path.is_file():
                raise PrepError("prepared shard not found", path, None,
                                f"re-run: {self.manifest.get('command', 'pcbench-prep scannet ...')}")
            r = self._readers[rel] = RaggedH5Reader(path)
        return r

    def load(self, i: int) -> dict[str, Any]:
        """Scene ``i`` before the transform."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"scene index {i} out of range for {len(self)} scenes of split {self.split!r}")
        rel, idx = self._where[i]
        keys = ["coord", "color", "normal", self._label_key, "instance", "axis_alignment", "aligned"]
        s = self._reader(rel).get(idx, keys)
        coord = s["coord"].astype(np.float32)
        normal = s["normal"].astype(np.float32)
        mat = s["axis_alignment"]
        if self.axis_align and not bool(s["aligned"]) and np.isfinite(mat).all():
            rot = mat[:3, :3]
            coord = (coord.astype(np.float64) @ rot.T + mat[:3, 3]).astype(np.float32)
            normal = (normal.astype(np.float64) @ rot.T).astype(np.float32)
        return {
            "coord": torch.from_numpy(coord),
            "color": torch.from_numpy(s["color"].astype(np.float32) / 255.0),
            "normal": torch.from_numpy(normal),
            "label": torch.from_numpy(s[self._label_key].astype(np.int64)),
            "instance": torch.from_numpy(s["instance"].astype(np.int64)),
            "name": self.scenes[i],
        }

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = self.load(i)
        return self.transform(sample) if self.transform is not None else sample

    def __repr__(self) -> str:
        return (f"ScanNetDataset(root={str(self.root)!r}, split={self.split!r}, label_set={self.label_set!r}, "
                f"scenes={len(self)}, transform={self.transform!r})")
