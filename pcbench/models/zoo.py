"""A model API researchers know from timm / torch-pointcloud: ``list_models`` and ``create_model`` over
``conf/model/*.yaml``.

``create_model("ptv3_seg", in_channels=6, num_classes=20, neighbors=16)`` builds through :func:`build_model`
(the Hydra path the trainer uses), so a model made here is the model a run trains. ``weights`` loads a pcbench
checkpoint (converted with ``pcbench-convert`` or written by ``pcbench-train``) or a published checkpoint by its
registry name (``pcbench-weights list``); a checkpoint with another number of classes gets a fresh classifier
(``reset_classifier``), as timm does for fine-tuning.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from pcbench._confdir import conf_candidates, find_conf_dir

from .build import META_KEYS, TASKS, build_model, model_task

__all__ = ["create_model", "list_models", "load_weights", "model_config", "model_config_dir"]

_RESERVED = {"_target_", "_convert_", "in_channels", "num_classes", *META_KEYS}


def model_config_dir() -> Path:
    """The ``conf/model`` folder (found as the trainer finds ``conf/``: ``$PCBENCH_CONF`` first)."""
    found = find_conf_dir()
    if found is None:
        raise FileNotFoundError(f"pcbench's conf/ (with train.yaml) was not found in "
                                f"{[str(c) for c in conf_candidates()]}; set PCBENCH_CONF=<path of conf/> or "
                                "reinstall pcbench from its source checkout")
    return found / "model"


def list_models(pattern: str = "*", task: str | None = None) -> list[str]:
    """Sorted model config names matching the shell-style ``pattern``, optionally only one ``task`` (cls / seg)."""
    if task is not None and task not in TASKS:
        raise ValueError(f"list_models(task={task!r}): use one of {TASKS} or None for both")
    names = sorted(p.stem for p in model_config_dir().glob("*.yaml") if fnmatch.fnmatchcase(p.stem, pattern))
    if task is None:
        return names
    return [n for n in names if model_task(model_config(n)) == task]


def model_config(name: str) -> DictConfig:
    """The config ``conf/model/<name>.yaml``; ValueError listing close names when there is none."""
    path = model_config_dir() / f"{name}.yaml"
    if not path.is_file():
        known = list_models()
        close = difflib.get_close_matches(str(name), known, n=3)
        raise ValueError(f"no model config {name!r} in {model_config_dir()}; "
                         + (f"did you mean {close}? " if close else "") + f"known models: {known}")
    return OmegaConf.load(path)


def _apply_overrides(cfg: DictConfig, name: str, overrides: dict[str, Any]) -> DictConfig:
    missing = object()
    for key, value in overrides.items():
        if key.split(".")[0] in _RESERVED:
            raise ValueError(f"create_model({name!r}, {key}=...): {key} is not a model option; in_channels and "
                             "num_classes are arguments of create_model, the others are fixed by the config")
        if OmegaConf.select(cfg, key, default=missing) is missing:
            options = sorted(k for k in cfg if k not in _RESERVED)
            raise ValueError(f"model config {name!r} has no option {key!r}; its options: {options}")
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def create_model(name: str, in_channels: int, num_classes: int, weights: str | os.PathLike | None = None,
                 **overrides: Any) -> nn.Module:
    """Build ``conf/model/<name>.yaml`` for ``in_channels`` / ``num_classes``, with dotted-key ``overrides``
    (``neighbors=16``, ``**{"enc_depths": [1, 1, 1, 1, 1]}``), and optionally load ``weights`` (a checkpoint file
    or a published checkpoint's registry name)."""
    if weights is not None and not Path(weights).exists():
        from .zoo_registry import PUBLISHED  # noqa: PLC0415

        if str(weights) in PUBLISHED:  # the published network's own settings; the caller's overrides win
            overrides = {**dict(PUBLISHED[str(weights)].model_overrides), **overrides}
    cfg = _apply_overrides(model_config(name), name, overrides)
    if weights is None:
        return build_model(cfg, in_channels=in_channels, num_classes=num_classes)
    state = _read_weights(weights)
    ckpt_name = state.get("model_config")
    if ckpt_name is not None and ckpt_name != name:
        raise ValueError(f"weights {str(weights)!r} are for model {ckpt_name!r}, not {name!r}; "
                         f"call create_model({ckpt_name!r}, ...)")
    ckpt_in = state.get("in_channels")
    if ckpt_in is not None and int(ckpt_in) != int(in_channels):
        raise ValueError(f"weights {str(weights)!r} expect in_channels={ckpt_in}, got {in_channels}: feed the "
                         "features the checkpoint was trained on")
    ckpt_classes = int(state.get("num_classes", num_classes))
    model = build_model(cfg, in_channels=in_channels, num_classes=ckpt_classes)
    load_weights(model, state["model"], str(weights))
    if ckpt_classes != int(num_classes):
        model.reset_classifier(num_classes)
    return model


def _read_weights(weights: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint dict from a file, or from the published-checkpoint registry when ``weights`` is a name."""
    path = Path(weights)
    if not path.is_file():
        from .zoo_registry import PUBLISHED, fetch_weights  # noqa: PLC0415 - pooch is imported only to download

        if str(weights) not in PUBLISHED:
            raise ValueError(f"weights={str(weights)!r} is neither a file nor a published checkpoint name; "
                             "give a checkpoint path or one of `pcbench-weights list`")
        path = fetch_weights(str(weights))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not a pcbench checkpoint"
        raise ValueError(f"weights {str(path)!r} cannot be loaded with weights_only=True ({err}); convert a "
                         "reference checkpoint with pcbench-convert first") from err
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise ValueError(f"weights {str(path)!r} have no 'model' state dict; convert it with pcbench-convert")
    return state


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], origin: str = "state dict") -> nn.Module:
    """``model.load_state_dict(state_dict)`` (strict); ValueError naming the missing, unexpected or
    mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state_dict.items()
              if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(f"{origin} does not fit {type(model).__name__}: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}, shape mismatches {shapes[:3]} ({len(missing)} / {len(unexpected)} / "
                         f"{len(shapes)} in all); check the model config and its overrides")
    model.load_state_dict(state_dict)
    return model
