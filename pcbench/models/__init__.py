"""Models: one file per architecture, each built from its ``conf/model/*.yaml`` by :func:`build_model`."""

from .build import META_KEYS, TASKS, build_model, model_task

__all__ = ["META_KEYS", "TASKS", "build_model", "model_task"]
