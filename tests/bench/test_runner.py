"""pcbench-bench end to end through the command line: a small suite into a temporary store and report, a crashing
cell recorded while the suite goes on, a re-run that skips finished cells, a killed suite that resumes, missing
sample data explained. The suite is written into a copy of conf/ (PCBENCH_CONF) so the shipped ones stay as
they are; its cells are tiny models for two optimizer steps on data that the real preparer makes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from pcbench.bench.record import config_sha256
from pcbench.bench.store import ResultStore
from pcbench.train.config import config_dir, config_identity_sha256

BIN = Path(sys.executable).parent

SUITE = """
name: t3
seeds: [0]
train: [optim=adamw, optim.lr=0.01, trainer.num_workers=0, logger.tensorboard=false, trainer.max_steps=2,
        trainer.max_epochs=2, trainer.limit_eval_batches=1]
probe: {batches: 1, warmup: 0, repeats: 1, latency_repeats: 1, bf16: true, int8: true, score: true}
datasets:
  objects:
    data: modelnet40
    label: synthetic-modelnet40
    root: ${data_dir}/objects
    prep: [modelnet40, raw=synthetic]
    train: [data.num_points=128, trainer.batch_size=4]
models:
  pointnet2_ssg_cls:
    datasets: [objects]
    train: ["model.num_samples=[32,8]", "model.radii=[[0.3],[0.6]]", "model.max_neighbors=[[8],[8]]",
            "model.widths=[[[8,8,16]],[[16,16,32]]]", "model.global_widths=[32,32,64]", "model.head_hidden=[32,16]"]
  pct_cls:
    datasets: [objects]
    train: ["model.embed_channels=[16,32,32]", "model.num_samples=[32,16]", model.k=8, model.depth=1,
            model.fuse_channels=64, "model.head_hidden=[32,16]"]
  crash:
    model: pct_cls
    datasets: [objects]
    train: ["model.embed_channels=[16,32,32]", "model.num_samples=[32,16]", model.k=8, model.depth=1,
            model.fuse_channels=64, "model.head_hidden=[32,16]", trainer.batch_size=1000]
"""


@pytest.fixture(scope="module")
def conf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of conf/ with the test suite t3 in it."""
    root = tmp_path_factory.mktemp("conf") / "conf"
    shutil.copytree(config_dir(), root)
    (root / "suite" / "t3.yaml").write_text(SUITE)
    return root


