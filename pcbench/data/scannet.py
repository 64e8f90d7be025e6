"""ScanNet v2 scenes from a folder prepared by ``pcbench-prep scannet`` (ScanNet20 or ScanNet200 labels).

A sample is one whole scene (all mesh vertices), in the convention of :mod:`pcbench.data.transforms`:
``coord`` [N,3] float32 (metres), ``color`` [N,3] float32 in [0, 1], ``normal`` [N,3] float32 (unit),
``label`` [N] int64 (train ids of the chosen label set; -1 = ignore: unannotated vertices, classes
outside the set, and every vertex of a test scene), ``instance`` [N] int64 (segGroup objectId, -1 =
none), ``name`` (scene id), then ``feat`` from ``feat_keys`` unless the transform built one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np

from .dataset import PreparedDataset

__all__ = ["LABEL_SETS", "ScanNetDataset"]

#: label set name -> stored per-vertex key
LABEL_SETS = {"scannet20": "label20", "scannet200": "label200"}


class ScanNetDataset(PreparedDataset):
    """Scenes of one split ("train", "val" or "test") of a prepared ScanNet folder, read lazily per scene.

    Args:
        root, split, transform, seed, loop: see :class:`pcbench.data.dataset.PreparedDataset`
            (``loop`` repeats the 1,201 training scenes per epoch, as scene-level training usually does).
        label_set: "scannet20" (20 benchmark classes) or "scannet200" (200 classes).
        feat_keys: per-point arrays concatenated into ``feat`` (default colour + normal, 6 channels).
        axis_align: apply each scene's stored ``axisAlignment`` matrix on load (for folders prepared
            without it). Scenes already aligned at preparation, and scenes without a matrix (test
            scenes, v1 scene files), are returned as stored.
    """

    dataset_names: ClassVar[tuple[str, ...]] = ("scannet",)

    def __init__(self, root: str | os.PathLike, split: str = "train", label_set: str = "scannet20",
                 transform: Callable[[dict[str, Any], np.random.Generator], dict[str, Any]] | None = None,
                 feat_keys: Sequence[str] = ("color", "normal"), axis_align: bool = False, seed: int | None = 0,
                 loop: int = 1) -> None:
        if label_set not in LABEL_SETS:
            raise ValueError(f"label_set={label_set!r} is unknown; use one of {sorted(LABEL_SETS)}")
        super().__init__(root, split, transform, feat_keys, seed, loop)
        self.label_set = label_set
        self.axis_align = bool(axis_align)
        self._label_key = LABEL_SETS[label_set]
        self.scenes: list[str] = [s for f in self.manifest["splits"][split]["files"] for s in f["scenes"]]

    @property
    def classes(self) -> list[str]:
        """Class names of the chosen label set; label ``i`` means ``classes[i]``."""
        return list(self.manifest["label_sets"][self.label_set]["names"])

    @property
    def num_classes(self) -> int:
        """20 or 200."""
        return len(self.classes)

    def label_counts(self) -> np.ndarray:
        """Points per class in this split [num_classes] int64 (manifest statistics; no shard is read)."""
        stats = self.manifest["label_stats" if self.label_set == "scannet20" else "label_stats_200"][self.split]
        return np.array([stats[c] for c in self.classes], dtype=np.int64)

    def num_points(self) -> np.ndarray:
        """Vertices per scene, in sample order [number of scenes] int64 (from the manifest)."""
        return np.array([self.manifest["scenes"][s]["num_points"] for s in self.scenes], dtype=np.int64)

    def convert(self, stored: dict[str, Any]) -> dict[str, Any]:
        """Stored scene arrays -> sample (float32 geometry, colour in [0, 1], int64 labels)."""
        coord = np.asarray(stored["coord"], dtype=np.float32)
        normal = np.asarray(stored["normal"], dtype=np.float32)
        mat = np.asarray(stored["axis_alignment"], dtype=np.float64)
        if self.axis_align and not bool(stored["aligned"]) and np.isfinite(mat).all():
            rot = mat[:3, :3]
            coord = (coord.astype(np.float64) @ rot.T + mat[:3, 3]).astype(np.float32)
            normal = (normal.astype(np.float64) @ rot.T).astype(np.float32)
        return {
            "coord": coord,
            "color": np.asarray(stored["color"], dtype=np.float32) / np.float32(255.0),
            "normal": normal,
            "label": np.asarray(stored[self._label_key], dtype=np.int64),
            "instance": np.asarray(stored["instance"], dtype=np.int64),
            "name": stored["name"],
        }

    def __repr__(self) -> str:
        return (f"ScanNetDataset(root={str(self.root)!r}, split={self.split!r}, label_set={self.label_set!r}, "
                f"scenes={len(self.scenes)}, loop={self.loop}, transform={self.transform!r})")
