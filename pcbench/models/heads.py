"""Prediction heads shared by the point models: an MLP on pooled (classification) or per-point features."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .layers import PointBatchNorm

__all__ = ["ClassifierMixin", "MLPHead"]


class MLPHead(nn.Module):
    """``[Linear -> BN -> act -> Dropout] * len(hidden) -> Linear`` on ``[..., C]`` features.

    The same head serves classification (input: pooled ``[B, C]``) and segmentation (input: per-point ``[N, C]``).

    Args:
        in_channels: channels of the incoming features.
        hidden: widths of the hidden layers (e.g. ``[512, 256]`` for the PointNet++ classifier).
        num_classes: number of output logits.
        dropout: dropout probability after every hidden layer (0 disables it).
        hidden_bias: bias of each hidden linear layer (one bool for all, or one per layer).
        negative_slope: 0 for ReLU, else the LeakyReLU slope (PCT uses 0.2).
    """

    def __init__(self, in_channels: int, hidden: Sequence[int], num_classes: int, dropout: float = 0.5,
                 hidden_bias: bool | Sequence[bool] = True, negative_slope: float = 0.0) -> None:
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"num_classes must be a positive number of classes, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        biases = [hidden_bias] * len(hidden) if isinstance(hidden_bias, bool) else list(hidden_bias)
        if len(biases) != len(hidden):
            raise ValueError(f"hidden_bias must have one entry per hidden layer ({len(hidden)}), got {biases}")
        layers: list[nn.Module] = []
        c = in_channels
        for w, b in zip(hidden, biases, strict=True):
            act = nn.LeakyReLU(negative_slope, inplace=True) if negative_slope else nn.ReLU(inplace=True)
            layers += [nn.Linear(c, w, bias=b), PointBatchNorm(w), act]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            c = w
        layers.append(nn.Linear(c, num_classes))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[..., num_classes]`` from features ``[..., in_channels]``."""
        return self.mlp(x)


class ClassifierMixin:
    """The timm-style head API every pcbench model shares: ``forward_head`` and ``reset_classifier``.

    A model keeps its classifier in ``self.head`` (a module whose last ``nn.Linear`` gives the logits) and its
    backbone in ``forward_features``, so ``forward(batch) == forward_head(forward_features(batch))``.
    """

    head: nn.Module

    def forward_head(self, features: Tensor) -> Tensor:
        """Logits from the output of ``forward_features`` (per cloud ``[B, C]`` or per point ``[N, C]``)."""
        return self.head(features)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the last linear layer of the head by a freshly initialised one with ``num_classes`` outputs.

        The hidden layers of the head and the backbone keep their weights (fine-tuning on a new label set).
        """
        if int(num_classes) < 1:
            raise ValueError(f"reset_classifier(num_classes={num_classes}): need at least one class")
        linears = [name for name, m in self.head.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise TypeError(f"{type(self).__name__}.head has no nn.Linear to reset")
        name = linears[-1]
        old = self.head.get_submodule(name) if name else self.head
        new = nn.Linear(old.in_features, int(num_classes), bias=old.bias is not None)
        with torch.no_grad():
            new = new.to(device=old.weight.device, dtype=old.weight.dtype)
        if not name:
            self.head = new
            return
        parent_name, _, attr = name.rpartition(".")
        setattr(self.head.get_submodule(parent_name) if parent_name else self.head, attr, new)