def bench(conf: Path, out: Path, *args: str, module: bool = False, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run pcbench-bench (or python -m pcbench.bench) with the test conf/, one thread, the basic launcher."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(PCBENCH_CONF=str(conf), OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    cmd = [sys.executable, "-m", "pcbench.bench"] if module else [str(BIN / "pcbench-bench")]
    return subprocess.run([*cmd, f"out={out}", "hydra/launcher=basic", "threads=1", *args], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=out.parent)


def records(out: Path) -> list[dict[str, Any]]:
    with ResultStore(out / "results.sqlite", create=False) as s:
        return s.records()


@pytest.fixture(scope="module")
def first(conf: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("suite") / "out"
    out.parent.mkdir(exist_ok=True)
    return out, bench(conf, out, "suite=t3", module=True)


def test_suite_runs_end_to_end_into_the_store_and_report(first: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, p = first
    assert p.returncode == 1, p.stdout + p.stderr  # one cell crashed: recorded, the others ran
    assert "suite t3: 3 cells, 0 finished earlier (skipped), 3 to run with the basic launcher, 1 torch thread(s)" in p.stdout
    assert re.search(r"dataset objects: prepared in [\d.]+ s", p.stdout)
    for k, cell in enumerate(["objects-pointnet2_ssg_cls-s0", "objects-pct_cls-s0", "objects-crash-s0"], 1):
        assert f"cell {k}/3 {cell}: running" in p.stdout, p.stdout
    assert "done 2, failed 1, left 0 of 3 | elapsed" in p.stdout
    assert "suite t3: 2 finished, 1 failed, 0 not run" in p.stdout
    recs = {r["cell"]: r for r in records(out)}
    assert sorted(recs) == ["objects-crash-s0", "objects-pct_cls-s0", "objects-pointnet2_ssg_cls-s0"]
    for cell, model in (("objects-pointnet2_ssg_cls-s0", "pointnet2_ssg_cls"), ("objects-pct_cls-s0", "pct_cls")):
        r = recs[cell]
        assert r["status"] == "finished" and r["model"] == model and r["suite"] == "t3" and r["seed"] == 0
        assert r["dataset"] == "synthetic-modelnet40" and r["task"] == "cls" and r["fidelity"] == "pcbench variant"
        assert r["recipe"] == f"t3: {model}" and r["steps"] == 2 and r["selected_on"] == "val"
        assert r["config_sha256"] == config_sha256(r["config"]) and r["config"]["train"]["seed"] == 0
        assert r["identity_sha256"] == config_identity_sha256(r["config"]["train"])
        assert r["splits"] == {"train": "train", "val": r["splits"]["val"], "final": "test", "final_role": "test"}
        assert "threads" not in r["config"]["train"]["trainer"]  # placement is not part of the identity
        assert r["config"]["probe"]["repeats"] == 1
        for key in ("git_commit", "pcbench_version", "torch_version", "dataset_manifest_sha256", "hostname", "cpu_model",
                    "started_at", "finished_at", "allocator", "python_version"):
            assert r[key], key
        assert r["device"] == "cpu" and r["num_threads"] == 1 and r["allocator"].startswith("glibc tuned")
        run_dir = Path(r["run_dir"])
        assert run_dir.parent == out / "bench" / "t3" / cell and run_dir.name == r["config_sha256"][:12]
        assert json.loads((run_dir / "metrics.json").read_text())["test"] == r["test"]
        assert Path(r["log_path"]) == run_dir / "cell.log" and "probe done" in Path(r["log_path"]).read_text()
        probe = r["probe"]
        assert probe["params"] == r["params"] and probe["flops_per_sample"] > 0 and probe["infer_samples_per_s"] > 0
        assert probe["score_fp32"] == r["test"]["oa"]  # the probe's score is the trainer's test evaluation
        assert probe["bf16_status"] == "ok" and probe["bf16_score_delta"] is not None
        assert probe["int8_status"] == "ok" or probe["int8_status"].startswith("unsupported")
        assert r["extra"]["load_avg"] >= 0 and r["extra"]["cpu_count"] == os.cpu_count()  # the report's load flag
    crash = recs["objects-crash-s0"]
    assert crash["status"] == "failed" and "trainer.batch_size=1000" in crash["error"]
    assert "Traceback" in Path(crash["log_path"]).read_text()
    assert "objects-crash-s0: FAILED after" in p.stdout and crash["log_path"] in p.stdout
    report = out / "report"
    md = (report / "leaderboard.md").read_text()
    assert "## synthetic-modelnet40 — test" in md and "## Failed cells" in md and "trainer.batch_size=1000" in md
    assert re.search(r"\| [\d-]+ \| pointnet2_ssg_cls \| t3: pointnet2_ssg_cls / pcbench variant \|", md)
    assert re.search(r"\| [\d-]+ \| pct_cls \| t3: pct_cls / pcbench variant \|", md)
    assert (report / "leaderboard.html").stat().st_size > 1000 and (report / "leaderboard.csv").is_file()
    assert f"report of 3 records in {out / 'results.sqlite'}" in p.stdout and str(report / "leaderboard.html") in p.stdout


def test_rerun_skips_finished_cells_and_retries_the_failed_one(conf: Path,
                                                               first: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, _ = first
    before = {r["result_id"]: r for r in records(out) if r["status"] == "finished"}
    p = bench(conf, out, "suite=t3")  # the console script this time
    assert p.returncode == 1, p.stdout + p.stderr
    assert "3 cells, 2 finished earlier (skipped), 1 to run" in p.stdout
    assert "dataset objects: prepared earlier (same command, manifest unchanged)" in p.stdout
    assert "pointnet2_ssg_cls-s0: running" not in p.stdout and "cell 1/1 objects-crash-s0: running" in p.stdout
    after = records(out)
    assert {r["result_id"]: r for r in after if r["status"] == "finished"} == before
    assert [r["status"] for r in after if r["cell"] == "objects-crash-s0"] == ["failed", "failed"]


def test_killed_suite_resumes_its_cell(conf: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    only = "only=[objects-pct_cls-s0]"
    killed = bench(conf, out, "suite=t3", only, 'overrides=["fault.sigkill_after_step=1",'
                   '"trainer.checkpoint_every_n_steps=1"]')
    assert killed.returncode == -9, killed.stdout + killed.stderr  # the trainer's fault injection killed the runner
    (stale,) = records(out)
    assert stale["status"] == "running"
    run_dir = Path(stale["run_dir"])
    assert (run_dir / "checkpoints" / "last.pt").is_file() and not (run_dir / "metrics.json").exists()
    p = bench(conf, out, "suite=t3", only)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "1 cells, 0 finished earlier (skipped), 1 to run" in p.stdout and "(resuming)" in p.stdout
    # the killed runner's claim is taken over, saying so (its process is gone)
    assert re.search(r"objects-pct_cls-s0: took over the claim of pid \d+ on host .*: that process is gone", p.stdout)
    with ResultStore.open_readonly(out / "results.sqlite") as s:
        assert s.claims() == []
    recs = {r["result_id"]: r for r in records(out)}
    assert recs[stale["result_id"]]["status"] == "failed" and "interrupted" in recs[stale["result_id"]]["error"]
    (done,) = [r for r in recs.values() if r["status"] == "finished"]
    assert done["config_sha256"] == stale["config_sha256"] and done["run_dir"] == str(run_dir)
    assert done["extra"]["resumed"] is True and done["steps"] == 2
    assert "resumed from" in (run_dir / "train.log").read_text()


def test_smoke_without_sample_files_says_what_to_do(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    p = bench(config_dir(), out, "suite=smoke", f"shared_data={tmp_path / 'nowhere'}")
    assert p.returncode == 2
    assert f"the raw files {tmp_path / 'nowhere'}/modelnet40/modelnet40_normal_resampled do not exist" in p.stderr
    assert "suite=smoke needs a folder of real sample files (modelnet40/, scannet/)" in p.stderr
    assert "without them run suite=quickstart" in p.stderr


# ------------------------------------------------------------------ one cell in-process, the trainer replaced
def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


@pytest.fixture
def t3(conf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, dict[str, Any]]:
    """The composed runner config of suite t3 and its cells (in this process; nothing prepared or trained)."""
    from pcbench.bench.suite import compose_bench, expand_suite

    monkeypatch.setenv("PCBENCH_CONF", str(conf))
    bench = compose_bench(["suite=t3", f"out={tmp_path / 'out'}"])
    return bench, {c.name: c for c in expand_suite(bench)}


def _cell_sha(cell: Any) -> str:
    from pcbench.bench.suite import cell_config, cell_identity

    return config_sha256(cell_identity(cell_config(cell, "/unused")[0], cell.probe))


def _fake_result(cfg: Any) -> Any:
    from pcbench.train.config import config_identity_sha256, run_content
    from pcbench.train.config import config_sha256 as train_sha
    from pcbench.train.result import FitResult, SplitRoles

    oa = {"oa": 0.625, "macc": 0.5, "miou": 0.25, "class_names": ["a", "b"]}
    return FitResult(
        task="cls", dataset="modelnet40", model="pcbench.models.pct.PCT", seed=int(cfg.seed),
        config=run_content(cfg), config_sha256=train_sha(cfg), identity_sha256=config_identity_sha256(cfg),
        splits=SplitRoles.of("train", "val", "val"), metrics={"val": dict(oa), "test": dict(oa)},
        selection_metric="oa", selected_value=0.625, best_epoch=1, epochs=2, steps=2, params=123,
        class_names=["a", "b"], provenance={"threads": 3, "device": "cpu (Fake CPU)", "precision": "fp32",
                                            "git_commit": "abc", "torch_version": "2.13.0+cpu"},
        extra={"splits": {"train": "train", "val": "val", "test": "test"}})  # stale extras are not read


def test_a_cell_claimed_by_a_live_runner_is_skipped_and_a_dead_ones_claim_taken_over(
        t3: tuple[Any, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    import pcbench.train
    from pcbench.bench.runner import run_cell

    bench, cells = t3
    cell = cells["objects-pct_cls-s0"]
    sha, db, job = _cell_sha(cell), tmp_path / "r.sqlite", tmp_path / "job" / cell.name
    other = _sleeper()
    try:
        with ResultStore(db) as s:
            assert s.claim(sha, pid=other.pid) == ("claimed", None)
        monkeypatch.setattr(pcbench.train, "fit", lambda cfg: pytest.fail("a claimed cell must not train"))
        res = run_cell(bench, cell, job, db)
        assert res["status"] == "claimed"
        assert f"claimed by pid {other.pid} on host {socket.gethostname()}" in capsys.readouterr().out
        with ResultStore(db) as s:
            assert len(s) == 0 and [c["pid"] for c in s.claims()] == [other.pid]
    finally:
        other.kill()
        other.wait()

    def diverged(cfg: Any) -> Any:
        raise FloatingPointError("training diverged: 19 of 20 steps skipped (non-finite loss); weights are not finite")

    monkeypatch.setattr(pcbench.train, "fit", diverged)
    res = run_cell(bench, cell, job, db)
    assert res["status"] == "failed"
    assert f"took over the claim of pid {other.pid}" in capsys.readouterr().out
    with ResultStore(db) as s:
        (rec,) = s.records()
        assert s.claims() == []  # released when the cell ended
    assert rec["status"] == "failed" and rec["config_sha256"] == sha
    assert rec["error"] == "FloatingPointError: training diverged: 19 of 20 steps skipped (non-finite loss); " \
                           "weights are not finite"
    assert "Traceback" in Path(rec["log_path"]).read_text()


def test_record_comes_from_the_typed_result_and_supersede_spares_live_rows(
        t3: tuple[Any, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pcbench.train
    from pcbench.bench import runner
    from pcbench.bench.record import record_from_metrics
    from pcbench.bench.store import process_start
    from pcbench.bench.suite import cell_config, cell_identity

    bench, cells = t3
    cell = cells["objects-pct_cls-s0"]
    db, job = tmp_path / "r.sqlite", tmp_path / "job" / cell.name
    identity = cell_identity(cell_config(cell, "/unused")[0], cell.probe)
    live, dead = _sleeper(), _sleeper()
    dead.kill()
    dead.wait()
    try:
        with ResultStore(db) as s:  # rows left "running" by two earlier attempts: one still runs, one is gone
            rows = {}
            for name, p in (("live", live), ("dead", dead)):
                rows[name] = s.add(record_from_metrics({"pid": p.pid, "pid_start": process_start(p.pid)},
                                                       cell=cell.name, config=identity, status="running"))
        seen: dict[str, Any] = {}
        monkeypatch.setattr(pcbench.train, "fit", lambda cfg: seen.setdefault("result", _fake_result(cfg)))

        def probe(cfg: Any, run_dir: Path, settings: dict[str, Any], fp32_score: float | None = None) -> dict:
            seen["fp32_score"] = fp32_score
            return {"device": "cpu", "params": 123, "score_fp32": fp32_score}

        monkeypatch.setattr(runner, "probe_cell", probe)
        res = runner.run_cell(bench, cell, job, db)
        with ResultStore(db) as s:
            rec = s.get(res["result_id"])
            assert s.get(rows["live"])["status"] == "running"  # its process still runs: not superseded
            assert s.get(rows["dead"])["status"] == "failed" and "interrupted" in s.get(rows["dead"])["error"]
            assert s.claims() == []
    finally:
        live.kill()
        live.wait()
    assert res["status"] == "finished" and rec["status"] == "finished"
    assert seen["fp32_score"] == 0.625  # fit's test figure, not a second evaluation
    result = seen["result"]
    assert rec["splits"] == {"train": "train", "val": "val", "final": "val", "final_role": "val"}
    assert rec["identity_sha256"] == result.identity_sha256 == config_identity_sha256(result.config)
    assert rec["num_threads"] == 3 and rec["device"] == "cpu" and rec["model"] == "pct_cls"
    assert rec["dataset"] == "synthetic-modelnet40" and rec["test"]["oa"] == 0.625 and rec["class_names"] == ["a", "b"]
    assert rec["git_commit"] == "abc" and rec["probe"]["score_fp32"] == 0.625
    extra = rec["extra"]
    for renamed in ("trainer_device", "device", "model", "dataset", "threads", "splits", "trainer_identity_sha256"):
        assert renamed not in extra, renamed
    assert extra["precision"] == "fp32" and extra["selected_value"] == 0.625 and extra["pid"] == os.getpid()


def test_a_swept_cell_records_its_values_and_every_probed_cell_the_machine_load(
        t3: tuple[Any, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    import pcbench.train
    from pcbench.bench import runner

    bench, cells = t3
    plain = cells["objects-pct_cls-s0"]
    swept = dataclasses.replace(plain, name="objects-pct_cls-k16-s0", variant="k=16", sweep={"model.k": 16},
                                overrides=(*plain.overrides, "model.k=16"))
    readings = iter([(1.5, 1.0, 1.0), (3.25, 2.0, 1.0), (0.5, 0.5, 0.5), (0.25, 0.5, 0.5)])
    monkeypatch.setattr(os, "getloadavg", lambda: next(readings))  # before and after each probe
    monkeypatch.setattr(pcbench.train, "fit", _fake_result)
    seen: dict[str, Any] = {}

    def probe(cfg: Any, run_dir: Path, settings: dict[str, Any], fp32_score: float | None = None) -> dict:
        seen.setdefault("k", []).append(cfg.model.k)
        return {"device": "cpu"}

    monkeypatch.setattr(runner, "probe_cell", probe)
    db = tmp_path / "r.sqlite"
    ids = [runner.run_cell(bench, c, tmp_path / "job" / c.name, db)["result_id"] for c in (swept, plain)]
    with ResultStore.open_readonly(db) as s:
        rec, rec_plain = (s.get(i) for i in ids)
    assert seen["k"] == [16, 8] and rec["status"] == rec_plain["status"] == "finished"
    assert rec["extra"]["sweep"] == {"model.k": 16} and rec["variant"] == "k=16"
    assert "sweep" not in rec_plain["extra"]
    # the higher of the readings around the probe, and the machine's CPUs (the load average's scope)
    assert rec["extra"]["load_avg"] == 3.25 and rec_plain["extra"]["load_avg"] == 0.5
    assert rec["extra"]["cpu_count"] == rec_plain["extra"]["cpu_count"] == os.cpu_count()
    assert rec["config_sha256"] != rec_plain["config_sha256"]


RUNNER_SCRIPT = """
import os, sys, time
from joblib import Parallel, delayed

def job(arm, folder):
    from pcbench.bench.launchers import die_with_runner
    how = die_with_runner() if arm else "unarmed"
    with open(os.path.join(folder, f"{os.getpid()}.{how}"), "w") as f:
        f.write(str(os.getppid()))
    time.sleep(120)

os.environ["PCBENCH_RUNNER_PID"] = str(os.getpid())
Parallel(n_jobs=2, backend="loky")(delayed(job)(arm, sys.argv[1]) for arm in (True, False))
"""


def test_joblib_workers_die_with_a_killed_runner(tmp_path: Path) -> None:
    import signal
    import time

    from pcbench.bench.store import process_alive

    (tmp_path / "runner.py").write_text(RUNNER_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    log = open(tmp_path / "runner.log", "w")  # noqa: SIM115 - loky's leak warnings of the killed runner go here
    runner = subprocess.Popen([sys.executable, str(tmp_path / "runner.py"), str(tmp_path)], env=env, stderr=log)
    workers: dict[str, int] = {}
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 and time.monotonic() < deadline and runner.poll() is None:
            marks = [p for p in tmp_path.glob("*.*") if p.suffix in (".prctl", ".watchdog", ".unarmed")]
            workers = {p.suffix[1:]: int(p.stem) for p in marks}
            time.sleep(0.2)
        assert len(workers) == 2, (workers, runner.poll(), (tmp_path / "runner.log").read_text())
        armed = workers.get("prctl", workers.get("watchdog"))
        assert armed is not None and all(int(p.read_text()) == runner.pid for p in marks)  # the runner's children
        runner.send_signal(signal.SIGKILL)
        runner.wait()
        deadline = time.monotonic() + 20
        while process_alive(armed) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not process_alive(armed), "the armed worker outlived its runner"
        # the control: a worker that did not arm lives on as an orphan (the defect this guards against)
        assert process_alive(workers["unarmed"])
    finally:
        runner.kill()
        runner.wait()
        log.close()
        for pid in workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_job_uses_the_config_its_plan_composed(t3: tuple[Any, dict[str, Any]], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import pcbench.train
    from pcbench.bench import runner

    bench, cells = t3
    plan = runner.make_plan(bench, None)
    sweep = tmp_path / "sweep"
    plan.write(sweep, 0.0, False, str(tmp_path / "r.sqlite"))
    cell = cells["objects-pct_cls-s0"]
    progress = runner.Progress(sweep)
    cfg, choices = progress.config(cell)
    assert choices["model"] == "pct_cls" and OmegaConf.is_struct(cfg)
    assert config_sha256(runner.cell_identity(cfg, cell.probe)) == plan.hashes[cell.name]
    other = runner.Cell(**{**cell.__dict__, "overrides": (*cell.overrides, "optim.lr=0.5")})
    assert progress.config(other) is None  # a plan of other overrides is not this cell's

    monkeypatch.setattr(runner, "cell_config", lambda *a: pytest.fail("the job composed the config again"))
    monkeypatch.setattr(pcbench.train, "fit", _fake_result)
    monkeypatch.setattr(runner, "probe_cell", lambda *a, **k: {"device": "cpu"})
    res = runner.run_cell(bench, cell, sweep / cell.name, tmp_path / "r.sqlite", progress)
    with ResultStore.open_readonly(tmp_path / "r.sqlite") as s:
        rec = s.get(res["result_id"])
    assert rec["status"] == "finished" and rec["config_sha256"] == plan.hashes[cell.name]
    assert res["run_dir"] == str(sweep / cell.name / plan.hashes[cell.name][:12])


@pytest.mark.slow
def test_parallel_suite_killed_leaves_no_worker_training(conf: Path, tmp_path: Path) -> None:
    """SIGKILL of pcbench-bench with the joblib launcher: its worker (running a long cell) exits too, and the
    next run takes the dead worker's claim over."""
    import signal
    import time

    from pcbench.bench.store import process_alive

    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(PCBENCH_CONF=str(conf), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pcbench.bench", f"out={out}", "suite=t3", "hydra/launcher=parallel",
           "hydra.launcher.n_jobs=2", "threads=1", "only=[objects-pct_cls-s0]",
           'overrides=["trainer.max_steps=100000","trainer.max_epochs=1000"]']
    with open(tmp_path / "runner.log", "w") as log:
        runner = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    worker = None
    try:
        deadline = time.monotonic() + 300
        while worker is None and time.monotonic() < deadline and runner.poll() is None:
            time.sleep(0.5)
            if (out / "results.sqlite").is_file():
                with contextlib.suppress(ValueError), ResultStore.open_readonly(out / "results.sqlite") as s:
                    running = s.records(status="running")
                    worker = running[0]["extra"]["pid"] if running else None
        assert worker is not None and worker != runner.pid, (tmp_path / "runner.log").read_text()
        runner.send_signal(signal.SIGKILL)
        runner.wait()
        deadline = time.monotonic() + 30
        while process_alive(worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not process_alive(worker), "the joblib worker outlived its killed runner"
        with ResultStore.open_readonly(out / "results.sqlite") as s:
            assert [c["pid"] for c in s.claims()] == [worker]  # left behind by the dead worker
    finally:
        runner.kill()
        runner.wait()
        if worker is not None and process_alive(worker):
            os.kill(worker, signal.SIGKILL)


@pytest.mark.slow
def test_two_runners_on_one_store_train_each_cell_once(conf: Path, tmp_path: Path) -> None:
    """The issue's repro: two pcbench-bench on one store, data already prepared. One trains the cell, the other
    says who has it; one finished row per config hash, nobody's live row marked failed."""
    import time

    out = tmp_path / "out"
    out.mkdir()
    prep = bench(conf, out, "suite=t3", "only=[objects-crash-s0]")  # prepares the data (the cell itself fails)
    assert prep.returncode == 1, prep.stdout + prep.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(PCBENCH_CONF=str(conf), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pcbench.bench", f"out={out}", "suite=t3", "hydra/launcher=basic", "threads=1",
           "only=[objects-pct_cls-s0]", 'overrides=["trainer.max_steps=40","trainer.max_epochs=40"]']
    runners = []
    for k in range(2):
        runners.append(subprocess.Popen(cmd, env=env, stdout=open(tmp_path / f"r{k}.log", "w"),  # noqa: SIM115
                                        stderr=subprocess.STDOUT, cwd=tmp_path))
        time.sleep(1.0)
    codes = [r.wait(timeout=600) for r in runners]
    logs = [(tmp_path / f"r{k}.log").read_text() for k in range(2)]
    assert codes == [0, 0], logs
    recs = [r for r in records(out) if r["cell"] == "objects-pct_cls-s0"]
    assert [r["status"] for r in recs] == ["finished"], recs
    trained = [k for k in range(2) if "objects-pct_cls-s0: finished in" in logs[k]]
    assert len(trained) == 1, logs
    other = logs[1 - trained[0]]
    assert re.search(r"objects-pct_cls-s0: (claimed by pid \d+ on host|finished earlier)", other), other
    if "claimed by pid" in other:
        assert "0 finished, 0 failed, 1 being run by another runner, 0 not run" in other
