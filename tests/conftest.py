"""Shared fixtures: the real sample files in ../shared/data (read-only: checked after the session) and seeded
generators."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The sample folder beside the checkout under test, unless the caller names another; exported so that the
# benchmarks and CLI subprocesses the tests start (pcbench.testing.clouds.shared_data_path) see the same folder.
os.environ.setdefault("PCBENCH_SHARED_DATA", str(REPO.parent / "shared" / "data"))
SHARED_DATA = Path(os.environ["PCBENCH_SHARED_DATA"])
_SHARED_STATE = pytest.StashKey[dict[str, tuple[int, int]]]()


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


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of ``root`` and every entry below it, by relative path; empty if ``root`` is absent."""
    if not root.is_dir():
        return {}
    return {str(q.relative_to(root)): (st.st_mtime_ns, st.st_size)
            for q in (root, *root.rglob("*")) for st in (q.lstat(),)}


def changed_entries(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list[str]:
    """Paths created, removed or modified between two ``tree_state`` snapshots (a directory's mtime moves
    when an entry is added or removed in it)."""
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_SHARED_STATE] = tree_state(SHARED_DATA)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # The sample files are shared by every checkout on the machine: a test that writes there (a preparer's
    # output, a cache) corrupts the others' fixtures, so a session that changed them fails.
    before = session.config.stash.get(_SHARED_STATE, None)
    if before is None:
        return
    changed = changed_entries(before, tree_state(SHARED_DATA))
    if changed:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        msg = (f"tests changed the read-only sample folder {SHARED_DATA}: {changed[:20]}; write to tmp_path "
               "instead (copy the samples first, as tests/train/_cli.py::copy_tree does)")
        if reporter is not None:
            reporter.write_sep("=", "shared sample folder changed", red=True)
            reporter.write_line(f"ERROR: {msg}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
