"""ScanObjectNN classification dataset over a ``pcbench-prep scanobjectnn`` folder."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np

from .dataset import PreparedDataset

__all__ = ["ScanObjectNNDataset"]


class ScanObjectNNDataset(PreparedDataset):
    """ScanObjectNN objects: ``coord`` [n,3], ``mask`` [n] (1 object, 0 background), scalar ``label`` and,
    when prepared with ``normals=estimate``, ``normal`` [n,3].

    Args:
        root, split, transform, seed: see :class:`PreparedDataset` (splits "train" and "test").
        drop_background: remove the background points (mask 0) before the transform.
        use_normals: put the estimated normals into ``feat`` (coord + normal, 6 channels, as
            :class:`pcbench.data.ModelNetDataset` with ``use_normals=True``); needs ``normals=estimate``.
        feat_keys: ``feat`` channels (default coord only, as in the ScanObjectNN benchmark); overrides
            the choice of ``use_normals``; ``[]`` gives 0 channels (xyz only, taken apart by the model).
    """

    dataset_names: ClassVar[tuple[str, ...]] = ("scanobjectnn",)

    def __init__(self, root: str | os.PathLike, split: str = "train",
                 transform: Callable[[dict[str, Any], np.random.Generator], dict[str, Any]] | None = None,
                 drop_background: bool = False, feat_keys: Sequence[str] | None = None, seed: int | None = 0,
                 use_normals: bool = False) -> None:
        keys = feat_keys if feat_keys is not None else (("coord", "normal") if use_normals else ("coord",))
        super().__init__(root, split, transform, keys, seed)
        if "normal" in keys and "normal" not in self.manifest.get("keys", []):
            raise ValueError(f"root={str(root)!r} was prepared without normals; re-prepare with normals=estimate "
                             "or use use_normals=False")
        self.drop_background = drop_background
        self.use_normals = use_normals

    def convert(self, stored: dict[str, Any]) -> dict[str, Any]:
        """Stored arrays -> sample (coord/normal float32, mask int8, label int64 scalar)."""
        coord = np.asarray(stored["coord"], dtype=np.float32)
        mask = np.asarray(stored["mask"], dtype=np.int8)
        normal = np.asarray(stored["normal"], dtype=np.float32) if "normal" in stored else None
        if self.drop_background:
            keep = mask == 1
            coord, mask = coord[keep], mask[keep]
            normal = normal[keep] if normal is not None else None
        out = {"coord": coord, "mask": mask, "label": np.asarray(stored["label"], dtype=np.int64),
               "name": stored["name"]}
        if normal is not None:
            out["normal"] = normal
        return out
