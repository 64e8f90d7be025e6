"""Synthetic ScanNet rooms: official raw format (headers, dtypes, json keys, tsv), determinism, geometry."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from plyfile import PlyData

from data_prep import synthetic_scannet as syn
from data_prep.common import sha256_file

MESH_HEADER = (b"ply\nformat binary_little_endian 1.0\ncomment VCGLIB generated\nelement vertex {n}\n"
               b"property float x\nproperty float y\nproperty float z\nproperty uchar red\nproperty uchar green\n"
               b"property uchar blue\nproperty uchar alpha\nelement face {f}\n"
               b"property list uchar int vertex_indices\nend_header\n")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("syn")
    syn.generate(r, train=2, val=1, test=1, seed=3)
    return r


def all_files(r: Path) -> dict[str, str]:
    return {p.relative_to(r).as_posix(): sha256_file(p) for p in sorted(r.rglob("*")) if p.is_file()}


def test_layout_and_split_lists(root):
    assert (root / "scannetv2_train.txt").read_text() == "scene0000_00\nscene0001_00\n"
    assert (root / "scannetv2_val.txt").read_text() == "scene0002_00\n"
    assert (root / "scannetv2_test.txt").read_text() == "scene0003_00\n"
    names = {p.name for p in (root / "scans" / "scene0000_00").iterdir()}
    assert names == {"scene0000_00_vh_clean_2.ply", "scene0000_00_vh_clean_2.labels.ply", "scene0000_00.txt",
                     "scene0000_00_vh_clean_2.0.010000.segs.json", "scene0000_00.aggregation.json"}
    test_names = {p.name for p in (root / "scans_test" / "scene0003_00").iterdir()}
    assert test_names == {"scene0003_00_vh_clean_2.ply", "scene0003_00_vh_clean_2.0.010000.segs.json",
                          "scene0003_00.txt"}
    assert "axisAlignment" not in (root / "scans_test" / "scene0003_00" / "scene0003_00.txt").read_text()


def test_ply_headers_and_dtypes_are_official(root):
    d = root / "scans" / "scene0001_00"
    mesh = PlyData.read(str(d / "scene0001_00_vh_clean_2.ply"))
    n, f = mesh["vertex"].count, mesh["face"].count
    raw = (d / "scene0001_00_vh_clean_2.ply").read_bytes()
    head = MESH_HEADER.replace(b"{n}", str(n).encode()).replace(b"{f}", str(f).encode())
    assert raw.startswith(head)
    assert len(raw) == len(head) + n * 16 + f * 13  # 3 float + 4 uchar per vertex; 1 uchar + 3 int per face
    labels = PlyData.read(str(d / "scene0001_00_vh_clean_2.labels.ply"))
    assert labels.comments == ["MLIB generated"] and labels["vertex"].count == n
    assert [(p.name, p.val_dtype) for p in labels["vertex"].properties][-1] == ("label", "u2")
    assert (np.asarray(mesh["vertex"]["alpha"]) == 255).all()
    assert 1500 < n < 6000  # "a few thousand vertices"


def test_json_files_follow_the_v2_layout(root):
    d = root / "scans" / "scene0000_00"
    segs = json.loads((d / "scene0000_00_vh_clean_2.0.010000.segs.json").read_text())
    assert set(segs) == {"params", "sceneId", "segIndices"} and all(isinstance(v, str) for v in segs["params"].values())
    agg = json.loads((d / "scene0000_00.aggregation.json").read_text())
    assert agg["appId"] == "Aggregator.v2" and agg["sceneId"] == "scannet.scene0000_00"
    assert agg["segmentsFile"] == "scannet.scene0000_00_vh_clean_2.0.010000.segs.json"
    seg = np.array(segs["segIndices"])
    room = syn.room_for("scene0000_00", seed=3)
    assert seg.shape[0] == len(room.coord)
    used = set()
    for g in agg["segGroups"]:
        assert set(g) == {"id", "objectId", "segments", "label"}
        assert set(g["segments"]) <= set(seg.tolist())
        assert not used & set(g["segments"])  # groups do not share segments
        used |= set(g["segments"])
        # each group covers exactly the vertices of its object
        np.testing.assert_array_equal(np.isin(seg, g["segments"]), room.vertex_object == g["objectId"])
    assert (room.vertex_object == -1).any()  # the clutter box is unannotated
    labels = PlyData.read(str(d / "scene0000_00_vh_clean_2.labels.ply"))["vertex"]["label"]
    np.testing.assert_array_equal(labels, room.nyu40)


def test_tsv_is_a_faithful_subset(root, shared_data):
    raw = (root / "scannetv2-labels.combined.tsv").read_bytes()
    assert raw.count(b"\r\n") == len(syn.TSV_ROWS) + 1 and b"refridgerator" in raw
    official = (shared_data / "scannet" / "scannetv2-labels.combined.tsv").read_bytes().split(b"\r\n")
    lines = raw.split(b"\r\n")[:-1]
    assert lines[0] == official[0]
    assert set(lines[1:]) <= set(official)
    with open(root / "scannetv2-labels.combined.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert all(len(r) == 17 for r in rows)


def test_deterministic_for_a_seed(root, tmp_path):
    again = tmp_path / "again"
    syn.generate(again, train=2, val=1, test=1, seed=3)
    assert all_files(again) == all_files(root)
    other = tmp_path / "other"
    syn.generate(other, train=2, val=1, test=1, seed=4)
    a, b = all_files(other), all_files(root)
    assert a["scannetv2-labels.combined.tsv"] == b["scannetv2-labels.combined.tsv"]
    assert a["scans/scene0000_00/scene0000_00_vh_clean_2.ply"] != b["scans/scene0000_00/scene0000_00_vh_clean_2.ply"]


def test_alignment_matrix_is_rigid_and_aligns_walls(root):
    room = syn.room_for("scene0001_00", seed=3)
    mat = room.axis_alignment
    np.testing.assert_allclose(mat[:3, :3] @ mat[:3, :3].T, np.eye(3), atol=2e-6)
    np.testing.assert_array_equal(mat[3], [0, 0, 0, 1])
    txt = (root / "scans" / "scene0001_00" / "scene0001_00.txt").read_text().splitlines()[0]
    assert txt.startswith("axisAlignment = ")
    np.testing.assert_array_equal(np.array(txt.split("=")[1].split(), float).reshape(4, 4), mat)
    # in the scan frame walls are rotated; aligned, the first wall (along x) has constant y
    wall = room.vertex_object == room.objects.index("wall")
    assert np.ptp(room.aligned[wall, 1]) < 1e-5 and np.ptp(room.coord[wall, 1]) > 0.1
    faces = room.faces
    assert faces.min() >= 0 and faces.max() < len(room.coord)
    area = np.linalg.norm(np.cross(room.aligned[faces[:, 1]] - room.aligned[faces[:, 0]],
                                   room.aligned[faces[:, 2]] - room.aligned[faces[:, 0]]), axis=1)
    assert (area > 0).all()


def test_main_writes_and_rejects_bad_arguments(tmp_path, capsys):
    assert syn.main([f"out={tmp_path / 'r'}", "train=1", "val=0", "test=0"]) == 0
    assert (tmp_path / "r" / "scans" / "scene0000_00" / "scene0000_00_vh_clean_2.ply").is_file()
    assert syn.main(["train=1"]) == 2 and syn.main([f"out={tmp_path}", "bogus=1"]) == 2


def test_prepared_synthetic_is_idempotent(tmp_path):
    from pcbench.data.scannet import ScanNetDataset

    out = syn.prepared_synthetic(tmp_path, train=2, val=1, test=0, seed=5)
    before = sha256_file(out / "train" / "train_0000.h5")
    ds = ScanNetDataset(out, "train")
    assert len(ds) == 2 and ds[0]["name"] == "scene0000_00"
    assert syn.prepared_synthetic(tmp_path, train=2, val=1, test=0, seed=5) == out
    assert sha256_file(out / "train" / "train_0000.h5") == before
    syn.prepared_synthetic(tmp_path, train=3, val=1, test=0, seed=5)  # other counts: raw rebuilt
    assert len(ScanNetDataset(out, "train")) == 3
