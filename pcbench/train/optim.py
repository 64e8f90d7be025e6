"""Learning-rate schedules (per optimizer step) and the weight EMA, built from ``conf/sched/`` and the trainer config.

Each schedule builder takes the optimizer and ``total_steps`` (the run's optimizer steps, known once the
data is loaded) plus its own options, so ``conf/sched/*.yaml`` are ``_partial_`` nodes that the trainer
completes with ``(optimizer, total_steps=...)``.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

__all__ = ["build_ema", "cosine_with_warmup", "multistep", "one_cycle", "step_decay"]


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                       warmup_fraction: float = 0.0, warmup_start_factor: float = 0.01,
                       min_factor: float = 0.0) -> LRScheduler:
    """Linear warm-up from ``warmup_start_factor * lr`` over the warm-up steps, then cosine decay to ``min_factor * lr``."""
    warm = max(int(warmup_steps), int(round(warmup_fraction * total_steps)))
    if warm >= total_steps > 0:
        raise ValueError(f"warm-up of {warm} steps covers the whole run of {total_steps} steps; lower "
                         "sched.warmup_steps / sched.warmup_fraction or train longer")

    def factor(step: int) -> float:
        if step < warm:
            return warmup_start_factor + (1.0 - warmup_start_factor) * step / warm
        t = (step - warm) / max(1, total_steps - warm)
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))

    return LambdaLR(optimizer, factor)


def one_cycle(optimizer: torch.optim.Optimizer, total_steps: int, pct_start: float = 0.05,
              anneal_strategy: str = "cos", div_factor: float = 10.0, final_div_factor: float = 1000.0) -> LRScheduler:
    """torch's OneCycleLR with ``max_lr`` = each group's configured lr."""
    max_lr = [g["lr"] for g in optimizer.param_groups]
    return OneCycleLR(optimizer, max_lr=max_lr, total_steps=max(total_steps, 2), pct_start=pct_start,
                      anneal_strategy=anneal_strategy, div_factor=div_factor, final_div_factor=final_div_factor,
                      cycle_momentum=False)


def multistep(optimizer: torch.optim.Optimizer, total_steps: int, milestones: Sequence[float] = (0.6, 0.8),
              gamma: float = 0.1) -> LRScheduler:
    """``lr * gamma ** k`` after the k-th milestone; milestones are fractions of the total steps (in (0, 1))."""
    for m in milestones:
        if not 0 < m < 1:
            raise ValueError(f"sched.milestones are fractions of the run in (0, 1), got {list(milestones)}")
    steps = sorted(int(round(m * total_steps)) for m in milestones)
    return LambdaLR(optimizer, lambda step: gamma ** bisect.bisect_right(steps, step))


def step_decay(optimizer: torch.optim.Optimizer, total_steps: int, step_size: int = 12500, gamma: float = 0.7,
               min_lr: float = 0.0) -> LRScheduler:
    """Staircase decay ``lr * gamma ** floor(step / step_size)``, clipped below at ``min_lr``."""
    if step_size < 1:
        raise ValueError(f"sched.step_size must be >= 1 optimizer step, got {step_size}")
    base = [g["lr"] for g in optimizer.param_groups]
    lambdas = [lambda step, b=b: max(gamma ** (step // step_size), min_lr / b if b > 0 else 0.0) for b in base]
    return LambdaLR(optimizer, lambdas)


def build_ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """An exponential moving average of ``model``'s parameters and buffers (``decay`` per optimizer step)."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"trainer.ema_decay must be in (0, 1), e.g. 0.999, got {decay}")
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn  # noqa: PLC0415

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
