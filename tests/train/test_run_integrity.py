"""Every recorded number is the run that produced it: one live run per run dir, a resume is the same run,
a diverged run fails, fp16 scaler skips are not divergence, the recorded val is the selecting one, and the
run's files give one-line errors (issue 15, trainer items)."""

from __future__ import annotations

import errno
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pcbench.train import compose, fit
from pcbench.train import trainer as trainer_mod
from pcbench.train.checkpoint import load_checkpoint, save_checkpoint
from pcbench.train.config import PLACEMENT_KEYS, config_identity_sha256
from pcbench.train.errors import ConfigError, DivergedError, RunFileError
from pcbench.train.result import FitResult
from pcbench.train.state import DeviceTally, TrainState

from ._cli import REPO, TINY, copy_tree, env, metrics, run

MODEL = "pointnet2_ssg_cls"


def _overrides(prepared: dict[str, Path], *extra: str) -> list[str]:
    return ["data=modelnet40", f"data.root={prepared['mn40_syn']}", f"model={MODEL}", *TINY[MODEL],
            "trainer.batch_size=4", "trainer.max_steps=2", "trainer.max_epochs=1", "trainer.num_workers=0",
            "trainer.threads=1", "logger.tensorboard=false", "trainer.limit_eval_batches=1", *extra]


def _cfg(prepared: dict[str, Path], run_dir: Path, *extra: str):
    return compose(_overrides(prepared, *extra), run_dir=run_dir)


def _holder(run_dir: Path) -> subprocess.Popen:
    """Another process that takes the run dir's lock and waits (prints 'locked' once it holds it)."""
    code = ("import sys, time; from pathlib import Path; from pcbench.train.rundir import hold_run_dir\n"
            "with hold_run_dir(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(600)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True,
                         env={**env(), "PYTHONPATH": str(REPO)})
    assert p.stdout is not None and p.stdout.readline().strip() == "locked"
    return p


# ------------------------------------------------------------------------------------------ 1. lock
def test_second_live_run_is_refused_and_a_dead_owners_lock_is_taken_over(prepared: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    holder = _holder(run_dir)
    try:
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {holder.pid} on host "):
            fit(_cfg(prepared, run_dir))
        assert not (run_dir / "train.log").exists() and not (run_dir / ".hydra").exists()  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # a kill during an atomic checkpoint write leaves a temporary file: the next start removes it
    leftover = run_dir / "checkpoints" / ".pcbench-tmp-last.pt.x1y2"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"\0" * 1024)
    m = fit(_cfg(prepared, run_dir)).to_dict()
    assert m["steps"] == 2
    log = (run_dir / "train.log").read_text()
    assert f"taking over the lock of pid {holder.pid} on " in log and "(gone)" in log
    assert not leftover.exists() and "removed 1 temporary file(s)" in log
    assert (run_dir / ".lock").read_text() == ""  # a run that ended leaves no owner behind


