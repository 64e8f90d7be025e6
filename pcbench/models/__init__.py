"""Models: one file per architecture, each built from its ``conf/model/*.yaml`` by :func:`build_model`;
:func:`create_model` / :func:`list_models` are the same configs behind a timm-style API."""

from .build import META_KEYS, TASKS, build_model, model_task
from .zoo import create_model, list_models

__all__ = ["META_KEYS", "TASKS", "build_model", "create_model", "list_models", "model_task"]
