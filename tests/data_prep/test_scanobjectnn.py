"""ScanObjectNN preparer on generated h5 files with the official keys, shapes and dtypes."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from data_prep import scanobjectnn as P
from data_prep import synthetic_objects as S
from data_prep.common import RaggedH5Reader, parse_options, read_manifest, verify_outputs

# file names of the official README (hkust-vgd/scanobjectnn), written out independently of VARIANTS
OFFICIAL = {
    "OBJ_BG": "main_split/{}_objectdataset.h5",
    "OBJ_ONLY": "main_split_nobg/{}_objectdataset.h5",
    "PB_T25": "main_split/{}_objectdataset_augmented25_norot.h5",
    "PB_T25_R": "main_split/{}_objectdataset_augmented25rot.h5",
    "PB_T50_R": "main_split/{}_objectdataset_augmentedrot.h5",
    "PB_T50_RS": "main_split/{}_objectdataset_augmentedrot_scale75.h5",
}


def opts(**kw):
    return parse_options(P.OPTIONS, kw)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sonn")
    S.write_scanobjectnn(root, train=2, test=1, seed=0)
    return root


def rows(out: Path, split: str):
    r = RaggedH5Reader(out / read_manifest(out)["splits"][split]["files"][0]["path"])
    return [r[i] for i in range(len(r))]


def test_generated_files_have_the_official_layout(raw):
    for variant, pattern in OFFICIAL.items():
        for split in ("training", "test"):
            with h5py.File(raw / "h5_files" / pattern.format(split)) as f:
                assert sorted(f.keys()) == ["data", "label", "mask"]
                n = f["data"].shape[0]
                assert f["data"].shape == (n, 2048, 3) and f["data"].dtype == np.float32
                assert f["label"].shape == (n,) and f["mask"].shape == (n, 2048)
                bg = (f["mask"][()] == -1).mean()
                assert (bg == 0) if variant == "OBJ_ONLY" else (0.05 < bg < 0.35)


@pytest.mark.parametrize("variant", list(OFFICIAL))
def test_every_variant_maps_to_its_official_files(raw, tmp_path, variant):
    out = tmp_path / variant
    rep = P.prepare(raw, out, opts(variant=variant), workers=1)
    assert rep.ok and rep.samples == 15
    m = read_manifest(out)
    want = {"h5_files/" + OFFICIAL[variant].format(s) for s in ("training", "test")} | {"shape_names_ext.txt"}
    assert set(m["inputs"]) == want
    assert m["classes"] == P.CLASSES and m["splits"]["train"]["num_samples"] == 10
    for split, fname in (("train", "training"), ("test", "test")):
        with h5py.File(raw / "h5_files" / OFFICIAL[variant].format(fname)) as f:
            data, label, mask = f["data"][()], f["label"][()], f["mask"][()]
        got = rows(out, split)
        assert len(got) == len(data)
        for i, s in enumerate(got):
            np.testing.assert_array_equal(s["coord"], data[i])
            np.testing.assert_array_equal(s["mask"], (mask[i] != -1).astype(np.int8))
            assert int(s["label"]) == label[i]
        assert sum(m["label_stats"][split].values()) == len(data)
    assert verify_outputs(out) == []


def test_real_class_names_file(shared_data):
    names, path = P.class_names(shared_data / "scanobjectnn")
    assert path == (shared_data / "scanobjectnn/shape_names_ext.txt").resolve()
    assert names == P.CLASSES  # the built-in list equals the official file (label = line index)


def test_subsampling_normalisation_and_split_folder(raw, tmp_path):
    S.write_scanobjectnn(tmp_path / "r", train=1, test=1, seed=1, variants=("OBJ_BG",), split="split2")
    out = tmp_path / "o"
    rep = P.prepare(tmp_path / "r", out, opts(variant="OBJ_BG", split="split2", points=256, normalize=True), 1)
    assert rep.ok
    for s in rows(out, "train"):
        assert s["coord"].shape == (256, 3) and s["mask"].shape == (256,)
        assert np.linalg.norm(s["coord"], axis=1).max() == pytest.approx(1.0, abs=1e-6)
    with h5py.File(tmp_path / "r/h5_files/split2/training_objectdataset.h5") as f:
        d0, m0 = f["data"][0].astype(np.float64), f["mask"][0]
    out2 = tmp_path / "o2"
    P.prepare(tmp_path / "r", out2, opts(variant="OBJ_BG", split="split2", points=256, sampling="random"), 1)
    s = rows(out2, "train")[0]
    # random subsampling keeps raw rows (and their mask) unchanged
    idx = [int(np.flatnonzero((d0 == r.astype(np.float64)).all(1))[0]) for r in s["coord"]]
    assert len(set(idx)) == 256
    np.testing.assert_array_equal(s["mask"], (m0[idx] != -1).astype(np.int8))


def _write(path: Path, **arrays):
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f[k] = v


def _good(n=3, p=2048):
    rng = np.random.default_rng(0)
    return dict(data=rng.normal(size=(n, p, 3)).astype(np.float32), label=np.arange(n, dtype=np.int64),
                mask=np.where(rng.random((n, p)) < 0.2, -1, 7).astype(np.int64))


@pytest.mark.parametrize("change,field,msg", [
    (lambda a: a.pop("mask"), "mask", r"key 'mask' missing \(keys: \['data', 'label'\]\)"),
    (lambda a: a.update(data=a["data"][..., :2]), "data", r"shape \(3, 2048, 2\), expected \(N, 2048, 3\)"),
    (lambda a: a.update(mask=a["mask"][:, :100]), "mask", r"shape \(3, 100\), expected \(3, 2048\) like data"),
    (lambda a: a.update(label=a["label"][:2]), "label", r"shape \(2,\), expected \(3,\)"),
    (lambda a: a.update(data=a["data"].astype(np.int32)), "data", "dtype int32, expected float32"),
])
def test_bad_files_name_file_and_field(tmp_path, change, field, msg):
    arrays = _good()
    change(arrays)
    root = tmp_path / "raw"
    _write(root / "h5_files/main_split/training_objectdataset_augmentedrot_scale75.h5", **arrays)
    _write(root / "h5_files/main_split/test_objectdataset_augmentedrot_scale75.h5", **_good())
    problems = P.check(root, opts())
    assert len(problems) == 1 and f"training_objectdataset_augmentedrot_scale75.h5: {field}: " in problems[0]
    assert "Fix:" in problems[0]
    rep = P.prepare(root, tmp_path / "out", opts(), workers=1)
    assert [k for k, _ in rep.failed] == ["train"]
    assert rep.samples == 3  # the test split is still written
    assert read_manifest(tmp_path / "out")["splits"]["test"]["num_samples"] == 3


def test_bad_objects_are_skipped_and_reported(tmp_path):
    arrays = _good(5)
    arrays["data"][1, 10, 2] = np.nan
    arrays["label"][3] = 15  # outside the 15 classes
    root = tmp_path / "raw"
    _write(root / "h5_files/main_split_nobg/training_objectdataset.h5", **arrays)
    _write(root / "h5_files/main_split_nobg/test_objectdataset.h5", **_good(2))
    (tmp_path / "junk").write_bytes(b"not hdf5")
    rep = P.prepare(root, tmp_path / "out", opts(variant="OBJ_ONLY"), workers=1)
    failed = dict(rep.failed)
    assert set(failed) == {"train_00001", "train_00003"}
    assert "training_objectdataset.h5: data: row 1: 1 points have NaN or inf" in failed["train_00001"]
    assert "label: row 3: label 15 outside 0..14" in failed["train_00003"]
    got = rows(tmp_path / "out", "train")
    assert [int(s["label"]) for s in got] == [0, 2, 4]
    # a missing and an unreadable file
    shutil.copy(tmp_path / "junk", root / "h5_files/main_split_nobg/test_objectdataset.h5")
    (root / "h5_files/main_split_nobg/training_objectdataset.h5").unlink()
    problems = P.check(root, opts(variant="OBJ_ONLY"))
    assert any("training_objectdataset.h5: file missing" in p for p in problems)
    assert any("test_objectdataset.h5: not a readable HDF5 file" in p for p in problems)
    rep = P.prepare(root, tmp_path / "out2", opts(variant="OBJ_ONLY"), workers=1)
    assert {k for k, _ in rep.failed} == {"train", "test"} and rep.samples == 0


def test_rerun_skips_finished_splits(raw, tmp_path):
    o = opts(variant="PB_T25")
    assert P.prepare(raw, tmp_path / "o", o, workers=1).done == 2
    rep = P.prepare(raw, tmp_path / "o", o, workers=1)
    assert (rep.done, rep.skipped, rep.samples) == (0, 2, 15)
    assert P.prepare(raw, tmp_path / "o", opts(variant="PB_T25", points=512), workers=1).done == 2


def test_generator_is_deterministic_for_a_seed(tmp_path):
    def load(root):
        with h5py.File(root / "h5_files/main_split/training_objectdataset_augmentedrot.h5") as f:
            return {k: f[k][()] for k in f}

    a, b, c = (S.write_scanobjectnn(tmp_path / x, 1, 1, seed=s, variants=("PB_T50_R",)).parent
               for x, s in (("a", 0), ("b", 0), ("c", 1)))
    da, db, dc = load(a), load(b), load(c)
    for k in da:
        np.testing.assert_array_equal(da[k], db[k])
    assert not np.array_equal(da["data"], dc["data"])
    assert set(np.unique(da["mask"])) == {-1, 1}
    assert (a / "shape_names_ext.txt").read_text().splitlines() == P.CLASSES


# ------------------------------------------------------------------- normals=estimate (issue 8 item 17)
def _sphere(n: int, rng: np.random.Generator, centre: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    d = rng.normal(size=(n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return centre + radius * d, d


def test_estimated_normals_match_an_analytic_sphere_and_point_outwards():
    rng = np.random.default_rng(0)
    centre = np.array([1.0, -2.0, 3.0])
    pts, truth = _sphere(2048, rng, centre, 0.7)
    n = P.estimate_normals(pts, 30)  # centre defaults to the centroid
    np.testing.assert_allclose(np.linalg.norm(n, axis=1), 1.0, atol=1e-9)
    cos = (n * truth).sum(1)
    assert cos.min() > 0.97 and np.median(cos) > 0.995  # outward everywhere, close to the true normal


def test_estimated_normals_match_the_faces_of_a_box():
    rng = np.random.default_rng(1)
    size = np.array([2.0, 1.0, 0.5])
    area = np.array([size[1] * size[2], size[0] * size[2], size[0] * size[1]])
    pts, truth = [], []
    for axis in range(3):
        for side in (0.0, 1.0):
            k = int(4096 * area[axis] / (2 * area.sum()))
            p = rng.random((k, 3)) * size
            p[:, axis] = side * size[axis]
            nrm = np.zeros((k, 3))
            nrm[:, axis] = 1.0 if side else -1.0
            pts.append(p)
            truth.append(nrm)
    pts, truth = np.concatenate(pts), np.concatenate(truth)
    n = P.estimate_normals(pts, 20)
    # away from edges (farther than 0.15 from every other face) the plane fit is exact
    inner = np.ones(len(pts), bool)
    for axis in range(3):
        on_face = np.isclose(pts[:, axis], 0) | np.isclose(pts[:, axis], size[axis])
        inner &= on_face | ((pts[:, axis] > 0.15) & (pts[:, axis] < size[axis] - 0.15))
    assert inner.sum() > 1000
    assert ((n[inner] * truth[inner]).sum(1) > 0.999).all()


def test_normals_estimate_option_is_stored_and_recorded(raw, tmp_path):
    out = tmp_path / "o"
    o = opts(variant="OBJ_ONLY", normals="estimate", points=512, sampling="random")
    assert P.prepare(raw, out, o, workers=1).ok
    m = read_manifest(out)
    assert m["options"]["normals"] == "estimate" and m["options"]["normals_k"] == 30
    assert m["normals"]["neighbourhood"] == {"type": "knn", "k": 30}
    assert "away from the centroid of the object points" in m["normals"]["orientation"]
    assert m["keys"] == ["coord", "mask", "normal", "label"]
    with h5py.File(raw / "h5_files/main_split_nobg/training_objectdataset.h5") as f:
        data, mask = f["data"][()].astype(np.float64), f["mask"][()]
    for i, s in enumerate(rows(out, "train")):
        assert s["normal"].shape == (512, 3) and s["normal"].dtype == np.float32
        ref = P.estimate_normals(data[i], 30, data[i][mask[i] != -1].mean(0))  # on the 2048 released points
        # random subsampling keeps raw rows: find each stored row, compare its normal
        idx = [int(np.flatnonzero((data[i] == r.astype(np.float64)).all(1))[0]) for r in s["coord"]]
        np.testing.assert_allclose(s["normal"], ref[idx], atol=1e-6)
    plain = tmp_path / "plain"
    assert P.prepare(raw, plain, opts(variant="OBJ_ONLY"), workers=1).ok
    assert "normal" not in rows(plain, "train")[0] and read_manifest(plain)["normals"].startswith("none")
    with pytest.raises(Exception, match=r"normals_k=2 is too small"):
        P.prepare(raw, tmp_path / "x", opts(normals="estimate", normals_k=2), workers=1)


def test_dataset_feeds_estimated_normals_like_modelnet(raw, tmp_path):
    from pcbench.data import ScanObjectNNDataset

    out = tmp_path / "o"
    assert P.prepare(raw, out, opts(variant="PB_T25", normals="estimate"), workers=1).ok
    ds = ScanObjectNNDataset(out, "train", use_normals=True, drop_background=True)
    s = ds[0]
    assert s["feat"].shape == (len(s["coord"]), 6) and (s["mask"] == 1).all()
    np.testing.assert_array_equal(s["feat"][:, 3:], s["normal"])
    with pytest.raises(ValueError, match="prepared without normals; re-prepare with normals=estimate"):
        ScanObjectNNDataset(_plain(raw, tmp_path), "train", use_normals=True)


def _plain(raw: Path, tmp_path: Path) -> Path:
    out = tmp_path / "plain"
    assert P.prepare(raw, out, opts(variant="PB_T25"), workers=1).ok
    return out
