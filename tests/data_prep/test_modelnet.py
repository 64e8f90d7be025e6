"""ModelNet40/10 preparer: real samples, every raw source, bad inputs, determinism, kill + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest

from data_prep import modelnet as M
from data_prep import synthetic_objects as S
from data_prep.common import (
    DoneLog,
    PrepError,
    RaggedH5Reader,
    parse_options,
    read_manifest,
    sha256_file,
    verify_outputs,
)

REPO = Path(__file__).resolve().parents[2]
REAL_TRAIN = ["airplane_0126", "bed_0026", "chair_0391", "guitar_0084", "sofa_0034", "table_0053"]
REAL_TEST = ["airplane_0703", "chair_0962", "monitor_0468", "toilet_0409"]


def opts(**kw):
    return parse_options(M.OPTIONS, kw)


def read_split(out: Path, split: str) -> list[tuple[str, dict[str, np.ndarray]]]:
    m = read_manifest(out)
    rows = []
    for f in m["splits"][split]["files"]:
        r = RaggedH5Reader(out / f["path"])
        rows += [(r.names[i], r[i]) for i in range(len(r))]
    return rows


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth_objects")
    S.write_modelnet_off(root / "off", train=2, test=1, seed=3, num_classes=40)
    S.write_modelnet_off(root / "off", train=2, test=1, seed=3, num_classes=10)
    S.write_modelnet_normal_resampled(root, train=2, test=1, seed=3, points=3000)
    S.write_modelnet_ply_hdf5(root, train=2, test=1, seed=3)
    return root


# ------------------------------------------------------------------------------------ real samples
def test_real_normal_resampled_all_samples(shared_data, tmp_path):
    raw = shared_data / "modelnet40"
    out = tmp_path / "mn40"
    rep = M.prepare(raw, out, opts(allow_missing=True, sampling="random", normalize=False), workers=1)
    assert rep.ok and rep.samples == 10 and len(rep.missing) == 9843 + 2468 - 10
    m = read_manifest(out)
    classes = [ln.strip() for ln in (raw / "modelnet40_normal_resampled/modelnet40_shape_names.txt").open()]
    assert m["classes"] == classes and m["source"] == "normal_resampled"
    for split, want in (("train", REAL_TRAIN), ("test", REAL_TEST)):
        rows = read_split(out, split)
        assert sorted(n for n, _ in rows) == want
        for name, s in rows:
            cls = name.rsplit("_", 1)[0]
            assert int(s["label"]) == classes.index(cls)
            assert s["coord"].shape == (1024, 3) and s["coord"].dtype == np.float32
            np.testing.assert_allclose(np.linalg.norm(s["normal"], axis=1), 1.0, atol=1e-6)
            # random subsampling keeps original rows: every prepared row is a row of the raw file
            src = np.loadtxt(raw / f"modelnet40_normal_resampled/{cls}/{name}.txt", delimiter=",")
            # (as a multiset: sampling without replacement never repeats a raw row more often than it occurs)
            have = Counter(tuple(r) for r in np.round(src[:, :3].astype(np.float32), 5))
            got = Counter(tuple(r) for r in np.round(s["coord"], 5))
            assert all(have[k] >= c for k, c in got.items())
        assert m["label_stats"][split] == {c: sum(n.rsplit("_", 1)[0] == c for n in want) for c in classes}
    # the recorded input hashes are those of the real release (values from the sample README)
    assert m["inputs"]["modelnet40_normal_resampled/airplane/airplane_0126.txt"].startswith("2038f599e0b365d5")
    assert m["inputs"]["modelnet40_normal_resampled/toilet/toilet_0409.txt"].startswith("32153281722997")
    assert verify_outputs(out) == []
    assert {k: sha256_file(out / k) for k in m["outputs"]} == m["outputs"]


def test_real_missing_listed_files_fail_but_present_ones_are_written(shared_data, tmp_path):
    out = tmp_path / "mn40"
    rep = M.prepare(shared_data / "modelnet40", out, opts(sampling="random", points=64), workers=1)
    assert not rep.ok and len(rep.failed) == 9843 + 2468 - 10 and rep.samples == 10
    assert any("airplane_0001.txt" in msg and "allow_missing=true" in msg for _, msg in rep.failed)
    assert read_manifest(out)["splits"]["train"]["num_samples"] == 6


def test_real_fps_selects_farthest_points(shared_data, tmp_path):
    out = tmp_path / "fps"
    rep = M.prepare(shared_data / "modelnet40", out,
                    opts(allow_missing=True, points=128, sampling="fps", normalize=False, normals=False), workers=1)
    assert rep.ok
    name, s = read_split(out, "test")[2]
    cls = name.rsplit("_", 1)[0]
    src = np.loadtxt(shared_data / f"modelnet40/modelnet40_normal_resampled/{cls}/{name}.txt", delimiter=",")[:, :3]
    sel = s["coord"].astype(np.float64)
    # independent check of the FPS property: pick k is the raw point farthest from picks 0..k-1
    mind = ((src - sel[0]) ** 2).sum(1)
    for k in range(1, len(sel)):
        far = mind.max()
        got = ((sel[k] - sel[:k]) ** 2).sum(1).min()
        assert got == pytest.approx(far, rel=1e-5, abs=1e-9)
        mind = np.minimum(mind, ((src - sel[k]) ** 2).sum(1))
    assert "normal" not in s


def test_real_off_bathtubs_points_on_surface_with_face_normals(shared_data, tmp_path):
    import open3d as o3d

    raw = shared_data / "modelnet10"
    out = tmp_path / "mn10"
    rep = M.prepare(raw, out, opts(num_classes=10, allow_missing=True, points=0, surface_points=2000,
                                   normalize=False), workers=1)
    assert rep.ok and rep.samples == 3 and rep.missing and all("bathtub/train" not in m for m in rep.missing)
    m = read_manifest(out)
    assert m["classes"] == M.MODELNET10_CLASSES and m["source"] == "off"
    rows = read_split(out, "train")
    assert [n for n, _ in rows] == ["bathtub_0001", "bathtub_0002", "bathtub_0004"]
    for name, s in rows:
        assert int(s["label"]) == M.MODELNET10_CLASSES.index("bathtub") and s["coord"].shape == (2000, 3)
        verts, faces = M.read_off(raw / f"ModelNet10/bathtub/train/{name}.off")
        scene = o3d.t.geometry.RaycastingScene()
        scene.add_triangles(o3d.core.Tensor(verts.astype(np.float32)), o3d.core.Tensor(faces.astype(np.uint32)))
        q = o3d.core.Tensor(s["coord"])
        dist = scene.compute_distance(q).numpy()
        extent = np.ptp(verts, 0).max()
        assert dist.max() < 1e-4 * extent  # every point lies on the mesh (open3d as reference)
        nrm = s["normal"]
        np.testing.assert_allclose(np.linalg.norm(nrm, axis=1), 1.0, atol=1e-6)
        # the stored normal is the normal of the triangle the point lies on (coplanar faces may swap)
        ref = scene.compute_closest_points(q)["primitive_normals"].numpy()
        assert np.mean(np.abs((nrm * ref).sum(1)) > 0.999) > 0.97


def test_surface_sampling_is_area_weighted_and_deterministic():
    verts = np.array([[0, 0, 0], [1, 0, 0], [0, 2, 0], [0, 0, 0], [3, 0, 0], [0, 0, 2]], dtype=np.float64)
    faces = np.array([[0, 1, 2], [3, 4, 5], [0, 0, 1]])  # areas 1, 3, 0 (degenerate)
    pts, nrm = M.sample_surface(verts, faces, 200_000, np.random.default_rng(0))
    on_first = np.abs(pts[:, 2]) < 1e-12
    on_second = np.abs(pts[:, 1]) < 1e-12
    assert np.all(on_first | on_second)
    assert on_first.mean() == pytest.approx(0.25, abs=0.005)
    np.testing.assert_allclose(nrm[on_first & ~on_second], [[0, 0, 1]] * int((on_first & ~on_second).sum()))
    np.testing.assert_allclose(nrm[on_second & ~on_first], [[0, -1, 0]] * int((on_second & ~on_first).sum()))
    # uniform inside the triangle: the mean of uniform points is the centroid
    np.testing.assert_allclose(pts[on_first & ~on_second].mean(0), [1 / 3, 2 / 3, 0], atol=0.01)
    again, _ = M.sample_surface(verts, faces, 1000, np.random.default_rng(7))
    np.testing.assert_array_equal(again, M.sample_surface(verts, faces, 1000, np.random.default_rng(7))[0])
    with pytest.raises(ValueError, match="zero surface area"):
        M.sample_surface(verts, faces[2:], 10, np.random.default_rng(0))


# -------------------------------------------------------------------------------------- OFF reader
BOX = "8 6 0\n" + "".join(f"{x} {y} {z}\n" for x in (0, 1) for y in (0, 1) for z in (0, 1)) + \
    "4 0 1 3 2\n4 4 6 7 5\n4 0 4 5 1\n4 2 3 7 6\n4 0 2 6 4\n4 1 5 7 3\n"


def test_read_off_glued_header_equals_clean_header(tmp_path):
    (tmp_path / "clean.off").write_text("OFF\n" + BOX)
    (tmp_path / "glued.off").write_text("OFF" + BOX)
    (tmp_path / "comment.off").write_text("# exported\nOFF\n\n" + BOX.replace("\n", "  # c\n", 1))
    v0, f0 = M.read_off(tmp_path / "clean.off")
    assert v0.shape == (8, 3) and f0.shape == (12, 3)  # 6 quads fan-triangulated
    for name in ("glued.off", "comment.off"):
        v, f = M.read_off(tmp_path / name)
        np.testing.assert_array_equal(v, v0)
        np.testing.assert_array_equal(f, f0)
    # fan triangulation preserves the total area of the unit cube (6)
    a, b, c = v0[f0[:, 0]], v0[f0[:, 1]], v0[f0[:, 2]]
    assert 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1).sum() == pytest.approx(6.0)


@pytest.mark.parametrize("text,field,msg", [
    ("ply\nformat ascii 1.0\n", "header", "first line is 'ply', expected 'OFF'"),
    ("OFF\n0 0 0\n", "counts", "empty mesh"),
    ("OFF\n3 1 0\n0 0 0\n1 0 0\n", "counts", "truncated"),
    ("OFF\n3 1 0\n0 0 0\n1 0 nan\n0 1 0\n3 0 1 2\n", "vertices", "NaN or inf"),
    ("OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 5\n", "faces", "face indices span 0..5 but there are 3 vertices"),
    ("OFF\n3 1 0\n0 0 0\n1 0\n0 1 0\n3 0 1 2\n", "vertices", "vertex 1 has 2 values"),
    ("OFF\n3 1 0\n0 0 0\n1 0 x\n0 1 0\n3 0 1 2\n", "vertices", "unreadable vertex value"),
    ("OFF\nthree 1 0\n", "counts", "is not 'V F"),
    ("", "header", "empty file"),
])
def test_read_off_bad_inputs_name_file_and_field(tmp_path, text, field, msg):
    p = tmp_path / "bad.off"
    p.write_text(text)
    with pytest.raises(PrepError, match=rf"bad\.off: {field}: .*{msg}") as exc:
        M.read_off(p)
    assert exc.value.field == field and exc.value.fix


@pytest.mark.parametrize("text,msg", [
    ("", "file is empty"),
    ("0.1,0.2,0.3,0,0,1\n0.1,0.2,0.3,0,1\n", "line 2 has 5 comma-separated values"),
    ("0.1,0.2,0.3,0,0,1\n0.1,abc,0.3,0,0,1\n", "unreadable number"),
])
def test_read_normal_txt_bad_inputs(tmp_path, text, msg):
    p = tmp_path / "a_0001.txt"
    p.write_text(text)
    with pytest.raises(PrepError, match=rf"a_0001\.txt: rows: {msg}"):
        M.read_normal_txt(p)


# --------------------------------------------------------------------------------- synthetic sources
def test_synthetic_off_all_classes_labels_and_normals(synth, tmp_path):
    for nc in (40, 10):
        out = tmp_path / f"off{nc}"
        rep = M.prepare(synth / "off", out, opts(num_classes=nc, allow_missing=True, points=200, sampling="random",
                                                 surface_points=800), workers=1)
        assert rep.ok and rep.samples == 15
        m = read_manifest(out)
        classes = m["classes"]
        assert len(classes) == nc and m["splits"]["train"]["num_samples"] == 10
        for split, per in (("train", 2), ("test", 1)):
            rows = read_split(out, split)
            for name, s in rows:
                assert classes[int(s["label"])] == name.rsplit("_", 1)[0]
                assert s["coord"].shape == (200, 3)
                r = np.linalg.norm(s["coord"], axis=1)
                assert r.max() == pytest.approx(1.0, abs=1e-6)  # normalised into the unit sphere
                np.testing.assert_allclose(s["coord"].mean(0), 0, atol=1e-6)
                np.testing.assert_allclose(np.linalg.norm(s["normal"], axis=1), 1, atol=1e-6)
            assert sorted(m["label_stats"][split][c] for c in S.MODELNET_CLASS_OF.values()) == [per] * 5
        assert verify_outputs(out) == []


def test_synthetic_sphere_normals_point_outward(synth, tmp_path):
    out = tmp_path / "sph"
    M.prepare(synth / "off", out, opts(allow_missing=True, points=0, surface_points=500, normalize=False), workers=1)
    for name, s in read_split(out, "train"):
        if not name.startswith("bathtub"):  # bathtub = sphere in the synthetic set
            continue
        verts, _ = M.read_off(synth / f"off/ModelNet40/bathtub/train/{name}.off")
        c = verts.mean(0)
        radial = s["coord"] - c
        cos = (radial * s["normal"]).sum(1) / np.linalg.norm(radial, axis=1)
        assert cos.min() > 0.5 and np.median(cos) > 0.95  # faceted, stretched sphere: outward normals


def test_synthetic_normal_resampled_and_modelnet10_lists(synth, tmp_path):
    out = tmp_path / "nr10"
    rep = M.prepare(synth, out, opts(num_classes=10, source="normal_resampled", points=0), workers=1)
    assert rep.ok and rep.samples == 15 and not rep.missing
    rows = read_split(out, "test")
    assert len(rows) == 5 and all(s["coord"].shape == (3000, 3) for _, s in rows)
    for name, s in rows:
        assert M.MODELNET10_CLASSES[int(s["label"])] == name.rsplit("_", 1)[0]


def test_synthetic_ply_hdf5_labels_names_and_modelnet10_relabel(synth, tmp_path):
    with h5py.File(synth / "modelnet40_ply_hdf5_2048/ply_data_train0.h5") as f:
        raw_data, raw_label = f["data"][()], f["label"][()].ravel()
    for nc, classes in ((40, M.MODELNET40_CLASSES), (10, M.MODELNET10_CLASSES)):
        out = tmp_path / f"ply{nc}"
        rep = M.prepare(synth, out, opts(num_classes=nc, source="ply_hdf5_2048", points=0, normalize=False),
                        workers=1)
        assert rep.ok and rep.samples == 15
        rows = read_split(out, "train")
        assert len(rows) == 10
        for i, (name, s) in enumerate(rows):
            assert name == json.loads((synth / "modelnet40_ply_hdf5_2048/ply_data_train_0_id2file.json")
                                      .read_text())[i].split("/")[1][:-4]
            assert classes[int(s["label"])] == M.MODELNET40_CLASSES[raw_label[i]] == name.rsplit("_", 1)[0]
            np.testing.assert_array_equal(s["coord"], raw_data[i])


def test_ply_hdf5_bad_keys_and_shapes(synth, tmp_path):
    raw = tmp_path / "raw"
    d = raw / "modelnet40_ply_hdf5_2048"
    d.mkdir(parents=True)
    with h5py.File(d / "ply_data_train0.h5", "w") as f:
        f["data"] = np.zeros((2, 16, 3), np.float32)
        f["label"] = np.zeros((2, 1), np.uint8)
    with h5py.File(d / "ply_data_test0.h5", "w") as f:
        f["data"] = np.zeros((2, 16, 2), np.float32)
        f["label"] = np.zeros((2, 1), np.uint8)
        f["normal"] = np.zeros((2, 16, 2), np.float32)
    problems = M.check(raw, opts())
    assert any("ply_data_train0.h5: normal: key 'normal' missing" in p and "normals=false" in p for p in problems)
    assert any("ply_data_test0.h5: data: shape (2, 16, 2), expected (N, P, 3)" in p for p in problems)
    rep = M.prepare(raw, tmp_path / "out", opts(), workers=1)
    assert {k for k, _ in rep.failed} == {"train/00000", "test/00000"}


def test_bad_samples_are_reported_and_the_others_written(synth, tmp_path):
    import shutil

    raw = tmp_path / "raw"
    shutil.copytree(synth / "modelnet40_normal_resampled", raw / "modelnet40_normal_resampled")
    base = raw / "modelnet40_normal_resampled"
    rows = (base / "dresser/dresser_0001.txt").read_text().splitlines()
    rows[5] = "nan,0,0,0,0,1"
    (base / "dresser/dresser_0001.txt").write_text("\n".join(rows))
    (base / "table/table_0002.txt").write_text("0,0,0,0,0,0\n" * 10)  # zero normals
    (base / "chair/chair_0001.txt").write_text("")
    rep = M.prepare(raw, tmp_path / "out", opts(points=64, sampling="random"), workers=1)
    failed = dict(rep.failed)
    assert set(failed) == {"dresser_0001", "table_0002", "chair_0001"}
    assert "dresser_0001.txt: coord: 1 points have NaN or inf" in failed["dresser_0001"]
    assert "table_0002.txt: normal: 10 normals are zero" in failed["table_0002"]
    assert "chair_0001.txt: rows: file is empty" in failed["chair_0001"]
    assert rep.samples == 12
    m = read_manifest(tmp_path / "out")
    assert m["splits"]["train"]["num_samples"] + m["splits"]["test"]["num_samples"] == 12
    assert len(m["validation"]["failed"]) == 3
    # rerun: unchanged inputs -> everything skipped, the same failures reported again
    rep2 = M.prepare(raw, tmp_path / "out", opts(points=64, sampling="random"), workers=1)
    assert rep2.skipped == 2 and rep2.done == 0 and set(dict(rep2.failed)) == set(failed)


def test_unrecognised_raw_and_bad_options(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepError, match=r"empty: raw: no ModelNet40 source recognised.*Fix: point raw="):
        M.prepare(tmp_path / "empty", tmp_path / "out", opts(), workers=1)
    assert "no ModelNet40 source recognised" in M.check(tmp_path / "empty", opts())[0]
    with pytest.raises(PrepError, match="folder not found"):
        M.prepare(tmp_path / "nope", tmp_path / "out", opts(), workers=1)
    with pytest.raises(PrepError, match=r"shard_size=0 is out of range"):
        M.prepare(tmp_path / "empty", tmp_path / "out", opts(shard_size=0), workers=1)


def test_deterministic_for_a_seed_and_workers(synth, tmp_path):
    o = dict(allow_missing=True, points=24, sampling="random", surface_points=300, shard_size=4)
    M.prepare(synth / "off", tmp_path / "a", opts(**o), workers=1)
    M.prepare(synth / "off", tmp_path / "b", opts(**o), workers=2)  # other processes, other order
    M.prepare(synth / "off", tmp_path / "c", opts(**o, seed=1), workers=1)
    o["sampling"] = "fps"
    M.prepare(synth / "off", tmp_path / "d", opts(**o), workers=1)
    M.prepare(synth / "off", tmp_path / "e", opts(**o), workers=1)
    a, b, c, d, e = (read_split(tmp_path / x, "train") for x in "abcde")
    assert [n for n, _ in a] == [n for n, _ in b]
    for (_, sa), (_, sb), (_, sc), (_, sd), (_, se) in zip(a, b, c, d, e, strict=True):
        np.testing.assert_array_equal(sa["coord"], sb["coord"])
        np.testing.assert_array_equal(sa["normal"], sb["normal"])
        np.testing.assert_array_equal(sd["coord"], se["coord"])
        assert not np.array_equal(sa["coord"], sc["coord"])
        assert not np.array_equal(sa["coord"], sd["coord"])
    assert read_manifest(tmp_path / "a")["outputs"].keys() == read_manifest(tmp_path / "b")["outputs"].keys()


# ------------------------------------------------------------------------------- kill and resume
def _fingerprint(out: Path) -> dict[str, list]:
    res = {}
    for split in ("train", "test"):
        res[split] = [(n, s["coord"].tolist(), int(s["label"])) for n, s in read_split(out, split)]
    return res


def test_injected_interrupt_then_resume(synth, tmp_path, monkeypatch):
    o = opts(points=32, sampling="random", shard_size=3)
    ref = tmp_path / "ref"
    M.prepare(synth, ref, o, workers=1)
    out = tmp_path / "out"
    calls = {"n": 0}
    real = M.read_normal_txt

    def flaky(path):
        calls["n"] += 1
        if calls["n"] == 8:  # third shard, second object
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(M, "read_normal_txt", flaky)
    with pytest.raises(KeyboardInterrupt):
        M.prepare(synth, out, o, workers=1)
    monkeypatch.setattr(M, "read_normal_txt", real)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert not any(".pcbench-tmp-" in f for f in files)  # the interrupted shard left no temp file
    assert [f for f in files if f.endswith(".h5")] == ["train/shard_00000.h5", "train/shard_00001.h5"]
    with pytest.raises(PrepError, match=r"status: a preparation .* did not finish.*finish it with: pcbench-prep "
                                        r"modelnet40 raw=.* points=32 sampling=random shard_size=3"):
        read_manifest(out)  # the half-written folder is refused, with the command that finishes it
    rep = M.prepare(synth, out, o, workers=1)
    assert rep.skipped == 2 and rep.done == 4  # 10 train -> 4 shards, 5 test -> 2 shards; 2 were finished
    assert _fingerprint(out) == _fingerprint(ref)


def test_hard_kill_then_resume(synth, tmp_path):
    o = dict(points=32, sampling="fps", shard_size=1, surface_points=3000)
    out = tmp_path / "out"
    # each unit is slowed down in the child so that the kill lands mid-run on any machine speed
    script = (f"import sys, time; sys.path.insert(0, {str(REPO)!r})\n"
              "from data_prep import modelnet as M\nfrom data_prep.common import parse_options\n"
              "real = M.process_job\n"
              "def slow(job, raw, options):\n    time.sleep(0.15)\n    return real(job, raw, options)\n"
              "M.process_job = slow\n"
              f"M.prepare(__import__('pathlib').Path({str(synth)!r}), __import__('pathlib').Path({str(out)!r}), "
              f"parse_options(M.OPTIONS, {o!r}), workers=1)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    done_dir = out / ".done"
    t0 = time.time()
    while time.time() - t0 < 60:
        if done_dir.is_dir() and len(list(done_dir.glob("*.json"))) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with pytest.raises(PrepError, match="did not finish.*finish it with: pcbench-prep modelnet40"):
        read_manifest(out)
    n_done = len(list(done_dir.glob("*.json")))
    assert 3 <= n_done < 15
    for p in out.rglob("*.h5"):  # every shard that exists is complete
        assert len(RaggedH5Reader(p)) == 1
    rep = M.prepare(synth, out, parse_options(M.OPTIONS, o), workers=1)
    assert rep.ok and rep.skipped == n_done and rep.done == 15 - n_done
    assert not list(out.rglob(".pcbench-tmp-*"))
    ref = tmp_path / "ref"
    M.prepare(synth, ref, parse_options(M.OPTIONS, o), workers=1)
    assert _fingerprint(out) == _fingerprint(ref)
    assert verify_outputs(out) == []


def test_changed_input_or_option_redoes_only_affected_units(synth, tmp_path):
    import shutil

    raw = tmp_path / "raw"
    shutil.copytree(synth / "modelnet40_normal_resampled", raw / "modelnet40_normal_resampled")
    o = opts(points=32, sampling="random", shard_size=5)
    out = tmp_path / "out"
    assert M.prepare(raw, out, o, workers=1).done == 3
    f = raw / "modelnet40_normal_resampled/torus_dummy.txt"
    f.write_text("")  # unrelated file: nothing redone
    assert M.prepare(raw, out, o, workers=1).skipped == 3
    p = raw / "modelnet40_normal_resampled/dresser/dresser_0003.txt"  # a test object
    p.write_text(p.read_text().replace("0", "1", 1))
    rep = M.prepare(raw, out, o, workers=1)
    assert (rep.done, rep.skipped) == (1, 2)
    rep = M.prepare(raw, out, opts(points=16, sampling="random", shard_size=5), workers=1)
    assert rep.done == 3 and all(s["coord"].shape == (16, 3) for _, s in read_split(out, "train"))
    assert DoneLog(out).dir.is_dir()


@pytest.mark.slow
def test_hard_kill_of_a_parallel_run_then_resume(tmp_path):
    """SIGKILL the parent of a 2-worker run: its workers die with it, no half shard, the re-run finishes."""
    synth = S.write_modelnet_off(tmp_path / "raw", train=10, test=2, seed=0).parent  # 60 units
    o = dict(points=32, sampling="fps", shard_size=1, surface_points=20000, allow_missing=True)
    out = tmp_path / "out"
    script = (f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
              "from pathlib import Path\nfrom data_prep import modelnet as M\nfrom data_prep.common import parse_options\n"
              f"M.prepare(Path({str(synth)!r}), Path({str(out)!r}), parse_options(M.OPTIONS, {o!r}), workers=2)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    done_dir = out / ".done"
    t0 = time.time()
    while time.time() - t0 < 120:
        if done_dir.is_dir() and len(list(done_dir.glob("*.json"))) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(1.0)  # PR_SET_PDEATHSIG delivers SIGKILL to the workers
    n_done = len(list(done_dir.glob("*.json")))
    time.sleep(1.0)
    assert len(list(done_dir.glob("*.json"))) == n_done  # nobody is still writing
    assert 2 <= n_done < 60
    for p in out.rglob("*.h5"):
        assert len(RaggedH5Reader(p)) == 1
    rep = M.prepare(synth, out, parse_options(M.OPTIONS, o), workers=2)
    assert rep.ok and rep.skipped == n_done and rep.done == 60 - n_done
    assert not list(out.rglob(".pcbench-tmp-*")) and verify_outputs(out) == []


def test_fast_and_careful_off_paths_agree(tmp_path):
    rng = np.random.default_rng(0)
    v = rng.normal(size=(50, 3))
    f = rng.integers(0, 50, size=(80, 3))
    tri = "OFF\n50 80 0\n" + "".join(f"{a:.6f} {b:.6f} {c:.6f}\n" for a, b, c in v) + \
        "".join(f"3 {a} {b} {c}\n" for a, b, c in f)
    (tmp_path / "tri.off").write_text(tri)
    # a trailing colour on one face forces the careful line-by-line path
    (tmp_path / "col.off").write_text(tri.replace(f"3 {f[5][0]} {f[5][1]} {f[5][2]}\n",
                                                  f"3 {f[5][0]} {f[5][1]} {f[5][2]} 255 0 0\n", 1))
    v1, f1 = M.read_off(tmp_path / "tri.off")
    v2, f2 = M.read_off(tmp_path / "col.off")
    np.testing.assert_allclose(v1, v, atol=1e-6)
    np.testing.assert_array_equal(f1, f)
    np.testing.assert_array_equal(v1, v2)
    np.testing.assert_array_equal(f1, f2)


def test_objects_smaller_than_points_are_kept_whole_with_a_warning(synth, tmp_path):
    rep = M.prepare(synth, tmp_path / "o", opts(source="ply_hdf5_2048", points=4096), workers=1)
    assert rep.ok and len(rep.warnings) == 1 and "15 objects have fewer than points=4096" in rep.warnings[0]
    assert all(s["coord"].shape == (2048, 3) for _, s in read_split(tmp_path / "o", "test"))


def test_synthetic_writers_are_deterministic_and_match_the_real_formats(shared_data, tmp_path):
    import re

    a, b, c = (S.write_modelnet_normal_resampled(tmp_path / x, 1, 1, seed=s, points=500)
               for x, s in (("a", 0), ("b", 0), ("c", 1)))
    files = sorted(p.relative_to(a) for p in a.rglob("*.txt"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.txt"))
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    assert (a / "dresser/dresser_0001.txt").read_bytes() != (c / "dresser/dresser_0001.txt").read_bytes()
    # same text layout as a real release file: 6 comma-separated 6-decimal numbers per row, LF
    real = (shared_data / "modelnet40/modelnet40_normal_resampled/chair/chair_0391.txt").read_text().splitlines()
    ours = (a / "dresser/dresser_0001.txt").read_text().splitlines()
    row = re.compile(r"^-?\d\.\d{6}(,-?\d\.\d{6}){5}$")
    assert all(row.match(r) for r in real[:100]) and all(row.match(r) for r in ours)
    arr = np.loadtxt(a / "dresser/dresser_0001.txt", delimiter=",")
    np.testing.assert_allclose(np.linalg.norm(arr[:, 3:], axis=1), 1, atol=2e-6)
    assert np.linalg.norm(arr[:, :3], axis=1).max() <= 1 + 1e-6
    assert (a / "modelnet40_shape_names.txt").read_text() == \
        (shared_data / "modelnet40/modelnet40_normal_resampled/modelnet40_shape_names.txt").read_text()
    # OFF meshes: deterministic, one glued header per split, the rest like the real ModelNet10 files
    o1 = S.write_modelnet_off(tmp_path / "o1", 2, 1, seed=4)
    o2 = S.write_modelnet_off(tmp_path / "o2", 2, 1, seed=4)
    offs = sorted(p.relative_to(o1) for p in o1.rglob("*.off"))
    assert all((o1 / r).read_bytes() == (o2 / r).read_bytes() for r in offs)
    heads = [(o1 / r).read_text().split("\n", 1)[0] for r in offs]
    assert sum(h != "OFF" and h.startswith("OFF") for h in heads) == 2
    real_head = (shared_data / "modelnet10/ModelNet10/bathtub/train/bathtub_0001.off").read_text().split("\n")[:2]
    assert real_head[0] == "OFF" and re.match(r"^\d+ \d+ 0$", real_head[1])


def test_changing_shard_size_removes_stale_shards(synth, tmp_path):
    out = tmp_path / "o"
    M.prepare(synth, out, opts(points=16, sampling="random", shard_size=2), workers=1)
    assert len(list(out.glob("train/shard_*.h5"))) == 5
    M.prepare(synth, out, opts(points=16, sampling="random", shard_size=4), workers=1)
    assert sorted(p.name for p in out.glob("train/shard_*.h5")) == ["shard_00000.h5", "shard_00001.h5",
                                                                     "shard_00002.h5"]
    assert len(list((out / ".done").glob("*.json"))) == 5  # 3 train + 2 test units
    assert verify_outputs(out) == [] and read_manifest(out)["splits"]["train"]["num_samples"] == 10


# ---------------------------------------------------------- sampling=first (issue 11 item 7, PointNet++)
def _pointnet2_loader(path: Path, npoints: int) -> np.ndarray:
    """What charlesq34/pointnet2 modelnet_dataset.py does per file: loadtxt, first npoints rows, pc_normalize."""
    point_set = np.loadtxt(path, delimiter=",").astype(np.float32)[0:npoints, :]
    pc = point_set[:, 0:3]
    pc = pc - np.mean(pc, axis=0)
    point_set[:, 0:3] = pc / np.max(np.sqrt(np.sum(pc ** 2, axis=1)))
    return point_set


def _check_first(raw: Path, out: Path, names: list[str], npoints: int) -> None:
    rep = M.prepare(raw, out, opts(allow_missing=True, points=npoints, sampling="first"), workers=1)
    assert rep.ok and rep.samples == len(names)
    m = read_manifest(out)
    assert m["options"]["sampling"] == "first" and "first `points` rows" in m["sampling"]
    assert "charlesq34/pointnet2" in m["sampling"]
    rows = dict(read_split(out, "train") + read_split(out, "test"))
    assert sorted(rows) == sorted(names)
    for name, s in rows.items():
        ref = _pointnet2_loader(raw / f"modelnet40_normal_resampled/{name.rsplit('_', 1)[0]}/{name}.txt", npoints)
        np.testing.assert_allclose(s["coord"], ref[:, :3], atol=2e-6)
        np.testing.assert_allclose(s["normal"], ref[:, 3:] / np.linalg.norm(ref[:, 3:], axis=1, keepdims=True),
                                   atol=2e-6)


def test_sampling_first_equals_the_official_pointnet2_loader(synth, tmp_path):
    names = [p.stem for p in (synth / "modelnet40_normal_resampled").rglob("*_0*.txt")]
    _check_first(synth, tmp_path / "o", names, 1024)


def test_real_sampling_first_equals_the_official_pointnet2_loader(shared_data, tmp_path):
    _check_first(shared_data / "modelnet40", tmp_path / "o", REAL_TRAIN + REAL_TEST, 1024)
