"""Collate sample dicts into one packed :class:`pcbench.ops.PointBatch`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pcbench.ops import PointBatch
from pcbench.ops.batch import NonFiniteError

__all__ = ["collate"]


def _cat(samples: Sequence[dict[str, Any]], key: str, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([np.asarray(s[key]) for s in samples], axis=0)).to(dtype)


def collate(samples: Sequence[dict[str, Any]]) -> PointBatch:
    """Pack samples (each with ``coord`` [n,3] and ``feat`` [n,C]) into a PointBatch.

    ``label``: a per-sample scalar ``label`` gives ``[B]`` (classification); a per-point ``label`` [n]
    (or ``segment`` [n]) gives ``[N]`` (segmentation, -1 = ignore). ``instance`` [n] is packed alike.
    Arrays may be numpy or CPU torch tensors.
    ``inverse`` [m] (from GridSample) is shifted by each cloud's start row so that
    ``pred_full = pred[batch.inverse]`` works on the packed predictions, with ``inverse_offset`` [B]
    the cumulative full-resolution counts. Empty clouds are allowed. Raises ValueError naming the
    sample and key when shapes or keys disagree, or when a sample's coord or feat holds NaN or inf.
    """
    if len(samples) == 0:
        raise ValueError("collate got an empty list of samples; use a batch_size >= 1")
    for i, s in enumerate(samples):
        for key in ("coord", "feat"):
            if key not in s:
                fix = "add BuildFeat(keys=...) to the transforms or set feat_keys" if key == "feat" else ""
                raise ValueError(f"sample {i} has no {key!r} (keys: {sorted(s)}); {fix}".rstrip("; "))
        n = np.asarray(s["coord"]).shape[0]
        if np.asarray(s["feat"]).shape[0] != n:
            raise ValueError(f"sample {i}: feat has {np.asarray(s['feat']).shape[0]} rows but coord has {n}")
    c0 = np.asarray(samples[0]["feat"]).shape[1:]
    for i, s in enumerate(samples):
        if np.asarray(s["feat"]).shape[1:] != c0:
            raise ValueError(f"sample {i}: feat has shape {np.asarray(s['feat']).shape}, sample 0 has [n, {c0}]; "
                             "use the same feat_keys for every sample")
    lengths = torch.tensor([np.asarray(s["coord"]).shape[0] for s in samples], dtype=torch.long)
    offset = torch.cumsum(lengths, 0)
    coord = _cat(samples, "coord", torch.float32)
    feat = _cat(samples, "feat", torch.float32)
    label = instance = inverse = inverse_offset = None
    kinds = {("cls" if np.ndim(s["label"]) == 0 else "seg") if "label" in s else ("seg2" if "segment" in s else None)
             for s in samples}
    if kinds == {"cls"}:
        label = torch.tensor([int(s["label"]) for s in samples], dtype=torch.long)
    elif kinds == {"seg"}:
        for i, s in enumerate(samples):
            if np.shape(s["label"]) != (np.asarray(s["coord"]).shape[0],):
                raise ValueError(f"sample {i}: per-point label has shape {tuple(np.shape(s['label']))}, "
                                 f"expected ({np.asarray(s['coord']).shape[0]},) like coord")
        label = _cat(samples, "label", torch.long)
    elif kinds == {"seg2"}:
        label = _cat(samples, "segment", torch.long)
    elif kinds != {None}:
        raise ValueError("samples mix label kinds: give every sample a scalar 'label' (classification) "
                         "or every sample a per-point 'label' [n] (segmentation)")
    if all("instance" in s for s in samples):
        instance = _cat(samples, "instance", torch.long)
    if any("inverse" in s for s in samples):
        if not all("inverse" in s for s in samples):
            raise ValueError("some samples have 'inverse' and some do not; apply GridSample to every sample")
        starts = (offset - lengths).tolist()
        inverse = torch.from_numpy(np.concatenate([np.asarray(s["inverse"], dtype=np.int64) + st
                                                   for s, st in zip(samples, starts, strict=True)]))
        inverse_offset = torch.cumsum(torch.tensor([len(s["inverse"]) for s in samples], dtype=torch.long), 0)
    try:
        return PointBatch(coord=coord, feat=feat, offset=offset, label=label, instance=instance, inverse=inverse,
                          inverse_offset=inverse_offset)
    except NonFiniteError as err:
        named = ", ".join(f"sample {i}" + (f" ({samples[i]['name']})" if "name" in samples[i] else "")
                          for i in err.clouds[:8])
        raise ValueError(f"{err.field} of {named} contains NaN or inf; repair the prepared sample or drop it "
                         f"(PointBatch: {err})") from err
