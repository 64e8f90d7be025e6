"""Classification and segmentation metrics from one confusion matrix.

Every figure comes from ``cm[t, p]`` = number of samples (objects or points) of true class ``t`` predicted
as ``p``; targets equal to ``ignore_index`` are left out. Definitions (fractions in [0, 1]):

* ``oa``: trace / total.
* ``acc_per_class[c]``: cm[c, c] / (row sum of c) -- recall of c; undefined (None) when c never occurs
  as a target.
* ``iou_per_class[c]``: cm[c, c] / (row sum + column sum - cm[c, c]); undefined when c is neither a target
  nor predicted.

Two conventions for the class means, both recorded:

* ``miou`` / ``macc``: mean over **all** classes of the label set, a class absent from the ground truth
  counting 0. This is the convention of the published figures the leaderboard compares with: Pointcept's
  ``SemSegTester`` (pointcept/engines/test.py @ d74c646) reports ``mean(intersection / (union + 1e-10))`` and
  ``mean(intersection / (target + 1e-10))`` over every class, so ScanNet200's val split, which lacks 11
  train-only classes, averages over 200. The denominator is fixed, so the figure cannot move with the
  model's false positives on absent classes (it can only lose by them, through the present classes' IoU).
* ``miou_present`` / ``macc_present``: mean over the classes present in the split's ground truth (row sum
  > 0), as ScanNet's ``scannet200_splits.py`` puts it for the 11 train-only classes ("we don't evaluate on
  unseen validation categories"); ``macc_present`` is scikit-learn's ``balanced_accuracy_score``.
  ``classes_present`` counts them.

Both are ranking-equivalent for a fixed split (the absent classes add 0 to a fixed denominator), so
checkpoint selection on ``miou`` does not depend on which is chosen. With every target ignored every
figure is undefined (None); undefined values are ``None`` in the returned dicts (JSON ``null``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["ConfusionMatrix", "confusion_matrix", "metrics_from_confusion"]


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = -1) -> Tensor:
    """Confusion matrix [num_classes, num_classes] int64 (rows: target, columns: prediction).

    ``pred`` and ``target`` are integer tensors of the same shape; targets equal to ``ignore_index`` are
    skipped. ValueError when a counted target or a prediction is outside [0, num_classes).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred has shape {list(pred.shape)} but target has {list(target.shape)}; they must match")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    for name, t in (("target", target), ("pred", pred)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            bad = t[(t < 0) | (t >= num_classes)][:5].tolist()
            raise ValueError(f"{name} holds labels {bad} outside [0, {num_classes}); check num_classes and "
                             f"ignore_index={ignore_index}")
    flat = target * num_classes + pred
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes).cpu()


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def metrics_from_confusion(cm: Tensor) -> dict[str, Any]:
    """``oa``, ``macc`` / ``miou`` (all classes), ``macc_present`` / ``miou_present`` (classes in the ground
    truth), ``classes_present``, ``iou_per_class``, ``acc_per_class`` and ``count`` from a confusion matrix."""
    cm = cm.double()
    tp = cm.diagonal()
    rows, cols, total = cm.sum(1), cm.sum(0), cm.sum()
    nan = torch.full_like(tp, float("nan"))
    acc = torch.where(rows > 0, tp / rows.clamp_min(1), nan)
    union = rows + cols - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), nan)
    oa = float(tp.sum() / total) if total > 0 else float("nan")
    present = rows > 0
    if total > 0:
        c = cm.shape[0]
        # all classes of the label set: an undefined class (absent from targets and predictions) counts 0
        macc, miou = float(acc.nan_to_num(0.0).sum() / c), float(iou.nan_to_num(0.0).sum() / c)
        macc_present, miou_present = float(acc[present].mean()), float(iou[present].mean())
    else:
        macc = miou = macc_present = miou_present = float("nan")
    return {
        "oa": _none_if_nan(oa),
        "macc": _none_if_nan(macc),
        "miou": _none_if_nan(miou),
        "macc_present": _none_if_nan(macc_present),
        "miou_present": _none_if_nan(miou_present),
        "classes_present": int(present.sum()),
        "iou_per_class": [_none_if_nan(v) for v in iou.tolist()],
        "acc_per_class": [_none_if_nan(v) for v in acc.tolist()],
        "count": int(total),
    }


class ConfusionMatrix:
    """Accumulates a confusion matrix over batches; :meth:`compute` gives :func:`metrics_from_confusion`."""

    def __init__(self, num_classes: int, ignore_index: int | None = -1) -> None:
        self.num_classes, self.ignore_index = int(num_classes), ignore_index
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add the predictions of one batch."""
        self.matrix += confusion_matrix(pred.detach(), target.detach(), self.num_classes, self.ignore_index)

    def all_reduce(self) -> None:
        """Sum the matrices of every rank (no-op without an initialised process group)."""
        import torch.distributed as dist  # noqa: PLC0415

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            m = self.matrix.to(dev)
            dist.all_reduce(m)
            self.matrix = m.cpu()

    def compute(self) -> dict[str, Any]:
        """The metrics of everything added so far."""
        return metrics_from_confusion(self.matrix)
