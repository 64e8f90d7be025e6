"""Build a model from its ``conf/model/*.yaml`` config: the one way the trainer, runner and tests do it.

Every model config is a Hydra ``_target_`` node plus one non-constructor key, ``task`` ("cls": the model
returns ``[B, classes]``; "seg": ``[N, classes]``, one row per input point), and leaves
``in_channels: ???`` / ``num_classes: ???`` to be filled from the dataset, so they are never typed twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

__all__ = ["META_KEYS", "TASKS", "build_model", "model_task"]

#: Keys of a model config that describe the model and are not passed to its constructor.
META_KEYS = ("task",)
TASKS = ("cls", "seg")


def _as_config(cfg: DictConfig | Mapping[str, Any]) -> DictConfig:
    if isinstance(cfg, DictConfig):
        return cfg
    if isinstance(cfg, Mapping):
        return OmegaConf.create(dict(cfg))
    raise TypeError(f"model config must be a DictConfig or a mapping, got {type(cfg).__name__}")


def model_task(cfg: DictConfig | Mapping[str, Any]) -> str:
    """The ``task`` a model config declares ("cls" or "seg"); ValueError naming the fix when absent or unknown."""
    cfg = _as_config(cfg)
    task = cfg.get("task")
    if task not in TASKS:
        target = cfg.get("_target_", "<no _target_>")
        raise ValueError(f"model config for {target} has task={task!r}; set task: cls (logits per cloud) or "
                         "task: seg (logits per point) in its conf/model/*.yaml")
    return str(task)


def build_model(cfg: DictConfig | Mapping[str, Any], in_channels: int, num_classes: int) -> nn.Module:
    """Instantiate a model config with the dataset's ``in_channels`` and ``num_classes`` (meta keys dropped)."""
    import hydra  # noqa: PLC0415 - hydra's import is slow; only builders need it

    cfg = _as_config(cfg)
    model_task(cfg)
    if "_target_" not in cfg:
        raise ValueError("model config has no _target_; point it at the model class, e.g. "
                         "_target_: pcbench.models.pointnet2.PointNet2Cls")
    if int(in_channels) < 0 or int(num_classes) < 1:
        raise ValueError(f"in_channels={in_channels}, num_classes={num_classes}: need in_channels >= 0 and "
                         "num_classes >= 1 (both come from the prepared dataset)")
    node = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))  # a detached, unlocked copy
    for key in META_KEYS:
        node.pop(key, None)
    node["in_channels"] = int(in_channels)
    node["num_classes"] = int(num_classes)
    missing = sorted(k for k in node if OmegaConf.is_missing(node, k))
    if missing:
        raise ValueError(f"model config for {node['_target_']} leaves {missing} unset (???); set them with "
                         f"model.{missing[0]}=<value>")
    return hydra.utils.instantiate(node)
