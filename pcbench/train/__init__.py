"""The shared trainer: ``fit(cfg) -> FitResult`` and ``evaluate(cfg, checkpoint) -> metrics`` (see trainer.py).

Helpers for callers that drive it (benchmark runner): :func:`compose` a config from overrides,
:func:`build_run` (datasets + model from a config), :func:`evaluate_split` (a model on a split under a
given autocast precision).
"""

from .config import ConfigError, compose, config_dir
from .trainer import Run, build_run, evaluate, evaluate_split, fit

__all__ = ["ConfigError", "Run", "build_run", "compose", "config_dir", "evaluate", "evaluate_split", "fit"]
