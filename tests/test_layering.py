"""Layering of the library: fixtures stay out of it, the naive oracle depends on production code (never the
reverse), and the tests find the real samples beside the repository they test."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from pcbench.testing import clouds
from tests.conftest import REPO, changed_entries, tree_state

LIBRARY = REPO / "pcbench"
FIXTURES = LIBRARY / "testing"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path) -> set[str]:
    """Absolute names of the modules ``path`` (a file of the package tree under ``root``) imports, relative
    imports resolved; ``from a import b`` yields both ``a`` and ``a.b`` (b may be a submodule)."""
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join([*base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def layering_violations(root: Path) -> list[str]:
    """Every breach of the rules below in the ``pcbench`` tree under ``root`` (a checkout's top folder)."""
    bad = []
    lib = root / "pcbench"
    for f in sorted(lib.rglob("*.py")):
        rel = f.relative_to(root)
        name = _module_name(f, root)
        if _within(name, "pcbench.testing"):
            continue
        mods = imported_modules(f, root)
        if "shared/data" in f.read_text():
            bad.append(f"{rel} mentions shared/data: the library may not depend on files beside the repository")
        bad += [f"{rel} imports {m}: the library never imports the tests" for m in mods if _within(m, "tests")]
        bad += [f"{rel} imports {m}: the fixtures are for tests and benchmarks only"
                for m in mods if _within(m, "pcbench.testing")]
        bad += [f"{rel} imports {m}: the library never imports the preparers or the benchmarks"
                for m in mods if _within(m, "data_prep") or _within(m, "benchmarks")]
        if _within(name, "pcbench.ops"):
            bad += [f"{rel} imports {m}: pcbench.ops imports nothing else of pcbench"
                    for m in mods if _within(m, "pcbench") and not _within(m, "pcbench.ops")]
            if name != "pcbench.ops._reference":
                bad += [f"{rel} imports {m}: only tests and benchmarks use the naive oracle"
                        for m in mods if _within(m, "pcbench.ops._reference")]
    return bad


def test_library_layering() -> None:
    assert layering_violations(REPO) == []


def _write(root: Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


@pytest.mark.parametrize(("rel", "text", "why"), [
    ("pcbench/ops/fps.py", "from ._reference import sample_counts\n", "naive oracle"),
    ("pcbench/ops/fps.py", "from . import _reference\n", "naive oracle"),
    ("pcbench/ops/knn.py", "import pcbench.ops._reference as r\n", "naive oracle"),
    ("pcbench/ops/knn.py", "from ..train import fit\n", "imports nothing else of pcbench"),
    ("pcbench/ops/_clouds.py", "P = '../shared/data'\n", "mentions shared/data"),
    ("pcbench/bench/report.py", "from tests.conftest import REPO\n", "never imports the tests"),
    ("pcbench/models/x.py", "from ..testing.clouds import object_batch\n", "tests and benchmarks only"),
    ("pcbench/cli/bench.py", "from data_prep import cli\n", "preparers or the benchmarks"),
    ("pcbench/bench/runner.py", "def f():\n    import benchmarks.harness\n", "preparers or the benchmarks"),
])
def test_each_rule_catches_its_breach(tmp_path: Path, rel: str, text: str, why: str) -> None:
    _write(tmp_path, "pcbench/__init__.py", "")
    _write(tmp_path, "pcbench/ops/__init__.py", "from .fps import sample_counts\n")
    _write(tmp_path, "pcbench/ops/_reference.py", "from .fps import sample_counts\n")
    _write(tmp_path, "pcbench/testing/clouds.py", "P = '../shared/data'\nfrom tests.conftest import REPO\n")
    assert layering_violations(tmp_path) == []  # the allowed directions: oracle -> production, fixtures anywhere
    _write(tmp_path, rel, text)
    bad = layering_violations(tmp_path)
    assert bad and all(b.startswith(rel) and why in b for b in bad), bad


def test_tests_find_the_samples_beside_the_repository_under_test(monkeypatch: pytest.MonkeyPatch) -> None:
    # pytest puts the repo under test first on sys.path, so the fixtures module is this checkout's own
    assert Path(clouds.__file__).resolve().is_relative_to(REPO)
    assert clouds.shared_data_path() == Path(os.environ["PCBENCH_SHARED_DATA"])  # set by tests/conftest.py
    monkeypatch.delenv("PCBENCH_SHARED_DATA", raising=False)
    assert clouds.shared_data_path() is None  # the library knows no default location
    monkeypatch.setenv("PCBENCH_SHARED_DATA", "/elsewhere/data")
    assert clouds.shared_data_path() == Path("/elsewhere/data")


def test_the_read_only_guard_sees_writes_removals_and_edits(tmp_path: Path) -> None:
    assert tree_state(tmp_path / "absent") == {}
    (tmp_path / "scannet").mkdir()
    (tmp_path / "scannet" / "a.ply").write_bytes(b"1234")
    before = tree_state(tmp_path)
    assert changed_entries(before, tree_state(tmp_path)) == []
    (tmp_path / "scannet" / "a.ply").write_bytes(b"12345")
    assert changed_entries(before, tree_state(tmp_path)) == ["scannet/a.ply"]
    (tmp_path / "scannet" / "cache.npy").write_bytes(b"")
    assert "scannet/cache.npy" in changed_entries(before, tree_state(tmp_path))
    (tmp_path / "scannet" / "a.ply").unlink()
    assert "scannet/a.ply" in changed_entries(before, tree_state(tmp_path))
