"""The shared trainer: ``fit(cfg) -> FitResult`` and ``evaluate(cfg, checkpoint) -> metrics`` (see trainer.py).

Helpers for callers that drive it (benchmark runner): :func:`compose` a config from overrides,
:func:`build_run` (datasets + model from a config), :func:`evaluate_split` (a model on a split under a
given autocast precision).
"""

from typing import Any

from .config import ConfigError, compose, config_dir

__all__ = ["ConfigError", "Run", "build_run", "compose", "config_dir", "evaluate", "evaluate_split", "fit"]

_TRAINER = ("Run", "build_run", "evaluate", "evaluate_split", "fit")


def __getattr__(name: str) -> Any:
    """The trainer (torch, models, data) loads on first use: the results store and report need only
    ``pcbench.train.config`` (config identity) and ``pcbench.train.result``, not torch."""
    if name in _TRAINER:
        from . import trainer  # noqa: PLC0415

        globals().update({n: getattr(trainer, n) for n in _TRAINER})  # later look-ups skip __getattr__
        return getattr(trainer, name)
    raise AttributeError(f"module 'pcbench.train' has no attribute {name!r}")
