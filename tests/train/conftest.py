"""Prepared folders for the trainer tests, made once per session with the real preparer (pcbench-prep)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA

from ._cli import prep


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Prepared ModelNet40 / ScanObjectNN / ScanNet folders: synthetic ones always, real ones where ../shared has them."""
    base = tmp_path_factory.mktemp("prepared")
    out = {
        "mn40_syn": prep("modelnet40", base / "mn40_syn"),
        "sonn_syn": prep("scanobjectnn", base / "sonn_syn"),
        "scannet_syn": prep("scannet", base / "scannet_syn"),
    }
    mn_raw = SHARED_DATA / "modelnet40" / "modelnet40_normal_resampled"
    if mn_raw.is_dir():
        out["mn40_real"] = prep("modelnet40", base / "mn40_real", mn_raw, "allow_missing=true")
    sn_raw = SHARED_DATA / "scannet"
    if (sn_raw / "scans").is_dir():
        out["scannet_real"] = prep("scannet", base / "scannet_real", sn_raw, "scenes=present")
    return out


def real_or_synthetic(prepared: dict[str, Path], real: str, synthetic: str) -> tuple[Path, bool]:
    """The real prepared folder when ../shared has the samples, else the synthetic one (never a skip)."""
    return (prepared[real], True) if real in prepared else (prepared[synthetic], False)
