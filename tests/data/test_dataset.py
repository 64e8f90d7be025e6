"""Datasets over prepared folders and collation into PointBatch."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data_prep import modelnet as prep_mn
from data_prep import scanobjectnn as prep_so
from data_prep import synthetic_objects as S
from data_prep.common import PrepError, RaggedH5Reader, parse_options, read_manifest
from pcbench.data import ModelNetDataset, PreparedDataset, ScanObjectNNDataset, collate, seed_worker
from pcbench.data import transforms as T
from pcbench.ops import PointBatch


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, Path]:
    raw = tmp_path_factory.mktemp("raw")
    S.write_modelnet_normal_resampled(raw, train=3, test=1, seed=0, points=600)
    S.write_scanobjectnn(raw / "so", train=2, test=1, seed=0, variants=("PB_T50_RS",))
    out = tmp_path_factory.mktemp("prepared")
    rep = prep_mn.prepare(raw, out / "mn", parse_options(prep_mn.OPTIONS, {"points": 0, "shard_size": 4}), 1)
    assert rep.ok
    rep = prep_so.prepare(raw / "so", out / "so", parse_options(prep_so.OPTIONS, {}), 1)
    assert rep.ok
    return {"mn": out / "mn", "so": out / "so"}


def test_modelnet_dataset_reads_the_stored_arrays(prepared):
    ds = ModelNetDataset(prepared["mn"], "train")
    m = read_manifest(prepared["mn"])
    assert len(ds) == 15 and ds.num_classes == 40 and ds.classes == m["classes"]
    names, stored = [], []
    for f in m["splits"]["train"]["files"]:  # 4 shards of <= 4 objects: index crosses shard borders
        r = RaggedH5Reader(prepared["mn"] / f["path"])
        names += r.names
        stored += [r[i] for i in range(len(r))]
    for i in range(len(ds)):
        s = ds[i]
        assert s["name"] == names[i]
        np.testing.assert_array_equal(s["coord"], stored[i]["coord"])
        np.testing.assert_array_equal(s["feat"], np.concatenate([stored[i]["coord"], stored[i]["normal"]], 1))
        assert int(s["label"]) == int(stored[i]["label"])
        assert ds.classes[int(s["label"])] == s["name"].rsplit("_", 1)[0]
    assert ds[-1]["name"] == names[-1]
    with pytest.raises(IndexError, match="out of range for 15 samples"):
        ds[15]
    assert ModelNetDataset(prepared["mn"], "test", use_normals=False)[0]["feat"].shape == (600, 3)
    labels = ds.labels()
    assert labels.tolist() == [int(s["label"]) for s in stored]
    assert np.bincount(labels, minlength=40).tolist() == [m["label_stats"]["train"][c] for c in m["classes"]]


def test_init_reads_no_shard_and_pickles_without_handles(prepared, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(prepared["mn"], root)
    shard = root / "train/shard_00000.h5"
    shard.rename(shard.with_suffix(".bak"))
    ds = ModelNetDataset(root, "train")  # no shard is opened here
    assert len(ds) == 15
    assert ds[5]["coord"].shape == (600, 3)  # other shards still work
    with pytest.raises(PrepError, match="shard_00000.h5: prepared shard not found"):
        ds[0]
    shard.with_suffix(".bak").rename(shard)
    ds[0]
    assert any(r is not None for r in ds._readers)
    clone = pickle.loads(pickle.dumps(ds))
    assert all(r is None for r in clone._readers)
    np.testing.assert_array_equal(clone[3]["coord"], ds[3]["coord"])


def test_bad_roots_and_splits(prepared, tmp_path):
    with pytest.raises(ValueError, match=r"holds a prepared 'scanobjectnn' dataset.*reads \['modelnet40', 'modelnet10'\]"):
        ModelNetDataset(prepared["so"], "train")
    with pytest.raises(ValueError, match=r"split='val' not in .*available: \['test', 'train'\]"):
        ModelNetDataset(prepared["mn"], "val")
    with pytest.raises(PrepError, match="manifest.json missing"):
        ModelNetDataset(tmp_path, "train")
    import shutil

    root = tmp_path / "old"
    shutil.copytree(prepared["mn"], root)
    m = json.loads((root / "manifest.json").read_text())
    m["format_version"] = 0
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PrepError, match="re-prepare with: pcbench-prep modelnet40"):
        ModelNetDataset(root, "train")


def test_transforms_are_reproducible_per_seed_and_epoch(prepared):
    t = T.Compose([T.FixedPoints(128, "random"), T.RandomRotate("so3"), T.RandomJitter()])
    a = ModelNetDataset(prepared["mn"], "train", transform=t, seed=1)
    b = ModelNetDataset(prepared["mn"], "train", transform=t, seed=1)
    c = ModelNetDataset(prepared["mn"], "train", transform=t, seed=2)
    np.testing.assert_array_equal(a[4]["coord"], b[4]["coord"])
    np.testing.assert_array_equal(a[4]["coord"], a[4]["coord"])
    assert not np.array_equal(a[4]["coord"], c[4]["coord"])
    e0 = a[4]["coord"]
    a.set_epoch(1)
    assert not np.array_equal(a[4]["coord"], e0)
    a.set_epoch(0)
    np.testing.assert_array_equal(a[4]["coord"], e0)
    assert a[4]["feat"].shape == (128, 6)


def test_dataloader_workers_give_identical_batches(prepared):
    t = T.Compose([T.FixedPoints(64, "random"), T.RandomScale((0.8, 1.2)), T.RandomDropout(0.3)])
    ds = ModelNetDataset(prepared["mn"], "train", transform=t, seed=3)

    def batches(workers):
        dl = DataLoader(ds, batch_size=4, shuffle=False, num_workers=workers, collate_fn=collate,
                        worker_init_fn=seed_worker if workers else None)
        return list(dl)

    single, multi = batches(0), batches(2)
    assert len(single) == len(multi) == 4
    for x, y in zip(single, multi, strict=True):
        assert isinstance(x, PointBatch)
        for f in ("coord", "feat", "offset", "label"):
            torch.testing.assert_close(getattr(x, f), getattr(y, f), rtol=0, atol=0)
    assert single[0].label.shape == (4,) and single[-1].label.shape == (3,)


def test_scanobjectnn_dataset_and_background(prepared):
    ds = ScanObjectNNDataset(prepared["so"], "train")
    with_bg = ds[0]
    assert with_bg["coord"].shape == (2048, 3) and set(np.unique(with_bg["mask"])) == {0, 1}
    assert with_bg["feat"].shape == (2048, 3)
    fg = ScanObjectNNDataset(prepared["so"], "train", drop_background=True)[0]
    assert len(fg["coord"]) == int(with_bg["mask"].sum()) and np.all(fg["mask"] == 1)
    np.testing.assert_array_equal(fg["coord"], with_bg["coord"][with_bg["mask"] == 1])
    b = collate([ds[i] for i in range(len(ds))])
    assert b.label.tolist() == [int(ds[i]["label"]) for i in range(len(ds))]
    assert ds.classes[b.label[0]] in S.SCANOBJECTNN_CLASS_OF.values()


# ------------------------------------------------------------------------------------------- collate
def _obj(n, c, label):
    return {"coord": np.random.default_rng(n).normal(size=(n, 3)).astype(np.float32),
            "feat": np.ones((n, c), np.float32) * n, "label": np.array(label)}


def test_collate_classification_offsets_and_empty_clouds():
    b = collate([_obj(5, 4, 1), _obj(0, 4, 2), _obj(3, 4, 0)])
    assert b.offset.tolist() == [5, 5, 8] and b.label.tolist() == [1, 2, 0]
    assert b.coord.dtype == torch.float32 and b.feat.shape == (8, 4) and b.lengths().tolist() == [5, 0, 3]
    assert b.batch_index().tolist() == [0] * 5 + [2] * 3


def test_collate_segmentation_with_inverse_maps_predictions_back():
    rng = np.random.default_rng(0)
    samples, full_keys = [], []
    for n in (400, 250):
        c = rng.uniform(0, 2, size=(n, 3)).astype(np.float32)
        s = T.GridSample(0.5, "test")({"coord": c, "label": rng.integers(0, 5, n), "instance": rng.integers(-1, 3, n)},
                                      rng)
        samples.append(T.BuildFeat(("coord",))(s, rng))
        full_keys.append(np.floor(c / 0.5).astype(np.int64))
    b = collate(samples)
    assert b.label.shape == (b.num_points,) and b.instance.shape == (b.num_points,)
    assert b.inverse_offset.tolist() == [400, 650]
    # a per-point "prediction" (the voxel key of each kept point) scattered back to full resolution
    pred = torch.from_numpy(np.concatenate([s["grid_coord"] for s in samples]))
    full = pred[b.inverse]
    np.testing.assert_array_equal(full.numpy(), np.concatenate(full_keys))


def test_collate_accepts_torch_samples_with_per_point_label():
    s = {"coord": torch.zeros(4, 3), "feat": torch.zeros(4, 2), "label": torch.tensor([0, 1, -1, 2])}
    b = collate([s, s])
    assert b.label.tolist() == [0, 1, -1, 2] * 2 and b.offset.tolist() == [4, 8]


@pytest.mark.parametrize("samples,match", [
    ([], "empty list of samples"),
    ([{"coord": np.zeros((2, 3), np.float32)}], "sample 0 has no 'feat'.*BuildFeat"),
    ([_obj(3, 2, 0), _obj(3, 3, 0)], r"sample 1: feat has shape \(3, 3\)"),
    ([_obj(3, 2, 0), {**_obj(3, 2, 0), "label": np.zeros(3)}], "mix label kinds"),
    ([{**_obj(3, 2, 0), "label": np.zeros(2)}], r"per-point label has shape \(2,\), expected \(3,\)"),
    ([{**_obj(3, 2, 0), "feat": np.zeros((2, 2))}], "feat has 2 rows but coord has 3"),
])
def test_collate_bad_inputs(samples, match):
    with pytest.raises(ValueError, match=match):
        collate(samples)


def test_base_class_is_usable_directly(prepared):
    ds = PreparedDataset(prepared["so"], "test", feat_keys=("coord",))
    s = ds[0]
    assert set(s) >= {"coord", "mask", "label", "name", "feat"} and s["coord"].dtype == np.float32


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_collate_names_the_sample_with_non_finite_features(bad):
    samples = [{**_obj(4, 2, 0), "name": f"obj_{i}"} for i in range(3)]
    samples[1]["feat"] = samples[1]["feat"].copy()
    samples[1]["feat"][2, 1] = bad
    with pytest.raises(ValueError, match=r"feat of sample 1 \(obj_1\) contains NaN or inf"):
        collate(samples)
    samples[1]["feat"][2, 1] = 0.0
    samples[2]["coord"] = samples[2]["coord"].copy()
    samples[2]["coord"][0, 0] = bad
    with pytest.raises(ValueError, match=r"coord of sample 2 \(obj_2\)"):
        collate(samples)


def test_empty_feat_keys_give_zero_channels(prepared):
    """xyz-only models (official PointNet++ / PCT without normals) take feat with 0 channels; the model uses coord."""
    for ds in (ModelNetDataset(prepared["mn"], "train", feat_keys=[]), ScanObjectNNDataset(prepared["so"], "train",
                                                                                           feat_keys=[])):
        assert ds.in_channels == 0
        s = ds[0]
        assert s["feat"].shape == (len(s["coord"]), 0) and s["feat"].dtype == np.float32
        b = collate([ds[0], ds[1]])
        assert b.feat.shape == (b.num_points, 0)
    assert ModelNetDataset(prepared["mn"], "train", feat_keys=["normal"]).in_channels == 3
    assert ModelNetDataset(prepared["mn"], "train").in_channels == 6  # None: the use_normals default
