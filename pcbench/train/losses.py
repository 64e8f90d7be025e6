"""Segmentation losses beside cross-entropy: the Lovasz-softmax loss (Berman et al., CVPR 2018).

Pointcept's PTv3 recipes train with cross-entropy + Lovasz (``LovaszLoss(mode="multiclass")``): softmax
probabilities, the points of the whole (local) batch at once, the mean over the classes present in the labels.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["lovasz_softmax"]


#: classes sorted together: bounds the [N, chunk] sort buffers on ScanNet200-sized label sets
_CLASS_CHUNK = 32


def _lovasz_grad(gt_sorted: Tensor) -> Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss w.r.t. the errors sorted in decreasing order, per
    column of ``gt_sorted`` [N, K] (each column one class's foreground indicator in its own sorted order)."""
    gts = gt_sorted.sum(0, keepdim=True)
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1.0 - gt_sorted).cumsum(0)  # >= 1 from the first row on: never 0 / 0
    jaccard = 1.0 - intersection / union
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])


def lovasz_softmax(logits: Tensor, target: Tensor, ignore_index: int = -1) -> Tensor:
    """Lovasz-softmax loss of per-point ``logits`` [N, C] against ``target`` [N] (``ignore_index`` left out).

    For each class c present in the target: the errors ``|[target == c] - softmax(logits)[:, c]|`` sorted in
    decreasing order, dotted with the gradient of the Jaccard loss along that order; the mean over the present
    classes. For one-hot probabilities this is the mean over present classes of ``1 - IoU_c``. A batch with
    no valid point gives 0 (connected to the graph).

    No value reaches the host (the loss runs every training step): every class is sorted, in chunks of
    ``_CLASS_CHUNK`` columns, and absent classes are weighted 0 instead of skipped. Ignored points enter with
    error 0 and no foreground, so they sort behind every positive error and change no term of the dot product
    (a zero error contributes nothing whatever its Jaccard gradient; the Lovasz extension does not depend on the
    order among equal errors).
    """
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"lovasz_softmax takes logits [N, C] and target [N], got {list(logits.shape)} and "
                         f"{list(target.shape)}")
    probas = logits.float().softmax(-1)
    valid = (target != ignore_index).unsqueeze(1)
    num_classes = probas.shape[1]
    total = probas.new_zeros(())
    present_total = probas.new_zeros(())
    for lo in range(0, num_classes, _CLASS_CHUNK):
        classes = torch.arange(lo, min(lo + _CLASS_CHUNK, num_classes), device=target.device)
        fg = ((target.unsqueeze(1) == classes) & valid).to(probas.dtype)
        errors = (fg - probas[:, lo:lo + classes.numel()]).abs() * valid
        errors_sorted, perm = torch.sort(errors, 0, descending=True)
        per_class = (errors_sorted * _lovasz_grad(fg.gather(0, perm))).sum(0)
        present = (fg.sum(0) > 0).to(probas.dtype)
        total = total + (per_class * present).sum()
        present_total = present_total + present.sum()
    return total / present_total.clamp(min=1.0)
