"""pcbench.io: the one atomic write (temp file + fsync + rename) behind every output."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pcbench.io import TEMP_PREFIX, atomic_path, write_json, write_text


def test_write_replaces_whole_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    p = tmp_path / "sub" / "a.json"
    write_json(p, {"x": 1})
    write_json(p, {"x": [1, 2]})
    assert json.loads(p.read_text()) == {"x": [1, 2]}
    assert sorted(q.name for q in p.parent.iterdir()) == ["a.json"]
    assert oct(p.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    p = tmp_path / "a.txt"
    write_text(p, "old\n")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(p) as tmp:
        assert tmp.name.startswith(TEMP_PREFIX) and tmp.parent == p.parent
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert p.read_text() == "old\n" and sorted(q.name for q in tmp_path.iterdir()) == ["a.txt"]


def test_nan_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Out of range float values"):
        write_json(tmp_path / "m.json", {"oa": float("nan")})
    assert not (tmp_path / "m.json").exists() and list(tmp_path.iterdir()) == []


def test_the_preparers_use_the_same_implementation() -> None:
    from data_prep import common

    assert common.atomic_write is atomic_path and common.atomic_write_text is write_text
    assert common.TEMP_PREFIX == TEMP_PREFIX
