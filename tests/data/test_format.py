"""The prepared-data format lives in the library (issue 8 item 12): one-way imports, refusals that name the
file and the command that fixes it."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import data_prep.common
import pcbench.data.format as F
from data_prep import modelnet as prep_mn
from data_prep import synthetic_objects as S
from data_prep.common import parse_options
from pcbench.data import ModelNetDataset

PCBENCH = Path(__file__).resolve().parents[2] / "pcbench"


def _imported_modules(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_library_never_imports_the_preparers_or_the_benchmarks():
    files = sorted(PCBENCH.rglob("*.py"))
    assert len(files) > 20
    bad = [(f.relative_to(PCBENCH.parent).as_posix(), m) for f in files for m in _imported_modules(f)
           if m.split(".")[0] in ("data_prep", "benchmarks")]
    assert bad == []


def test_the_preparers_use_the_library_format_not_a_copy():
    for name in ("RaggedH5Reader", "write_ragged_h5", "read_manifest", "PrepError", "FORMAT_VERSION",
                 "REQUIRED_MANIFEST_KEYS", "MANIFEST_NAME"):
        assert getattr(data_prep.common, name) is getattr(F, name), name


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("raw")
    S.write_modelnet_normal_resampled(raw, train=2, test=1, seed=0, points=400)
    out = tmp_path_factory.mktemp("prepared") / "mn"
    assert prep_mn.prepare(raw, out, parse_options(prep_mn.OPTIONS, {"points": 0, "shard_size": 4}), 1).ok
    return out


@pytest.mark.parametrize("cut", [0.5, 0.95])
def test_truncated_shard_names_itself_and_the_command_that_rewrites_it(prepared, tmp_path, cut):
    root = Path(shutil.copytree(prepared, tmp_path / "copy"))
    shard = root / "train/shard_00001.h5"
    shard.write_bytes(shard.read_bytes()[: int(shard.stat().st_size * cut)])
    ds = ModelNetDataset(root, "train")
    cmd = json.loads((root / "manifest.json").read_text())["command"]
    assert cmd.startswith("pcbench-prep modelnet40 raw=")
    ds[0]  # other shards still work
    with pytest.raises(F.PrepError) as info:
        ds[5]
    msg = str(info.value)
    assert msg.startswith(f"{shard}: ") and "truncated or corrupt" in msg and msg.endswith(f"Fix: re-prepare with: {cmd}")
    with pytest.raises(F.PrepError, match=r"shard_00001.h5: .*truncated or corrupt.*re-prepare with: pcbench-prep"):
        ds.labels()


def test_read_manifest_refuses_incomplete_and_partial_manifests(prepared, tmp_path):
    root = Path(shutil.copytree(prepared, tmp_path / "copy"))
    good = json.loads((root / "manifest.json").read_text())
    assert good["status"] == "complete" and F.read_manifest(root)["splits"]
    body = F.incomplete_manifest("modelnet40", "pcbench-prep modelnet40 raw=/r out=/o points=16", ["train/a.h5"])
    (root / "manifest.json").write_text(json.dumps(body))
    with pytest.raises(F.PrepError, match=r"status: a preparation started at .* did not finish.*Fix: finish it with: "
                                          r"pcbench-prep modelnet40 raw=/r out=/o points=16$"):
        ModelNetDataset(root, "train")
    partial = {k: v for k, v in good.items() if k != "splits"}
    (root / "manifest.json").write_text(json.dumps(partial))
    with pytest.raises(F.PrepError, match=r"missing keys \['splits'\].*re-prepare with: pcbench-prep modelnet40"):
        F.read_manifest(root)
    old = {k: v for k, v in good.items() if k != "status"}  # written before the status key existed
    (root / "manifest.json").write_text(json.dumps(old))
    assert F.read_manifest(root)["dataset"] == "modelnet40"
    (root / "manifest.json").write_bytes(b"\xff{")
    with pytest.raises(F.PrepError, match="unreadable JSON"):
        F.read_manifest(root)


def test_ragged_reader_per_sample_reads_the_scalar_column(prepared):
    m = F.read_manifest(prepared)
    r = F.RaggedH5Reader(prepared / m["splits"]["train"]["files"][0]["path"])
    np.testing.assert_array_equal(r.per_sample("label"), [int(r[i]["label"]) for i in range(len(r))])
    with pytest.raises(ValueError, match="has no per-sample 'coord'"):
        r.per_sample("coord")
