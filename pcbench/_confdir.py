"""Where pcbench's Hydra ``conf/`` folder is: one lookup shared by every stage (models list their configs, the
trainer composes them), so no stage imports another to find it."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["conf_candidates", "find_conf_dir"]

_PKG = Path(__file__).resolve().parent  # .../pcbench


def conf_candidates() -> list[Path]:
    """The places looked at, in order: ``$PCBENCH_CONF``, ``conf/`` beside the package, ``pcbench/conf``."""
    out = [Path(os.environ["PCBENCH_CONF"]).expanduser()] if os.environ.get("PCBENCH_CONF") else []
    return [*out, _PKG.parent / "conf", _PKG / "conf"]


def find_conf_dir() -> Path | None:
    """The first candidate holding ``train.yaml`` (resolved), or None."""
    for c in conf_candidates():
        if (c / "train.yaml").is_file():
            return c.resolve()
    return None