def test_two_cli_runs_in_one_dir_second_exits_2_naming_the_owner(prepared: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    holder = _holder(run_dir)
    try:
        p = run([*_overrides(prepared), f"hydra.run.dir={run_dir}"], cwd=tmp_path, check=False)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert p.returncode == 2, p.stderr[-2000:]
    assert f"pid {holder.pid}" in p.stderr and "Traceback" not in p.stderr
    assert not (run_dir / ".hydra").exists()


# ------------------------------------------------------------------------------------------ 2. resume check
@pytest.mark.slow  # four CLI runs (~70 s here); test_resume_refusal_in_process_lists_the_changes is the fast one
def test_resume_with_a_changed_config_is_refused_before_anything_is_written(prepared: dict[str, Path],
                                                                            tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    base = [*_overrides(prepared), f"hydra.run.dir={run_dir}"]
    run(base, cwd=tmp_path)
    kept = {rel: (run_dir / rel).read_bytes() for rel in (".hydra/config.yaml", ".hydra/resolved.yaml",
                                                          "metrics.json", "checkpoints/last.pt")}
    p = run([*base, "resume=true", "optim.lr=0.5", "seed=5"], cwd=tmp_path, check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "optim.lr: 0.001 -> 0.5" in p.stderr and "seed: 0 -> 5" in p.stderr and "Traceback" not in p.stderr
    other = [a for a in base if a not in TINY[MODEL] and a != f"model={MODEL}"]
    p = run([*other, "model=pct_cls", *TINY["pct_cls"], "resume=true"], cwd=tmp_path, check=False)  # another model
    assert p.returncode == 2 and "model._target_: 'pcbench.models" in p.stderr and "Traceback" not in p.stderr
    for rel, data in kept.items():
        assert (run_dir / rel).read_bytes() == data, f"{rel} was rewritten by a refused resume"
    # placement keys may change: the same run continues (here: already finished, so only the final evaluation)
    run([*base, "resume=true", "trainer.threads=2", "logger.log_every_n_steps=5"], cwd=tmp_path)
    assert metrics(run_dir)["steps"] == 2


def test_placement_keys_cover_what_may_change_on_resume() -> None:
    a = {"trainer": {"num_workers": 2, "lr": 1}, "paths": {"run_dir": "/a"}, "seed": 0}
    b = {"trainer": {"num_workers": 8, "lr": 1}, "paths": {"run_dir": "/b"}, "seed": 0}
    assert "trainer.num_workers" in PLACEMENT_KEYS
    assert config_identity_sha256(a) == config_identity_sha256(b)


# ------------------------------------------------------------------------------------------ 3. divergence
def test_a_diverged_run_fails_instead_of_recording_a_result(prepared: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(DivergedError, match=r"max_skipped_fraction=0.1|weights of epoch 0 are not finite"):
        fit(_cfg(prepared, run_dir, "optim.lr=1e30", "trainer.max_steps=20", "trainer.max_epochs=20"))
    assert not (run_dir / "metrics.json").exists()


def test_diverged_cli_run_exits_non_zero_with_one_line(prepared: dict[str, Path], tmp_path: Path) -> None:
    p = run([*_overrides(prepared, "optim.lr=1e30", "trainer.max_steps=20", "trainer.max_epochs=20"),
             f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, check=False)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "the run diverged" in p.stderr or "max_skipped_fraction" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "run" / "metrics.json").exists()


def test_loss_of_a_window_without_finite_step_is_nan_not_zero() -> None:
    s = TrainState()
    assert math.isnan(s.mean_loss())
    tally = DeviceTally(torch.device("cpu"))
    tally.add(torch.tensor(float("nan")), torch.tensor(False))
    tally.drain(s)
    assert math.isnan(s.mean_loss()) and s.acc["n"] == 0
    tally.add(torch.tensor(2.0), torch.tensor(True))
    tally.add(torch.tensor(4.0), torch.tensor(True))
    tally.drain(s)
    assert s.mean_loss() == 3.0


def test_train_state_round_trips_and_reads_older_progress() -> None:
    s = TrainState(epoch=2, step=7, skipped=1, scaler_skipped=3, best=0.5, best_metrics={"oa": 0.5})
    t = TrainState()
    t.load_state_dict(s.state_dict())
    assert t == s
    old = {k: v for k, v in s.state_dict().items() if k not in ("scaler_skipped", "best_metrics")}
    t.load_state_dict(old)  # a last.pt of the previous format
    assert t.scaler_skipped == 0 and t.best_metrics is None and t.step == 7
    with pytest.raises(ValueError, match="unknown fields"):
        t.load_state_dict({**old, "bogus": 1})


# ------------------------------------------------------------------------------------------ 4. fp16 scaler
def test_loss_scaler_skips_are_counted_apart_and_do_not_step_the_schedule(prepared: dict[str, Path], tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # a scale near float32's maximum overflows the first steps' gradients, as fp16 does at 65536
    monkeypatch.setattr(trainer_mod, "_grad_scaler", lambda device, precision: torch.amp.GradScaler(
        "cpu", init_scale=2.0**127, growth_interval=1000))
    run_dir = tmp_path / "run"
    m = fit(_cfg(prepared, run_dir, "trainer.max_steps=6", "trainer.max_skipped_steps=0", "optim=adam")).to_dict()
    assert m["steps"] == 6 and m["skipped_steps"] == 0 and 1 <= m["scaler_skipped_steps"] < 6
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    applied = 6 - m["scaler_skipped_steps"]
    assert ckpt["scheduler"]["last_epoch"] == applied  # the schedule waits on scaler skips (as Pointcept)
    assert int(next(iter(ckpt["optimizer"]["state"].values()))["step"]) == applied
    assert ckpt["scaler"]["scale"] < 2.0**127 and ckpt["progress"]["scaler_skipped"] == m["scaler_skipped_steps"]


def test_non_finite_loss_under_the_scaler_is_still_divergence(prepared: dict[str, Path], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trainer_mod, "_grad_scaler", lambda device, precision: torch.amp.GradScaler("cpu"))
    nan_weights = "trainer.class_weights=[" + ",".join(["nan"] * 40) + "]"
    with pytest.raises(DivergedError, match="trainer.max_skipped_steps=1"):
        fit(_cfg(prepared, tmp_path / "run", nan_weights, "trainer.max_steps=3", "trainer.max_skipped_steps=1",
                 "trainer.max_skipped_fraction=1.0"))


# ------------------------------------------------------------------------------------------ 6 / 8. the result
def test_recorded_val_is_the_value_that_selected_the_checkpoint(prepared: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    res = fit(_cfg(prepared, run_dir, "trainer.max_epochs=2", "trainer.max_steps=null",
                   "trainer.limit_train_batches=2"))
    assert isinstance(res, FitResult)
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m == json.loads(json.dumps(res.to_dict()))  # metrics.json is exactly the typed result
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert m["selected_value"] == best["value"] == m["val"]["oa"] == res.selected_value
    assert m["best_epoch"] == best["epoch"]
    assert "val_final" in m and set(m["val_final"]) >= {"oa", "macc", "miou"}
    assert m["identity_sha256"] == config_identity_sha256(_cfg(prepared, tmp_path / "elsewhere", "seed=3",
                                                               "trainer.max_epochs=2", "trainer.max_steps=null",
                                                               "trainer.limit_train_batches=2"))
    assert m["splits"]["final"] == m["splits"]["test"] == "test" and m["splits"]["final_role"] == "test"
    assert m["scaler_skipped_steps"] == 0 and m["skipped_steps"] == 0
    assert FitResult.from_dict(m).selected_value == m["selected_value"]
    log = (run_dir / "train.log").read_text()
    assert f"(best {m['selected_value']:.4f} at epoch {m['best_epoch']})" in log


# ------------------------------------------------------------------------------------------ 7. one-line errors
@pytest.mark.parametrize("damage", ["empty", "garbage", "foreign"])
def test_damaged_last_checkpoint_on_resume_exits_2_naming_it(prepared: dict[str, Path], tmp_path: Path,
                                                             damage: str) -> None:
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.pt"
    last.parent.mkdir(parents=True)
    if damage == "empty":
        last.write_bytes(b"")
    elif damage == "garbage":
        last.write_bytes(b"PK\x03\x04 not a zip at all")
    else:
        torch.save({"weights": torch.zeros(2)}, last)
    with pytest.raises(RunFileError, match=r"last.pt"):
        fit(_cfg(prepared, run_dir, "resume=true"))
    assert not (run_dir / ".hydra").exists()


def test_pcbench_eval_errors_are_one_line(prepared: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    for ckpt, text in ((bad, "cannot be loaded"), (tmp_path / "missing.pt", "does not exist")):
        p = run([f"checkpoint={ckpt}"], cwd=tmp_path, check=False, tool="pcbench-eval")
        assert p.returncode == 2 and text in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]


def test_disk_full_while_writing_a_checkpoint_names_the_folder_and_size(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint({"model": {"w": torch.zeros(4)}}, path)

    def full(obj, f):  # noqa: ANN001, ANN202
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    state = {"model": {"w": torch.zeros(3 * 2**20 // 4)}}  # 3 MB
    with pytest.raises(RunFileError, match=rf"no space left on {path.parent}: need about 3 MB"):
        save_checkpoint(state, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["model"]["w"].numel() == 4  # the previous file is intact
    assert not list(path.parent.glob(".pcbench-tmp-*"))


def test_data_root_that_is_a_file_says_so(prepared: dict[str, Path], tmp_path: Path) -> None:
    f = tmp_path / "data.h5"
    f.write_bytes(b"x")
    with pytest.raises(ConfigError, match="is a file"):
        fit(compose(["data=modelnet40", f"data.root={f}"], run_dir=tmp_path / "run"))


def test_half_prepared_folder_shows_the_command_that_finishes_it(prepared: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "half"
    root.mkdir()
    (root / "manifest.json").write_text(json.dumps({
        "format_version": json.loads((prepared["mn40_syn"] / "manifest.json").read_text())["format_version"],
        "status": "incomplete", "dataset": "modelnet40", "command": "pcbench-prep modelnet40 raw=/r out=/o",
        "started_utc": "2026-01-01T00:00:00Z", "owned_outputs": []}))
    with pytest.raises(ConfigError, match=r"did not finish.*finish it with: pcbench-prep modelnet40 raw=/r out=/o"):
        fit(compose(["data=modelnet40", f"data.root={root}"], run_dir=tmp_path / "run"))


def test_ctrl_c_in_the_trainer_exits_130_with_one_line(prepared: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*_overrides(prepared, "trainer.max_steps=100000", "trainer.max_epochs=1000", "logger.log_every_n_steps=1"),
            f"hydra.run.dir={run_dir}", "trainer.malloc=default"]
    p = subprocess.Popen([str(Path(sys.executable).parent / "pcbench-train"), *args], cwd=tmp_path, env=env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (run_dir / "train.log").is_file():
            time.sleep(0.5)
        while time.monotonic() < deadline and " step " not in (run_dir / "train.log").read_text():
            time.sleep(0.5)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err[-2000:]
    assert "interrupted; continue with resume=true" in err and "Traceback" not in err
    assert (run_dir / ".lock").read_text() == ""


@pytest.mark.parametrize("workers", [0, 1])
def test_nan_in_a_prepared_sample_names_it_and_the_verify_command(prepared: dict[str, Path], tmp_path: Path,
                                                                   workers: int) -> None:
    import h5py  # noqa: PLC0415

    root = copy_tree(prepared["mn40_syn"], tmp_path / "mn40")
    with h5py.File(root / "train" / "shard_00000.h5", "r+") as h:
        h["normal"][:] = float("nan")  # every training sample's normals
    cfg = compose(_overrides({"mn40_syn": root}, f"trainer.num_workers={workers}"), run_dir=tmp_path / "run")
    with pytest.raises(RunFileError, match=rf"of sample \d+ \(.+\).* contains NaN or inf.*"
                                           rf"`pcbench-prep modelnet40 --verify out={root}`"):
        fit(cfg)


def test_pcbench_eval_on_an_empty_split_exits_2(prepared: dict[str, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from pcbench.cli.train import eval_main  # noqa: PLC0415

    root = copy_tree(prepared["mn40_syn"], tmp_path / "mn40")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["empty"] = {"files": [], "num_samples": 0}
    (root / "manifest.json").write_text(json.dumps(manifest))
    run_dir = tmp_path / "run"
    fit(_cfg({"mn40_syn": root}, run_dir))
    capsys.readouterr()
    code = eval_main([f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}", "eval.split=empty"])
    err = capsys.readouterr().err
    assert code == 2 and "eval.split='empty'" in err and "holds no samples" in err, err
    assert not (run_dir / "eval_empty.json").exists()


def test_resume_refusal_in_process_lists_the_changes(prepared: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    fit(_cfg(prepared, run_dir))
    resolved = (run_dir / ".hydra" / "resolved.yaml").read_bytes()
    with pytest.raises(ConfigError, match=r"\(seed: 0 -> 5; trainer.batch_size: 4 -> 8\)"):
        fit(_cfg(prepared, run_dir, "resume=true", "trainer.batch_size=8", "seed=5"))
    other = [a for a in _overrides(prepared) if a not in TINY[MODEL] and a != f"model={MODEL}"]
    with pytest.raises(ConfigError, match=r"model._target_: 'pcbench.models.pointnet2.PointNet2Cls' -> "):
        fit(compose([*other, "model=pct_cls", *TINY["pct_cls"], "resume=true"], run_dir=run_dir))
    assert (run_dir / ".hydra" / "resolved.yaml").read_bytes() == resolved
    # where/how it runs may change: the same (finished) run continues, only its final evaluation is repeated
    assert fit(_cfg(prepared, run_dir, "resume=true", "trainer.threads=2", "logger.log_every_n_steps=5")).steps == 2
