"""Learning-rate schedules (per optimizer step) and the weight EMA, built from ``conf/sched/`` and the trainer config.

Each schedule builder takes the optimizer and ``total_steps`` (the run's optimizer steps, known once the
data is loaded) plus its own options, so ``conf/sched/*.yaml`` are ``_partial_`` nodes that the trainer
completes with ``(optimizer, total_steps=...)``.
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

__all__ = ["HostCountedEMA", "bn_momentum_at", "build_ema", "cosine_with_warmup", "multistep", "one_cycle", "param_groups",
           "set_bn_momentum", "step_decay"]


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
              anneal_strategy: str = "cos", div_factor: float = 10.0, final_div_factor: float = 1000.0,
              cycle_momentum: bool = False, base_momentum: float = 0.85, max_momentum: float = 0.95) -> LRScheduler:
    """torch's OneCycleLR with ``max_lr`` = each group's configured lr.

    ``cycle_momentum=True`` also cycles SGD's momentum (Adam's beta1) between ``max_momentum`` and
    ``base_momentum`` inversely to the lr, as torch's and Pointcept's OneCycleLR do by default.
    """
    max_lr = [g["lr"] for g in optimizer.param_groups]
    return OneCycleLR(optimizer, max_lr=max_lr, total_steps=max(total_steps, 2), pct_start=pct_start,
                      anneal_strategy=anneal_strategy, div_factor=div_factor, final_div_factor=final_div_factor,
                      cycle_momentum=cycle_momentum, base_momentum=base_momentum, max_momentum=max_momentum)


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


class HostCountedEMA(torch.optim.swa_utils.AveragedModel):
    """torch's weight EMA (``AveragedModel`` + ``get_ema_multi_avg_fn``) whose update reads nothing from the device.

    ``AveragedModel.update_parameters`` tests its ``n_averaged`` buffer twice per call: two host syncs per
    training step on a GPU. The buffer is still kept (checkpoints hold it), mirrored by a host count that is read
    from it once, at the first update after ``load_state_dict``; the averaging itself is torch's function.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        from torch.optim.swa_utils import get_ema_multi_avg_fn  # noqa: PLC0415

        super().__init__(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self._count: int | None = 0

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """Load as ``nn.Module`` does; the host count is re-read from ``n_averaged`` at the next update."""
        out = super().load_state_dict(*args, **kwargs)
        self._count = None
        return out

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        """Copy ``model``'s parameters and buffers at the first update, then lerp towards them (torch's EMA)."""
        if self._count is None:
            self._count = int(self.n_averaged)
        ema = [t.detach() for t in itertools.chain(self.module.parameters(), self.module.buffers())]
        cur = [t.detach().to(e.device) for e, t in
               zip(ema, itertools.chain(model.parameters(), model.buffers()), strict=True)]
        if self._count == 0:
            for e, c in zip(ema, cur, strict=True):
                e.copy_(c)
        else:
            groups: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
            for e, c in zip(ema, cur, strict=True):
                group = groups.setdefault((e.device, e.dtype), ([], []))
                group[0].append(e)
                group[1].append(c)
            for ema_group, cur_group in groups.values():
                self.multi_avg_fn(ema_group, cur_group, None)
        self.n_averaged += 1
        self._count += 1


def build_ema(model: nn.Module, decay: float) -> HostCountedEMA:
    """An exponential moving average of ``model``'s parameters and buffers (``decay`` per optimizer step)."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"trainer.ema_decay must be in (0, 1), e.g. 0.999, got {decay}")
    return HostCountedEMA(model, decay)


def param_groups(model: nn.Module, groups: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]] | Any:
    """Optimizer parameter groups: each trainable parameter goes to the first group whose ``pattern`` (a regular
    expression) it matches by name (``re.search``), otherwise to the default group (the optimizer's own lr and
    weight decay). Group options (``lr``, ``weight_decay``, ``momentum``, ...) are passed to the optimizer.

    Pointcept's ``param_dicts=[dict(keyword="block", lr=...)]`` is a substring match on its module names; the
    recipes give the regular expression that selects the same modules in pcbench's models. With no groups the
    model's parameters are returned as they are. A pattern that matches nothing is an error (a renamed module
    would otherwise silently drop the setting).
    """
    if not groups:
        return model.parameters()
    default: dict[str, Any] = {"params": []}
    out = [default]
    compiled = []
    for i, g in enumerate(groups):
        g = dict(g)
        if "pattern" not in g:
            raise ValueError(f"optim_groups[{i}] has no 'pattern' (a regular expression on parameter names), got {g}")
        try:
            compiled.append(re.compile(str(g.pop("pattern"))))
        except re.error as err:
            raise ValueError(f"optim_groups[{i}].pattern is not a valid regular expression: {err}") from None
        out.append({**g, "params": []})
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        for i, rx in enumerate(compiled):
            if rx.search(name):
                out[i + 1]["params"].append(param)
                break
        else:
            default["params"].append(param)
    for i, (g, rx) in enumerate(zip(out[1:], compiled, strict=True)):
        if not g["params"]:
            raise ValueError(f"optim_groups[{i}].pattern {rx.pattern!r} matches no parameter of "
                             f"{type(model).__name__}; its parameter names look like "
                             f"{[n for n, _ in list(model.named_parameters())[:4]]}")
    return [g for g in out if g["params"]]


def bn_momentum_at(step: int, start: float, gamma: float, step_size: int, minimum: float) -> float:
    """BatchNorm momentum (torch convention: weight of the new batch) at optimizer step ``step``:
    ``max(minimum, start * gamma ** floor(step / step_size))``.

    PointNet++'s TF scripts decay ``bn_decay = min(0.99, 1 - 0.5 * 0.5 ** floor(step * batch / 200000))``,
    the weight of the running average, i.e. start 0.5, gamma 0.5, step_size 200000 / batch, minimum 0.01 here.
    """
    if step_size < 1:
        raise ValueError(f"trainer.bn_momentum.step_size must be >= 1 optimizer step, got {step_size}")
    return max(float(minimum), float(start) * float(gamma) ** (int(step) // int(step_size)))


def set_bn_momentum(model: nn.Module, momentum: float) -> int:
    """Set ``momentum`` on every BatchNorm layer of ``model``; returns how many layers were set."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum
            n += 1
    return n
