"""ScanObjectNN classification dataset over a ``pcbench-prep scanobjectnn`` folder."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np

from .dataset import PreparedDataset

__all__ = ["ScanObjectNNDataset"]


class ScanObjectNNDataset(PreparedDataset):
    """ScanObjectNN objects: ``coord`` [n,3], ``mask`` [n] (1 object, 0 background) and scalar ``label``.

    Args:
        root, split, transform, seed: see :class:`PreparedDataset` (splits "train" and "test").
        drop_background: remove the background points (mask 0) before the transform.
        feat_keys: ``feat`` channels (default coord only, as in the ScanObjectNN benchmark).
    """

    dataset_names: ClassVar[tuple[str, ...]] = ("scanobjectnn",)

    def __init__(self, root: str | os.PathLike, split: str = "train",
                 transform: Callable[[dict[str, Any], np.random.Generator], dict[str, Any]] | None = None,
                 drop_background: bool = False, feat_keys: Sequence[str] = ("coord",), seed: int | None = 0) -> None:
        super().__init__(root, split, transform, feat_keys, seed)
        self.drop_background = drop_background

    def convert(self, stored: dict[str, Any]) -> dict[str, Any]:
        """Stored arrays -> sample (coord float32, mask int8, label int64 scalar)."""
        coord = np.asarray(stored["coord"], dtype=np.float32)
        mask = np.asarray(stored["mask"], dtype=np.int8)
        if self.drop_background:
            coord, mask = coord[mask == 1], mask[mask == 1]
        return {"coord": coord, "mask": mask, "label": np.asarray(stored["label"], dtype=np.int64),
                "name": stored["name"]}
