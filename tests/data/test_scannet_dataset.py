"""ScanNetDataset over prepared synthetic rooms and the real sample scene."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep import scannet as prep
from data_prep import synthetic_scannet as syn
from data_prep.common import PrepError
from pcbench.data.collate import collate
from pcbench.data.scannet import ScanNetDataset
from pcbench.data.transforms import Compose, GridSample, RandomRotate

VALID_20 = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)  # ScanNet benchmark nyu40 ids


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path]:
    raw = tmp_path_factory.mktemp("raw")
    syn.generate(raw, train=3, val=1, test=1, seed=1)
    out = tmp_path_factory.mktemp("out")
    report = prep.prepare(raw, out, {"shard_size": 2}, workers=1, progress=False)
    assert report.ok
    return raw, out


def expected_label20(room: syn.Room) -> np.ndarray:
    lut = {nyu: i for i, nyu in enumerate(VALID_20)}
    return np.array([lut.get(int(v), -1) for v in room.nyu40])


def test_samples_carry_scene_arrays_and_labels(prepared):
    raw, out = prepared
    ds = ScanNetDataset(out, "train")
    assert len(ds) == 3 and ds.num_classes == 20 and ds.classes[0] == "wall" and ds.ignore_index == -1
    assert ds.scenes == ["scene0000_00", "scene0001_00", "scene0002_00"]
    for i, scene in enumerate(ds.scenes):
        s = ds[i]
        room = syn.room_for(scene, seed=1)
        n = len(room.coord)
        assert s["name"] == scene
        assert s["coord"].dtype == np.float32 and s["coord"].shape == (n, 3)
        np.testing.assert_array_equal(s["coord"], room.coord)
        np.testing.assert_allclose(s["color"], room.color / 255.0, atol=1e-7)
        assert s["label"].dtype == np.int64 and s["instance"].dtype == np.int64
        np.testing.assert_array_equal(s["label"], expected_label20(room))
        np.testing.assert_array_equal(s["instance"], room.vertex_object)
        np.testing.assert_allclose(np.linalg.norm(s["normal"], axis=1), 1.0, atol=1e-6)
        np.testing.assert_array_equal(s["feat"], np.concatenate([s["color"], s["normal"]], axis=1))
    assert ds.num_points().tolist() == [len(syn.room_for(s, seed=1).coord) for s in ds.scenes]


def test_scannet200_labels_and_counts(prepared):
    _, out = prepared
    ds = ScanNetDataset(out, "train", label_set="scannet200")
    assert ds.num_classes == 200
    tsv_id = {row.split("\t")[1]: int(row.split("\t")[0]) for row in syn.TSV_ROWS}
    valid200 = list(prep.class_set("scannet200").source_ids)
    total = np.zeros(200, np.int64)
    for i, scene in enumerate(ds.scenes):
        room = syn.room_for(scene, seed=1)
        obj_label = [valid200.index(tsv_id[c]) if tsv_id[c] in valid200 else -1 for c in room.objects] + [-1]
        expect = np.array(obj_label)[room.vertex_object]
        got = ds[i]["label"]
        np.testing.assert_array_equal(got, expect)
        total += np.bincount(got[got >= 0], minlength=200)
    assert ds.label_counts().tolist() == total.tolist()
    assert ds.classes[valid200.index(tsv_id["pillow"])] == "pillow"  # pillow: ignored in 20 classes, kept in 200


def test_test_split_has_no_labels_and_axis_align_on_load(prepared, tmp_path):
    raw, out = prepared
    test = ScanNetDataset(out, "test")
    assert (test[0]["label"] == -1).all() and (test[0]["instance"] == -1).all()
    ds = ScanNetDataset(out, "val", axis_align=True)
    room = syn.room_for(ds.scenes[0], seed=1)
    np.testing.assert_allclose(ds[0]["coord"], room.aligned, atol=1e-5)
    aligned_out = tmp_path / "aligned"
    prep.prepare(raw, aligned_out, {"axis_align": True, "splits": "val"}, workers=1, progress=False)
    ref = ScanNetDataset(aligned_out, "val")[0]
    np.testing.assert_allclose(ds[0]["coord"], ref["coord"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(ds[0]["normal"], ref["normal"], atol=1e-6, rtol=0)
    # aligning on load is a no-op for a folder prepared aligned, and for test scenes without a matrix
    np.testing.assert_array_equal(ScanNetDataset(aligned_out, "val", axis_align=True)[0]["coord"], ref["coord"])
    np.testing.assert_array_equal(ScanNetDataset(out, "test", axis_align=True)[0]["coord"], test[0]["coord"])


def test_transforms_collate_loop_pickle_and_dataloader(prepared):
    _, out = prepared
    aug = Compose([RandomRotate(axis="z"), GridSample(grid_size=0.05, mode="train")])
    ds = ScanNetDataset(out, "train", transform=aug, seed=7, loop=2)
    assert len(ds) == 6 and ds[4]["name"] == ds[1]["name"] == "scene0001_00"
    a, b = ds[0], ds[0]
    np.testing.assert_array_equal(a["coord"], b["coord"])  # same (seed, epoch, index): same augmentation
    assert a["feat"].shape == (len(a["coord"]), 6)
    full = ScanNetDataset(out, "train")[0]
    g = ScanNetDataset(out, "train", transform=GridSample(grid_size=0.05, mode="test"))[0]
    # GridSample keeps one vertex per voxel: each kept row is a full-resolution vertex with its own label,
    # and inverse sends every vertex to a kept one in the same voxel
    # (the synthetic mesh has coincident vertices on patch seams, so match coordinate and labels together)
    rows = {(*c, lab, ins) for c, lab, ins in zip(full["coord"].tolist(), full["label"].tolist(),
                                                  full["instance"].tolist(), strict=True)}
    assert all((*c, lab, ins) in rows for c, lab, ins in zip(g["coord"].tolist(), g["label"].tolist(),
                                                             g["instance"].tolist(), strict=True))
    assert len(g["coord"]) < len(full["coord"]) and g["inverse"].shape == (len(full["coord"]),)
    assert np.abs(g["coord"][g["inverse"]] - full["coord"]).max() < 0.05 * np.sqrt(3)
    batch = collate([ds[0], ds[1]])
    assert batch.offset.tolist() == [len(ds[0]["coord"]), len(ds[0]["coord"]) + len(ds[1]["coord"])]
    assert batch.label.shape == (batch.coord.shape[0],) and batch.instance.dtype == torch.long
    plain = ScanNetDataset(out, "train")
    plain[0]  # opens a shard handle; pickling must drop it and re-open lazily
    again = pickle.loads(pickle.dumps(plain))
    np.testing.assert_array_equal(again[2]["coord"], plain[2]["coord"])
    loader = torch.utils.data.DataLoader(plain, batch_size=2, num_workers=0, collate_fn=collate)
    batches = list(loader)
    assert [b.offset.numel() for b in batches] == [2, 1]
    assert sum(b.coord.shape[0] for b in batches) == int(plain.num_points().sum())


def test_bad_arguments_name_the_fix(prepared, tmp_path):
    _, out = prepared
    with pytest.raises(ValueError, match=r"split='testing' not in .*available: \['test', 'train', 'val'\]"):
        ScanNetDataset(out, "testing")
    with pytest.raises(ValueError, match=r"label_set='nyu40' is unknown; use one of \['scannet20', 'scannet200'\]"):
        ScanNetDataset(out, "train", label_set="nyu40")
    with pytest.raises(PrepError, match=r"manifest.json missing"):
        ScanNetDataset(tmp_path, "train")
    with pytest.raises(IndexError, match=r"index 3 out of range for 3 samples"):
        ScanNetDataset(out, "train")[3]


def test_real_scene(shared_data, tmp_path):
    raw = shared_data / "scannet"
    prep.prepare(raw, tmp_path, {"scenes": "scene0000_00"}, workers=1, progress=False)
    ds = ScanNetDataset(tmp_path, "train", axis_align=True)
    s = ds[0]
    ref = np.load(raw / "preprocessed" / "votenet_mmdet3d_npy" / "scene0000_00_vert_all.npy")
    assert s["coord"].shape == (81369, 3)
    np.testing.assert_allclose(s["coord"], ref[:, :3], atol=1e-6)
    np.testing.assert_allclose(s["color"] * 255.0, ref[:, 3:], atol=1e-4)
    counts = np.bincount(s["label"][s["label"] >= 0], minlength=20)
    assert ds.label_counts().tolist() == counts.tolist() and counts[0] > 0
