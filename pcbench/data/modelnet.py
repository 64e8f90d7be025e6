"""ModelNet40 / ModelNet10 classification dataset over a ``pcbench-prep modelnet40|modelnet10`` folder."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np

from .dataset import PreparedDataset

__all__ = ["ModelNetDataset"]


class ModelNetDataset(PreparedDataset):
    """ModelNet objects: ``coord`` [n,3], ``normal`` [n,3] (when prepared with normals), scalar ``label``.

    Args:
        root, split, transform, seed: see :class:`PreparedDataset` (splits "train" and "test").
        use_normals: put the normals into ``feat`` (coord + normal, 6 channels) instead of coord only.
        feat_keys: overrides the ``feat`` channels chosen by ``use_normals`` (``[]``: xyz only, 0 channels,
            for models that take the coordinates apart, e.g. the official xyz-only PointNet++).
    """

    dataset_names: ClassVar[tuple[str, ...]] = ("modelnet40", "modelnet10")

    def __init__(self, root: str | os.PathLike, split: str = "train",
                 transform: Callable[[dict[str, Any], np.random.Generator], dict[str, Any]] | None = None,
                 use_normals: bool = True, feat_keys: Sequence[str] | None = None, seed: int | None = 0) -> None:
        keys = feat_keys if feat_keys is not None else (("coord", "normal") if use_normals else ("coord",))
        super().__init__(root, split, transform, keys, seed)
        if "normal" in keys and "normal" not in self.manifest.get("keys", []):
            raise ValueError(f"root={str(root)!r} was prepared without normals; use use_normals=False or re-prepare "
                             "with normals=true")
        self.use_normals = use_normals

    def convert(self, stored: dict[str, Any]) -> dict[str, Any]:
        """Stored arrays -> sample (coord/normal float32, label int64 scalar)."""
        out = {"coord": np.asarray(stored["coord"], dtype=np.float32),
               "label": np.asarray(stored["label"], dtype=np.int64), "name": stored["name"]}
        if "normal" in stored:
            out["normal"] = np.asarray(stored["normal"], dtype=np.float32)
        return out
