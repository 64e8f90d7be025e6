"""Tests of the shared preparation machinery (data_prep.common)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from data_prep import common as C
from data_prep.common import (
    FORMAT_VERSION,
    DoneLog,
    Option,
    PrepError,
    PrepLock,
    RaggedH5Reader,
    atomic_write,
    hash_files,
    parallel_map,
    parse_options,
    read_manifest,
    sha256_file,
    write_manifest,
    write_ragged_h5,
)

REPO = Path(__file__).resolve().parents[2]


def _manifest(**kw):
    base = dict(dataset="toy", preparer_version="1", command="pcbench-prep toy raw=/r out=/o", options={},
                classes=["a"], splits={}, inputs={}, outputs={}, label_stats={}, validation={})
    base.update(kw)
    return base


def test_sha256_matches_hashlib(tmp_path):
    data = np.random.default_rng(0).bytes(3 * (1 << 20) + 17)  # spans several read chunks
    p = tmp_path / "x.bin"
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_hash_files_reuses_cache_only_when_stat_unchanged(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("one")
    first = hash_files([p], tmp_path)
    assert first["a.txt"]["sha256"] == hashlib.sha256(b"one").hexdigest()
    fake = {"a.txt": {**first["a.txt"], "sha256": "cached"}}
    assert hash_files([p], tmp_path, fake)["a.txt"]["sha256"] == "cached"  # stat equal -> no re-read
    p.write_text("two!")  # size changes
    assert hash_files([p], tmp_path, fake)["a.txt"]["sha256"] == hashlib.sha256(b"two!").hexdigest()


def test_atomic_write_success_and_failure_leave_no_partial_file(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with atomic_write(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("complete")
    assert target.read_text() == "complete"
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-way")
    assert target.read_text() == "complete"  # old content kept
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]  # temp removed


def test_atomic_write_survives_hard_kill(tmp_path):
    target = tmp_path / "out.h5"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from data_prep.common import atomic_write
        with atomic_write({str(target)!r}) as tmp:
            tmp.write_bytes(b"x" * 1000)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert r.returncode == -9
    assert not target.exists()
    leftovers = list(tmp_path.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(C.TEMP_PREFIX)
    assert C.clean_stale_temps(tmp_path) == leftovers
    assert list(tmp_path.iterdir()) == []


def test_manifest_roundtrip_and_version_refusal(tmp_path):
    path = write_manifest(tmp_path, _manifest(label_stats={"train": {"a": np.int64(3)}}))
    m = read_manifest(tmp_path)
    assert m["format_version"] == FORMAT_VERSION and m["label_stats"]["train"]["a"] == 3
    body = json.loads(path.read_text())
    body["format_version"] = FORMAT_VERSION + 1
    path.write_text(json.dumps(body))
    with pytest.raises(PrepError, match=r"format_version.*re-prepare with: pcbench-prep toy raw=/r out=/o"):
        read_manifest(tmp_path)
    with pytest.raises(PrepError, match="manifest.json missing.*pcbench-prep"):
        read_manifest(tmp_path / "nothing")
    with pytest.raises(ValueError, match="missing keys.*classes"):
        write_manifest(tmp_path, {k: v for k, v in _manifest().items() if k != "classes"})


def test_verify_outputs_detects_changed_and_missing_files(tmp_path):
    (tmp_path / "a.h5").write_bytes(b"abc")
    (tmp_path / "b.h5").write_bytes(b"def")
    write_manifest(tmp_path, _manifest(outputs={"a.h5": sha256_file(tmp_path / "a.h5"),
                                                "b.h5": sha256_file(tmp_path / "b.h5")}))
    assert C.verify_outputs(tmp_path) == []
    (tmp_path / "a.h5").write_bytes(b"abX")
    (tmp_path / "b.h5").unlink()
    problems = C.verify_outputs(tmp_path)
    assert len(problems) == 2 and "sha256 differs" in problems[0] and "missing" in problems[1]


def _ragged_samples(rng, n=7):
    samples, names = [], []
    for i in range(n):
        m = int(rng.integers(0, 50))  # includes empty samples
        samples.append({"coord": rng.normal(size=(m, 3)).astype(np.float32),
                        "seg": rng.integers(-1, 20, size=m).astype(np.int16),
                        "label": np.array(i % 3, dtype=np.int64)})
        names.append(f"s{i}_é")
    return samples, names


def test_ragged_h5_roundtrip_random_access(tmp_path):
    rng = np.random.default_rng(1)
    samples, names = _ragged_samples(rng)
    samples[2]["coord"] = samples[2]["coord"][:0]
    samples[2]["seg"] = samples[2]["seg"][:0]
    path = tmp_path / "s.h5"
    with atomic_write(path) as tmp:
        write_ragged_h5(tmp, samples, names, attrs={"split": "train"})
    r = RaggedH5Reader(path)
    assert len(r) == 7 and r.names == names and r.attrs == {"split": "train"}
    assert r.keys == ["coord", "seg", "label"]
    np.testing.assert_array_equal(r.lengths("coord"), [len(s["coord"]) for s in samples])
    for i in [6, 0, 3, 2, -1]:
        got = r[i]
        want = samples[i]
        for k in want:
            assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
            np.testing.assert_array_equal(got[k], want[k])
    assert set(r.get(1, keys=["label"])) == {"label"}
    with pytest.raises(IndexError, match="out of range for 7"):
        r[7]
    # the raw layout is what the docstring promises (concatenated rows + offsets)
    with h5py.File(path) as f:
        off = f["coord__offset"][()]
        assert off[0] == 0 and off[-1] == f["coord"].shape[0] == sum(len(s["coord"]) for s in samples)
    # pickling drops the handle and the copy re-opens by itself
    r2 = pickle.loads(pickle.dumps(r))
    assert r2._h5 is None
    np.testing.assert_array_equal(r2[4]["coord"], samples[4]["coord"])


def test_ragged_h5_rejects_mismatched_samples(tmp_path):
    a = {"coord": np.zeros((3, 3), np.float32)}
    with pytest.raises(ValueError, match=r"sample 1 \(b\) key 'coord'.*same trailing shape"):
        write_ragged_h5(tmp_path / "x.h5", [a, {"coord": np.zeros((3, 2), np.float32)}], ["a", "b"])
    with pytest.raises(ValueError, match=r"sample 1 \(b\) has keys"):
        write_ragged_h5(tmp_path / "x.h5", [a, {"xyz": np.zeros((3, 3), np.float32)}], ["a", "b"])
    with pytest.raises(ValueError, match="one name per sample"):
        write_ragged_h5(tmp_path / "x.h5", [a], ["a", "b"])


def test_ragged_reader_reopens_after_fork(tmp_path):
    samples, names = _ragged_samples(np.random.default_rng(2), 4)
    write_ragged_h5(tmp_path / "s.h5", samples, names)
    r = RaggedH5Reader(tmp_path / "s.h5")
    r[0]  # parent opens the handle
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must not use the parent's HDF5 handle
        try:
            ok = np.array_equal(r[3]["coord"], samples[3]["coord"]) and r._pid == os.getpid()
            os.write(wfd, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(rfd, 1) == b"1"
    assert r._pid == os.getpid()


def test_parse_options_types_defaults_and_errors():
    spec = {"points": Option(1024, "points", int), "normals": Option(True, "n", bool),
            "sampling": Option("fps", "s", str, ("fps", "random")), "scale": Option(1.0, "s", float)}
    assert parse_options(spec, {}) == {"points": 1024, "normals": True, "sampling": "fps", "scale": 1.0}
    got = parse_options(spec, {"points": "512", "normals": "False", "sampling": "random", "scale": 2})
    assert got == {"points": 512, "normals": False, "sampling": "random", "scale": 2.0}
    with pytest.raises(PrepError, match=r"unknown option pts='3'.*use one of normals, points, sampling, scale"):
        parse_options(spec, {"pts": "3"}, "modelnet40")
    with pytest.raises(PrepError, match=r"points: cannot read points='many' as int"):
        parse_options(spec, {"points": "many"})
    with pytest.raises(PrepError, match=r"normals: cannot read normals='maybe' as true/false"):
        parse_options(spec, {"normals": "maybe"})
    assert parse_options(spec, {"sampling": "FPS"})["sampling"] == "fps"  # choices match case-insensitively
    with pytest.raises(PrepError, match=r"sampling='grid' is not accepted.*fps, random"):
        parse_options(spec, {"sampling": "grid"})
    with pytest.raises(PrepError, match="as int"):
        parse_options(spec, {"points": True})


def test_prep_error_message_and_pickle():
    err = PrepError("NaN coordinates in 3 rows", "/raw/a.off", "vertices", "repair the mesh")
    assert str(err) == "/raw/a.off: vertices: NaN coordinates in 3 rows. Fix: repair the mesh"
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err) and back.field == "vertices"


def _square_or_fail(x: int) -> int:
    if x == 3:
        raise PrepError("bad item", f"item{x}", "value", "drop it")
    if x == 5:
        raise ValueError("plain failure")
    return x * x


@pytest.mark.parametrize("workers", [1, 2])
def test_parallel_map_keeps_good_items_and_returns_errors(workers):
    got = dict(parallel_map(_square_or_fail, list(range(8)), workers=workers, progress=False))
    assert set(got) == set(range(8))
    for x, r in got.items():
        if x == 3:
            assert isinstance(r, PrepError) and r.path == "item3"
        elif x == 5:
            assert isinstance(r, ValueError) and "plain failure" in str(r)
        else:
            assert r == x * x


def test_done_log_skip_rules(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "in.txt").write_text("input")
    out = tmp_path / "out"
    (out / "shard.h5").parent.mkdir(parents=True)
    (out / "shard.h5").write_bytes(b"result")
    log = DoneLog(out)
    inputs = hash_files([raw / "in.txt"], raw)
    assert not log.is_done("train/0", inputs, {"n": 1})
    log.mark("train/0", inputs, {"n": 1}, ["shard.h5"], extra={"failed": []})
    assert log.is_done("train/0", inputs, {"n": 1})
    assert not log.is_done("train/0", inputs, {"n": 2})  # options changed
    assert not log.is_done("train/1", inputs, {"n": 1})  # other unit
    (raw / "in.txt").write_text("changed input")
    assert not log.is_done("train/0", hash_files([raw / "in.txt"], raw, log.input_cache("train/0")), {"n": 1})
    (raw / "in.txt").write_text("input")
    inputs = hash_files([raw / "in.txt"], raw)
    (out / "shard.h5").write_bytes(b"tampered")
    assert not log.is_done("train/0", inputs, {"n": 1})  # output changed
    (out / "shard.h5").unlink()
    assert not log.is_done("train/0", inputs, {"n": 1})  # output gone


def test_prep_lock_is_exclusive(tmp_path):
    with PrepLock(tmp_path):
        script = f"import sys; sys.path.insert(0, {str(REPO)!r}); from data_prep.common import PrepLock\n" \
                 f"with PrepLock({str(tmp_path)!r}): pass"
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        assert r.returncode != 0 and "another pcbench-prep run is writing this folder" in r.stderr
    with PrepLock(tmp_path):  # released on exit
        pass


def _toy_process(job, raw, options):
    vals = [float((raw / p).read_text()) * job.payload["mult"] for p in job.inputs]
    if any(v < 0 for v in vals):
        raise PrepError("negative value", job.inputs[0], "value", "use a positive number")
    return C.ShardResult([{"x": np.array([v] * 2, np.float32), "label": np.array(1)} for v in vals],
                         [f"s{i}" for i in range(len(vals))], info={"n": len(vals)})


def test_run_shard_jobs_skips_only_unchanged_units(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw.mkdir()
    for i in range(3):
        (raw / f"{i}.txt").write_text(str(i + 1))
    jobs = [C.ShardJob(f"u{i}", "train", f"train/{i}.h5", [f"{i}.txt"], {"mult": 2}) for i in range(3)]

    def run(jobs, salt="v1", options=None):
        rep = C.Report("toy", str(out))
        recs = C.run_shard_jobs(_toy_process, raw, out, options or {"a": 1}, jobs, 1, rep, salt=salt)
        return rep, recs

    rep, recs = run(jobs)
    assert (rep.done, rep.skipped, rep.samples) == (3, 0, 3)
    assert RaggedH5Reader(out / "train/2.h5")[0]["x"].tolist() == [6.0, 6.0]
    rep, _ = run(jobs)
    assert (rep.done, rep.skipped) == (0, 3)
    jobs[1] = C.ShardJob("u1", "train", "train/1.h5", ["1.txt"], {"mult": 3})  # payload changed
    (raw / "2.txt").write_text("-5")  # input changed, now bad
    rep, recs = run(jobs)
    assert (rep.done, rep.skipped) == (1, 1) and [k for k, _ in rep.failed] == ["u2"]
    assert "2.txt: value: negative value" in rep.failed[0][1]
    assert [r["unit"] for r in recs] == ["u0", "u1"]
    assert RaggedH5Reader(out / "train/1.h5")[0]["x"].tolist() == [6.0, 6.0]
    rep, _ = run(jobs[:2], salt="v2")  # new preparer version: everything redone
    assert (rep.done, rep.skipped) == (2, 0)
    rep, _ = run(jobs[:2], salt="v2", options={"a": 2})
    assert rep.done == 2
