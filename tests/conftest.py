"""Shared fixtures: the real sample files in ../shared/data and seeded generators."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PCBENCH_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Read-only folder of real ScanNet / ScanObjectNN / ModelNet samples; skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real sample data not found at {SHARED_DATA} (set PCBENCH_SHARED_DATA to its path)")
    return SHARED_DATA


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded torch generator so every test is reproducible."""
    return torch.Generator().manual_seed(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none present)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
