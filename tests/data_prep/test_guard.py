"""pcbench-prep never loses or corrupts data (issue 8, items 1-8): unreadable inputs, files it did not write,
failed and interrupted re-runs, Ctrl-C with workers, input hashing, silently accepted bad values, one-line
errors and a --check that validates what preparation validates."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from data_prep import cli
from data_prep import modelnet as M
from data_prep import scannet as SN
from data_prep import scanobjectnn as SO
from data_prep import synthetic_objects as S
from data_prep import synthetic_scannet as syn
from data_prep.common import PrepError, RaggedH5Reader, parse_options, read_manifest, sha256_file
from pcbench.data import ModelNetDataset, ScanObjectNNDataset
from tests.data_prep._unreadable import make_unreadable_kind, unreadable

REPO = Path(__file__).resolve().parents[2]
REASON = {"permission": "permission denied", "folder": "is a folder, not a file",
          "broken_link": "broken symbolic link", "link_loop": "symbolic link loop"}


def mn_opts(**kw):
    return parse_options(M.OPTIONS, {"points": 64, "sampling": "random", **kw})


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".pcbench-prep.lock"}


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("guard_templates")
    S.write_modelnet_normal_resampled(root / "nr", train=2, test=1, seed=1, points=600)  # 10 train, 5 test
    S.write_modelnet_off(root / "off", train=2, test=1, seed=1)  # 5 of the 40 classes present
    S.write_scanobjectnn(root / "so", train=2, test=1, seed=1, variants=("OBJ_BG",))
    syn.generate(root / "sn", train=4, val=2, test=1, seed=0)
    return {"nr": root / "nr", "off": root / "off", "so": root / "so", "sn": root / "sn"}


@pytest.fixture
def nr(templates, tmp_path) -> Path:
    return Path(shutil.copytree(templates["nr"], tmp_path / "raw_nr"))


@pytest.fixture
def sn(templates, tmp_path) -> Path:
    return Path(shutil.copytree(templates["sn"], tmp_path / "raw_sn"))


def _spoil(path: Path, kind: str):
    """A context in which ``path`` is an unreadable input of ``kind``."""
    if kind == "permission":
        return unreadable(path)
    make_unreadable_kind(path, kind)
    import contextlib

    return contextlib.nullcontext()


# ---------------------------------------------------------------- item 1: one unreadable input, one sample
@pytest.mark.parametrize("kind", list(REASON))
def test_unreadable_listed_file_fails_only_its_object(nr, tmp_path, kind):
    bad = nr / "modelnet40_normal_resampled/chair/chair_0001.txt"
    with _spoil(bad, kind):
        rep = M.prepare(nr, tmp_path / "out", mn_opts(), workers=1)
        skip = M.prepare(nr, tmp_path / "out_skip", mn_opts(allow_missing=True), workers=1)
    assert [n for n, _ in rep.failed] == ["chair_0001"]
    msg = rep.failed[0][1]
    assert str(bad) in msg and REASON[kind] in msg and "Fix:" in msg and "allow_missing=true" in msg
    assert rep.samples == 14  # every other object of the shard is written
    m = read_manifest(tmp_path / "out")
    assert m["splits"]["train"]["num_samples"] == 9 and m["splits"]["test"]["num_samples"] == 5
    assert skip.ok and skip.samples == 14
    assert len(skip.missing) == 1 and "chair_0001" in skip.missing[0] and REASON[kind] in skip.missing[0]


@pytest.mark.parametrize("kind", list(REASON))
def test_unreadable_off_mesh_is_skipped_alone_under_allow_missing(templates, tmp_path, kind):
    raw = Path(shutil.copytree(templates["off"], tmp_path / "raw"))
    bad = raw / "ModelNet40/chair/train/chair_0002.off"
    o = mn_opts(allow_missing=True, surface_points=300)
    with _spoil(bad, kind):
        rep = M.prepare(raw, tmp_path / "out", o, workers=1)
    assert rep.ok and rep.samples == 14, rep.failed
    named = [m for m in rep.missing if "chair_0002" in m]
    assert len(named) == 1 and REASON[kind] in named[0]
    assert "chair_0002" not in RaggedH5Reader(tmp_path / "out/train/shard_00000.h5").names


@pytest.mark.parametrize("kind", ["permission", "broken_link"])
def test_unreadable_scene_file_fails_only_that_scene(sn, tmp_path, kind):
    bad = sn / "scans/scene0001_00/scene0001_00_vh_clean_2.ply"
    with _spoil(bad, kind):
        rep = SN.prepare(sn, tmp_path / "out", {}, workers=1, progress=False)
        skip = SN.prepare(sn, tmp_path / "out2", {"allow_missing": True}, workers=1, progress=False)
    assert [s for s, _ in rep.failed] == ["scene0001_00"]
    assert str(bad) in rep.failed[0][1] and REASON[kind] in rep.failed[0][1]
    m = read_manifest(tmp_path / "out")
    assert m["splits"]["train"]["scenes"] == ["scene0000_00", "scene0002_00", "scene0003_00"]
    assert skip.ok and len(skip.missing) == 1 and skip.missing[0].startswith("scene0001_00 (")
    assert read_manifest(tmp_path / "out2")["splits"]["train"]["num_samples"] == 3


# ----------------------------------------------------------------- item 2: only our files, never worse
def test_files_it_did_not_write_are_never_overwritten_or_deleted(nr, tmp_path):
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    (out / "train/shard_00000.h5").write_bytes(b"someone else's shard")
    (out / "train/shard_00099.h5").write_bytes(b"another one")
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(PrepError, match=r"out: 1 file\(s\) that pcbench-prep did not write are in the way, "
                                        r"e.g. train/shard_00000.h5.*Fix: choose an empty out= folder"):
        M.prepare(nr, out, mn_opts(), workers=1)
    assert (out / "train/shard_00000.h5").read_bytes() == b"someone else's shard"
    assert not (out / "manifest.json").exists()
    (out / "train/shard_00000.h5").unlink()
    assert M.prepare(nr, out, mn_opts(), workers=1).ok
    assert M.prepare(nr, out, mn_opts(shard_size=4), workers=1).ok  # a layout change removes only its own shards
    assert (out / "train/shard_00099.h5").read_bytes() == b"another one"
    assert (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in (out / "train").glob("shard_*.h5")) == [
        "shard_00000.h5", "shard_00001.h5", "shard_00002.h5", "shard_00099.h5"]


def test_a_damaged_record_cannot_point_the_clean_up_outside_the_folder(nr, tmp_path):
    out = tmp_path / "out"
    assert M.prepare(nr, out, mn_opts(), workers=1).ok
    victim = tmp_path / "victim.txt"
    victim.write_text("not a shard")
    rec = next((out / ".done").glob("*.json"))
    body = json.loads(rec.read_text())
    body["outputs"][f"../{victim.name}"] = "0" * 64
    body["outputs"]["manifest.json"] = "0" * 64
    rec.write_text(json.dumps(body))
    assert M.prepare(nr, out, mn_opts(shard_size=4), workers=1).ok
    assert victim.read_text() == "not a shard" and read_manifest(out)["splits"]["train"]["num_samples"] == 10


def test_rerun_with_a_wrong_variant_leaves_the_folder_as_it_was(templates, tmp_path, capsys):
    out = tmp_path / "out"
    raw = templates["so"]
    assert SO.prepare(raw, out, parse_options(SO.OPTIONS, {"variant": "OBJ_BG"}), 1).ok
    before = snapshot(out)
    assert cli.main(["scanobjectnn", f"raw={raw}", f"out={out}", "variant=PB_T50_RS", "--workers", "1"]) == 2
    assert "variant: none of the PB_T50_RS files" in capsys.readouterr().err
    assert snapshot(out) == before
    assert len(ScanObjectNNDataset(out, "train")) == 10


def test_rerun_with_unreadable_inputs_keeps_the_previous_preparation(nr, tmp_path):
    out = tmp_path / "out"
    o = mn_opts(shard_size=5)
    assert M.prepare(nr, out, o, workers=1).ok
    before = snapshot(out)
    tests = sorted(n.strip() for n in (nr / "modelnet40_normal_resampled/modelnet40_test.txt").read_text().split())
    for name in tests:  # the whole test split becomes unreadable
        make_unreadable_kind(nr / "modelnet40_normal_resampled" / name.rsplit("_", 1)[0] / f"{name}.txt", "broken_link")
    rep = M.prepare(nr, out, o, workers=1)
    assert sorted(n for n, _ in rep.failed) == tests
    assert any("keeps the previous preparation unchanged" in w for w in rep.warnings)
    assert snapshot(out) == before  # manifest and shards exactly as the good run left them
    assert len(ModelNetDataset(out, "test")) == 5


# --------------------------------------------- item 3: a half-rewritten folder is refused until finished
def test_interrupted_rerun_with_new_options_is_refused_with_the_command_that_finishes_it(nr, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert M.prepare(nr, out, mn_opts(points=32, shard_size=3), workers=1).ok
    old_manifest = (out / "manifest.json").read_bytes()
    real = M.read_normal_txt
    calls = {"n": 0}

    def interrupted_at(n):
        def read(path):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            return real(path)
        return read

    monkeypatch.setattr(M, "read_normal_txt", interrupted_at(1))  # nothing written yet: manifest put back
    with pytest.raises(KeyboardInterrupt):
        M.prepare(nr, out, mn_opts(points=16, shard_size=3), workers=1)
    assert (out / "manifest.json").read_bytes() == old_manifest
    calls["n"] = 0
    monkeypatch.setattr(M, "read_normal_txt", interrupted_at(8))  # two new shards written, then Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        M.prepare(nr, out, mn_opts(points=16, shard_size=3), workers=1)
    monkeypatch.setattr(M, "read_normal_txt", real)
    with pytest.raises(PrepError, match=r"manifest.json: status: a preparation started at .* did not finish; "
                                        r"the shards here may mix old and new samples. Fix: finish it with: "
                                        r"pcbench-prep modelnet40 raw=\S+ out=\S+ points=16 sampling=random shard_size=3"):
        ModelNetDataset(out, "train")
    rep = M.prepare(nr, out, mn_opts(points=16, shard_size=3), workers=1)  # the command from the message
    assert rep.ok and rep.skipped == 2
    ds = ModelNetDataset(out, "train", use_normals=False)
    assert {ds[i]["coord"].shape for i in range(len(ds))} == {(16, 3)}


# -------------------------------------------------------------------------- item 4: Ctrl-C with workers
@pytest.mark.slow  # ~15 s: two spawned workers import torch before the first unit finishes
def test_ctrl_c_with_two_workers_stops_at_once_and_exits_130(tmp_path):
    raw = S.write_modelnet_off(tmp_path / "raw", train=10, test=2, seed=0).parent  # 60 meshes, one per unit
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "data_prep.cli", "modelnet40", f"raw={raw}", f"out={out}", "points=32",
           "shard_size=1", "surface_points=20000", "allow_missing=true", "--workers", "2"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    done = out / ".done"
    t0 = time.time()
    while time.time() - t0 < 180 and proc.poll() is None:
        if done.is_dir() and len(list(done.glob("*.json"))) >= 2:
            break
        time.sleep(0.02)
    n_signal = len(list(done.glob("*.json")))
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        "pcbench-prep: interrupted: finished units are kept; run the same command again to resume")
    n_end = len(list(done.glob("*.json")))
    assert 2 <= n_signal <= n_end <= n_signal + 4 < 60  # only the units in flight could still finish
    time.sleep(1.0)
    assert len(list(done.glob("*.json"))) == n_end  # no worker is left writing
    assert not list(out.rglob(".pcbench-tmp-*"))
    for p in out.rglob("*.h5"):  # every shard on disk is complete
        assert len(RaggedH5Reader(p)) == 1
    with pytest.raises(PrepError, match="finish it with: pcbench-prep modelnet40"):
        read_manifest(out)


# ---------------------------------------------------------------------- item 5: inputs edited in place
def _edit_keep_mtime(path: Path) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    i = data.index(b".") + 1
    data[i] = ord("7") if data[i] != ord("7") else ord("3")  # same size, other value
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_size == st.st_size


def test_input_edited_in_place_with_mtime_restored_is_hashed_again(nr, tmp_path, capsys):
    out = tmp_path / "out"
    o = mn_opts(shard_size=5)
    assert M.prepare(nr, out, o, workers=1).done == 3
    p = nr / "modelnet40_normal_resampled/dresser/dresser_0003.txt"  # a test object
    _edit_keep_mtime(p)
    assert cli.main(["modelnet40", "--verify", f"out={out}"]) == 1  # raw folder taken from the manifest
    text = capsys.readouterr().out
    assert f"{p}: input changed since preparation" in text
    rep = M.prepare(nr, out, o, workers=1)
    assert (rep.done, rep.skipped) == (1, 2)
    key = "modelnet40_normal_resampled/dresser/dresser_0003.txt"
    assert read_manifest(out)["inputs"][key] == sha256_file(p)
    assert cli.main(["modelnet40", "--verify", f"out={out}", f"raw={nr}"]) == 0
    assert "OK, every output and every input" in capsys.readouterr().out
    assert cli.main(["modelnet40", "--help"]) == 0
    assert "inputs edited since, even with their modification time restored" in capsys.readouterr().out


# --------------------------------------------------------------- item 6: bad values refused or warned
def test_float_labels_in_modelnet_h5_are_warned_and_fractions_refused(tmp_path):
    base = S.write_modelnet_ply_hdf5(tmp_path / "raw", train=1, test=1, seed=0)
    f5 = base / "ply_data_train0.h5"
    with h5py.File(f5, "a") as f:
        lab = f["label"][()].astype(np.float32)
        lab[1] += 0.5
        del f["label"]
        f["label"] = lab
    rep = M.prepare(tmp_path / "raw", tmp_path / "out", mn_opts(), workers=1)
    assert len(rep.failed) == 1 and f"{f5}: label: row 1: label {float(lab[1, 0])!r} is not a class index" in rep.failed[0][1]
    assert any(f"{f5}: label: stored as float32, not an integer type" in w for w in rep.warnings)
    m = read_manifest(tmp_path / "out")
    assert f"{f5}: label: stored as float32" in " ".join(m["validation"]["warnings"])
    got = RaggedH5Reader(tmp_path / "out/train/shard_00000.h5")
    want = [int(v) for i, v in enumerate(lab[:, 0]) if i != 1]
    assert [int(got[i]["label"]) for i in range(len(got))] == want


def test_float_scanobjectnn_mask_is_refused(templates, tmp_path):
    raw = Path(shutil.copytree(templates["so"], tmp_path / "raw"))
    f5 = raw / "h5_files/main_split/training_objectdataset.h5"
    with h5py.File(f5, "a") as f:
        mask = (f["mask"][()] != -1).astype(np.float32)  # 1.0 object, 0.0 background: nothing equals -1
        del f["mask"]
        f["mask"] = mask
    o = parse_options(SO.OPTIONS, {"variant": "OBJ_BG"})
    problems = SO.check(raw, o)
    assert len(problems) == 1 and f"{f5}: mask: dtype float32, expected an integer type" in problems[0]
    rep = SO.prepare(raw, tmp_path / "out", o, 1)
    assert [k for k, _ in rep.failed] == ["train"] and "mask: dtype float32" in rep.failed[0][1]


def test_axis_alignment_that_is_not_rigid(sn, tmp_path):
    meta = sn / "scans/scene0002_00/scene0002_00.txt"
    text = meta.read_text().splitlines()
    text = [("axisAlignment = " + " ".join(["0"] * 16)) if ln.startswith("axisAlignment") else ln for ln in text]
    meta.write_text("\n".join(text) + "\n")
    rep = SN.prepare(sn, tmp_path / "a", {"axis_align": True, "splits": "train"}, workers=1, progress=False)
    assert [s for s, _ in rep.failed] == ["scene0002_00"]
    assert f"{meta}: axisAlignment: axisAlignment is not a rigid transform: last row is [0.0, 0.0, 0.0, 0.0]" in \
        rep.failed[0][1]
    rep = SN.prepare(sn, tmp_path / "b", {"splits": "train"}, workers=1, progress=False)
    assert rep.ok and any("scene0002_00: axisAlignment is not a rigid transform" in w for w in rep.warnings)
    m = read_manifest(tmp_path / "b")
    info = m["scenes"]["scene0002_00"]
    assert np.isnan(RaggedH5Reader(tmp_path / "b" / info["file"])[info["index"]]["axis_alignment"]).all()


def test_unreadable_class_folder_fails_its_objects(templates, tmp_path):
    raw = Path(shutil.copytree(templates["off"], tmp_path / "raw"))
    folder = raw / "ModelNet40/chair/train"
    with unreadable(folder):
        rep = M.prepare(raw, tmp_path / "out", mn_opts(allow_missing=True, surface_points=300), workers=1)
        strict = M.prepare(raw, tmp_path / "out2", mn_opts(surface_points=300), workers=1)
    assert any(m.startswith("chair/train/ (folder unreadable (permission denied))") for m in rep.missing)
    assert rep.samples == 13
    failed = dict(strict.failed)
    assert "chair/train/" in failed and "folder unreadable (permission denied)" in failed["chair/train/"]
    assert not strict.ok


def test_split_lists_with_repeated_ids_or_shared_ids_are_refused(nr, tmp_path, sn):
    lists = nr / "modelnet40_normal_resampled"
    train = (lists / "modelnet40_train.txt").read_text().split()
    test = (lists / "modelnet40_test.txt").read_text().split()
    (lists / "modelnet40_train.txt").write_text("\n".join([*train, train[0]]) + "\n")
    with pytest.raises(PrepError, match=rf"modelnet40_train.txt: train: 1 id\(s\) listed more than once, e.g. {train[0]}"):
        M.prepare(nr, tmp_path / "o", mn_opts(), workers=1)
    (lists / "modelnet40_train.txt").write_text("\n".join([*train, test[2]]) + "\n")
    with pytest.raises(PrepError, match=rf"1 id\(s\) are in both the train and the test list \(train/test leakage\), "
                                        rf"e.g. {test[2]}"):
        M.prepare(nr, tmp_path / "o", mn_opts(), workers=1)
    assert any("train/test leakage" in p for p in M.check(nr, mn_opts()))
    assert not (tmp_path / "o").exists()
    # ScanNet: a repeated scene and a scene in train and val
    (sn / "scannetv2_train.txt").write_text("scene0000_00\nscene0001_00\nscene0000_00\n")
    with pytest.raises(PrepError, match=r"scannetv2_train.txt: line 3: scene0000_00 is listed again "
                                        r"\(first on line 1\)"):
        SN.prepare(sn, tmp_path / "s", {}, workers=1, progress=False)
    (sn / "scannetv2_train.txt").write_text("scene0000_00\nscene0004_00\n")
    with pytest.raises(PrepError, match=r"1 scene\(s\) are in both scannetv2_train.txt and scannetv2_val.txt "
                                        r"\(train/val leakage\), e.g. scene0004_00"):
        SN.prepare(sn, tmp_path / "s", {"splits": "train"}, workers=1, progress=False)


@pytest.mark.parametrize("value,msg", [(-3, r"segIndices\[5\] = -3 is negative"),
                                       (2.5, r"segIndices\[5\] = 2.5 is not an integer"),
                                       (7.0, r"segIndices\[5\] = 7.0 is not an integer")])
def test_negative_or_float_seg_indices_are_refused(sn, tmp_path, value, msg):
    p = sn / "scans/scene0003_00/scene0003_00_vh_clean_2.0.010000.segs.json"
    d = json.loads(p.read_text())
    d["segIndices"][5] = value
    p.write_text(json.dumps(d))
    rep = SN.prepare(sn, tmp_path / "out", {"splits": "train"}, workers=1, progress=False)
    assert [s for s, _ in rep.failed] == ["scene0003_00"]
    assert f"{p}: segIndices: " in rep.failed[0][1]
    import re

    assert re.search(msg, rep.failed[0][1])


def test_stray_vertex_or_point_far_out_is_refused(templates, nr, tmp_path):
    raw = Path(shutil.copytree(templates["off"], tmp_path / "raw"))
    mesh = raw / "ModelNet40/table/train/table_0001.off"
    lines = mesh.read_text().split("\n")
    head = 1 if lines[0].strip() == "OFF" else 0  # "OFF" + counts line, or counts glued to OFF
    lines[head + 1 + 3] = "1e30 0 0"  # vertex 3 (used by the faces) far out
    mesh.write_text("\n".join(lines))
    rep = M.prepare(raw, tmp_path / "out", mn_opts(allow_missing=True, surface_points=300), workers=1)
    assert [n for n, _ in rep.failed] == ["table_0001"]
    assert f"{mesh}: vertices: vertex 3 at (1e+30, 0, 0) lies" in rep.failed[0][1]
    assert "would squash the rest of the object into its centre" in rep.failed[0][1]
    assert rep.samples == 14
    txt = nr / "modelnet40_normal_resampled/table/table_0001.txt"
    rows = txt.read_text().splitlines()
    rows[10] = "1000000000000000019884624838656.000000,0,0,0,0,1"
    txt.write_text("\n".join(rows) + "\n")
    rep = M.prepare(nr, tmp_path / "out2", mn_opts(), workers=1)
    assert [n for n, _ in rep.failed] == ["table_0001"] and "coord: point 10 at (1e+30, 0, 0)" in rep.failed[0][1]


def test_real_objects_are_far_from_the_spread_limit(shared_data):
    for path in sorted((shared_data / "modelnet40/modelnet40_normal_resampled").rglob("*_0*.txt")):
        M.check_spread(M.read_normal_txt(path)[:, :3], path, "point", "coord")
        M.check_spread(M.read_normal_txt(path)[:, :3] * 1e-4, path, "point", "coord")  # scale-free
    for path in sorted((shared_data / "modelnet10/ModelNet10").rglob("*.off")):
        v, f = M.read_off(path)
        used = np.unique(f)
        M.check_spread(v[used], path, "vertex", "vertices", used)


# ------------------------------------------------------------------------ item 7: one line, exit 2
def _one_line_error(capsys, argv, match):
    import re

    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pcbench-prep: error: ") and "Traceback" not in err, err
    assert re.search(match, err), err


def test_out_not_writable_is_one_line(nr, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    _one_line_error(capsys, ["modelnet40", f"raw={nr}", f"out={tmp_path / 'file' / 'out'}", "--workers", "1"],
                    r"file/out: out: cannot create the output folder \(not a directory\).*Fix: choose an out= "
                    r"folder you can write to")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    with unreadable():  # only drops root's override, so the 0555 folder is read-only here too
        _one_line_error(capsys, ["modelnet40", f"raw={nr}", f"out={ro}", "--workers", "1"],
                        r"ro: out: cannot write here \(permission denied\)")


def test_non_utf8_or_unreadable_lists_and_tables_are_one_line(nr, sn, capsys):
    lst = nr / "modelnet40_normal_resampled/modelnet40_test.txt"
    lst.write_bytes(lst.read_bytes()[:20] + b"\xff\xfe" + lst.read_bytes()[20:])
    msg = r"modelnet40_test.txt: the split list is not UTF-8 text \(byte 0xff at offset 20, line \d\)"
    _one_line_error(capsys, ["modelnet40", f"raw={nr}", f"out={nr.parent / 'o'}"], msg)
    _check_lists(capsys, ["modelnet40", f"raw={nr}", "--check"], msg)
    tsv = sn / "scannetv2-labels.combined.tsv"
    tsv.write_bytes(b"\xe9" + tsv.read_bytes())
    msg = r"scannetv2-labels.combined.tsv: the label map is not UTF-8 text \(byte 0xe9 at offset 0, line 1\)"
    _one_line_error(capsys, ["scannet", f"raw={sn}", f"out={sn.parent / 's'}"], msg)
    _check_lists(capsys, ["scannet", f"raw={sn}", "--check"], msg)
    tsv.write_bytes(tsv.read_bytes()[1:])
    with unreadable(sn / "scannetv2_val.txt"):
        msg = r"scannetv2_val.txt: cannot read the split list \(permission denied\)"
        _one_line_error(capsys, ["scannet", f"raw={sn}", f"out={sn.parent / 's'}"], msg)
        _check_lists(capsys, ["scannet", f"raw={sn}", "--check"], msg)


def _check_lists(capsys, argv, match):
    """--check lists the problem (exit 1, one problem line), never a traceback."""
    import re

    assert cli.main(argv) == 1
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err and cap.out.count("\n") == 2 and "1 problems found" in cap.out, cap
    assert re.search(match, cap.out), cap.out


def test_verify_without_outputs_table_is_one_line(nr, tmp_path, capsys):
    out = tmp_path / "out"
    assert M.prepare(nr, out, mn_opts(), workers=1).ok
    m = json.loads((out / "manifest.json").read_text())
    m.pop("outputs")
    (out / "manifest.json").write_text(json.dumps(m))
    _one_line_error(capsys, ["modelnet40", "--verify", f"out={out}"],
                    r"manifest.json: required|manifest is missing keys \['outputs'\]")


def test_output_into_a_closed_pipe_is_not_a_traceback(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "data_prep.cli", "scannet", "--help"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # like `| head -0`: the reader is gone before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


@pytest.mark.parametrize("dataset", ["modelnet40", "scanobjectnn", "scannet"])
def test_raw_that_is_a_file_says_so(dataset, tmp_path, capsys):
    (tmp_path / "raw.zip").write_bytes(b"PK")
    _one_line_error(capsys, [dataset, f"raw={tmp_path / 'raw.zip'}", f"out={tmp_path / 'o'}"],
                    r"raw.zip: raw: is a file, not a folder")
    assert not (tmp_path / "o").exists()


# --------------------------------------------------- item 8: --check validates what preparation validates
def test_check_finds_what_preparation_rejects_and_honours_allow_missing(nr, tmp_path, capsys):
    bad = nr / "modelnet40_normal_resampled/dresser/dresser_0002.txt"
    rows = bad.read_text().splitlines()
    rows[400] = "nan,0,0,0,0,1"  # far from the first line that a header check reads
    bad.write_text("\n".join(rows) + "\n")
    (nr / "modelnet40_normal_resampled/bathtub/bathtub_0001.txt").unlink()
    problems = M.check(nr, mn_opts(), workers=1, progress=True)
    assert any(f"{bad}: coord: 1 points have NaN or inf coordinates" in p for p in problems)
    assert any("bathtub_0001.txt (not found)" in p and "allow_missing=true" in p for p in problems)
    assert "checking modelnet40" in capsys.readouterr().err  # progress bar
    lenient = M.check(nr, mn_opts(allow_missing=True), workers=1)
    assert len(lenient) == 1 and str(bad) in lenient[0]  # the absent file is no longer a problem
    rep = M.prepare(nr, tmp_path / "out", mn_opts(allow_missing=True), workers=1)
    assert [n for n, _ in rep.failed] == ["dresser_0002"]
    assert [m for m in rep.missing if "bathtub_0001.txt (not found)" in m]


def test_check_of_scannet_and_scanobjectnn_reads_every_sample(sn, templates, tmp_path):
    p = sn / "scans/scene0004_00/scene0004_00_vh_clean_2.0.010000.segs.json"
    d = json.loads(p.read_text())
    d["segIndices"][100] = -1
    p.write_text(json.dumps(d))
    problems = SN.check(sn, {})
    assert len(problems) == 1 and f"{p}: segIndices: segIndices[100] = -1 is negative" in problems[0]
    raw = Path(shutil.copytree(templates["so"], tmp_path / "so"))
    f5 = raw / "h5_files/main_split/test_objectdataset.h5"
    with h5py.File(f5, "a") as f:
        lab = f["label"][()]
        lab[2] = 99
        f["label"][...] = lab
    problems = SO.check(raw, parse_options(SO.OPTIONS, {"variant": "OBJ_BG"}))
    assert len(problems) == 1 and f"{f5}: label: row 2: label 99 outside 0..14" in problems[0]
