"""Segmentation losses beside cross-entropy: the Lovasz-softmax loss (Berman et al., CVPR 2018).

Pointcept's PTv3 recipes train with cross-entropy + Lovasz (``LovaszLoss(mode="multiclass")``): softmax
probabilities, the points of the whole (local) batch at once, the mean over the classes present in the labels.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["lovasz_softmax"]


def _lovasz_grad(gt_sorted: Tensor) -> Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss w.r.t. the errors sorted in decreasing order."""
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1.0 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    if gt_sorted.numel() > 1:
        jaccard = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
    return jaccard


def lovasz_softmax(logits: Tensor, target: Tensor, ignore_index: int = -1) -> Tensor:
    """Lovasz-softmax loss of per-point ``logits`` [N, C] against ``target`` [N] (``ignore_index`` left out).

    For each class c present in the target: the errors ``|[target == c] - softmax(logits)[:, c]|`` sorted in
    decreasing order, dotted with the gradient of the Jaccard loss along that order; the mean over the present
    classes. For one-hot probabilities this is the mean over present classes of ``1 - IoU_c``. A batch with
    no valid point gives 0 (connected to the graph).
    """
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"lovasz_softmax takes logits [N, C] and target [N], got {list(logits.shape)} and "
                         f"{list(target.shape)}")
    valid = target != ignore_index
    probas = logits.float().softmax(-1)[valid]
    labels = target[valid]
    if labels.numel() == 0:
        return logits.sum() * 0.0
    losses = []
    for c in labels.unique():
        fg = (labels == c).to(probas.dtype)
        errors = (fg - probas[:, c]).abs()
        errors_sorted, perm = torch.sort(errors, 0, descending=True)
        losses.append(torch.dot(errors_sorted, _lovasz_grad(fg[perm])))
    return torch.stack(losses).mean()
