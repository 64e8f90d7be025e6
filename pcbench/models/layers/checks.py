"""Input checks shared by every model's forward."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from pcbench.ops import PointBatch


def model_input(model: nn.Module, batch: PointBatch) -> PointBatch:
    """``batch`` checked for ``model`` (``model.in_channels`` feature columns), with ``coord`` and ``feat`` in
    the dtype of the model's parameters.

    The one dtype policy of every model: a batch in another floating dtype (a float64 batch built from
    numpy, a float32 batch for a ``model.double()``) is cast, not refused, so the result is what the
    model gives for that batch in its own precision (``collate`` already yields float32). Under autocast
    the parameters stay float32, so the batch does too and autocast picks the kernels' precision.
    Raises ValueError when the feature columns do not match ``in_channels``.
    """
    in_channels = model.in_channels
    if batch.feat.shape[1] != in_channels:
        raise ValueError(f"batch.feat has {batch.feat.shape[1]} channels but the model was built with "
                         f"in_channels={in_channels}; rebuild the model or select the matching features")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
    if batch.coord.dtype == dtype and batch.feat.dtype == dtype:
        return batch
    return replace(batch, coord=batch.coord.to(dtype), feat=batch.feat.to(dtype))
