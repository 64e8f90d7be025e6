"""Checkpoints: atomic writes, plain containers only (``torch.load(..., weights_only=True)`` loads them).

A training checkpoint is a dict with ``model`` (the state dict), ``optimizer``, ``scheduler``, ``scaler``,
``ema``, ``rng`` (:func:`rng_state`), ``progress`` (epoch, step, position in the epoch, history, best),
``config`` (the resolved config as a YAML string) and ``format`` (:data:`FORMAT`).
"""

from __future__ import annotations

import errno
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pcbench.io import atomic_path

from .errors import RunFileError

__all__ = ["FORMAT", "load_checkpoint", "restore_rng_state", "rng_state", "save_checkpoint"]

FORMAT = 1


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (temp file in the same folder, fsync, rename, fsync folder).

    RunFileError "no space left on <dir>: need about N MB" when the disk is full (the old file is kept).
    """
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except (OSError, RuntimeError) as err:
        need = _nbytes(state)
        # torch's zip writer reports a full disk as a RuntimeError, so the free space decides
        full = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
        if not full and isinstance(err, RuntimeError):
            try:
                full = shutil.disk_usage(path.parent).free < need
            except OSError:
                full = False
        if full:
            raise RunFileError(f"no space left on {path.parent}: need about {max(1, round(need / 2**20))} MB to write "
                               f"{path.name}; free some space (the previous {path.name} is kept) and resume with "
                               "resume=true") from err
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; RunFileError (a ValueError) naming the file and the fix when
    it is missing, empty, damaged or foreign."""
    path = Path(path)
    if not path.is_file():
        raise RunFileError(f"checkpoint {str(path)!r} does not exist; give the path of a checkpoints/*.pt file "
                         "written by pcbench-train")
    if path.stat().st_size == 0:
        raise RunFileError(f"checkpoint {str(path)!r} is empty (0 bytes); it was not written by a finished save: "
                           "delete it, or start a new run directory")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not a pcbench checkpoint"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunFileError(f"checkpoint {str(path)!r} cannot be loaded with weights_only=True ({first[:200]}); it "
                           "is damaged or not a pcbench checkpoint: use another checkpoint or start a new run "
                           "directory") from err
    if not isinstance(state, dict) or "model" not in state:
        raise RunFileError(f"checkpoint {str(path)!r} has no 'model' state dict; it was not written by pcbench-train")
    return state


def rng_state() -> dict[str, Any]:
    """Every global RNG state (python, numpy, torch CPU, CUDA) as tensors and plain containers."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state()  # noqa: NPY002 - saving the legacy global state is the point
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],  # noqa: NPY002
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
