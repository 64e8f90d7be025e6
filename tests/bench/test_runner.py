"""pcbench-bench end to end through the command line: a small suite into a temporary store and report, a crashing
cell recorded while the suite goes on, a re-run that skips finished cells, a killed suite that resumes, missing
sample data explained. The suite is written into a copy of conf/ (PCBENCH_CONF) so the shipped ones stay as
they are; its cells are tiny models for two optimizer steps on data that the real preparer makes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pcbench.bench.record import config_sha256
from pcbench.bench.store import ResultStore
from pcbench.train.config import config_dir

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
    crash = recs["objects-crash-s0"]
    assert crash["status"] == "failed" and "trainer.batch_size=1000" in crash["error"]
    assert "Traceback" in Path(crash["log_path"]).read_text()
    assert "objects-crash-s0: FAILED after" in p.stdout and crash["log_path"] in p.stdout
    report = out / "report"
    md = (report / "leaderboard.md").read_text()
    assert "## synthetic-modelnet40 — test" in md and "## Failed cells" in md and "trainer.batch_size=1000" in md
    assert re.search(r"\| \d \| pointnet2_ssg_cls \| t3: pointnet2_ssg_cls \| pcbench variant \|", md)
    assert re.search(r"\| \d \| pct_cls \| t3: pct_cls \| pcbench variant \|", md)
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
    assert "suite=smoke needs the real sample files of ../shared/data" in p.stderr
    assert "without them run suite=quickstart" in p.stderr
