"""Input checks shared by every model's forward."""

from __future__ import annotations

from pcbench.ops import PointBatch


def check_in_channels(batch: PointBatch, in_channels: int) -> None:
    """Raise ValueError unless ``batch.feat`` has the ``in_channels`` columns the model was built for."""
    if batch.feat.shape[1] != in_channels:
        raise ValueError(f"batch.feat has {batch.feat.shape[1]} channels but the model was built with "
                         f"in_channels={in_channels}; rebuild the model or select the matching features")
