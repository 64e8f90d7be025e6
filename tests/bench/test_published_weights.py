"""Published weights as a suite (issue 19 item 4): a random-weight checkpoint in yanx27's PointNet++ SSG layout
goes through the registry's offline path (``file=``), is evaluated by ``pcbench-bench`` on prepared synthetic
ModelNet40 (no training), recorded with ``extra.published_weights`` and shown in the report's own section beside
the published figure with Δ, never ranked with a trained row of the same model."""

from __future__ import annotations

import csv
import io
import re
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from pcbench.bench.leaderboard import build_leaderboard
from pcbench.bench.record import config_sha256
from pcbench.bench.report import render_csv, render_markdown, render_weights_csv, write_report
from pcbench.bench.report_html import render_html
from pcbench.bench.suite import SuiteError, expand_suite
from pcbench.models.convert import file_sha256
from pcbench.models.zoo_registry import PUBLISHED
from pcbench.train.config import config_dir
from tests.bench.test_runner import bench, records
from tests.models.test_convert import _PointNet2Ref, _randomise

NAME = "pointnet2_ssg_cls.modelnet40.yanx27"
_TINY = ['model.num_samples=[32,8]', "model.max_neighbors=[[8],[8]]"]

SUITE = """
name: pw
seeds: [3, 4]
train: [trainer.num_workers=0, logger.tensorboard=false, trainer.max_steps=2, trainer.max_epochs=1,
        trainer.limit_eval_batches=1, "+data.dataset.feat_keys=[]"]
probe: {{batches: 1, warmup: 0, repeats: 1, latency_repeats: 1, bf16: false, int8: false, score: false}}
datasets:
  objects:
    data: modelnet40
    label: synthetic-modelnet40
    root: ${{data_dir}}/objects
    prep: [modelnet40, raw=synthetic]
    train: [data.num_points=64, trainer.batch_size=8, tta=rotate_y12]
models:
  pointnet2_ssg_cls:
    datasets: [objects]
    train: {tiny}
weights:
  ssg:
    name: {name}
    file: {file}
    datasets: [objects]
    train: {tiny}
  missing:
    name: {name}
    checkpoint: {missing}
    datasets: [objects]
    train: {tiny}
"""


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """yanx27's checkpoint layout (xyz-only SSG, 40 classes), random weights."""
    path = tmp_path_factory.mktemp("src") / "best_model.pth"
    torch.save({"epoch": 1, "model_state_dict": _randomise(_PointNet2Ref(False, False, 40), 5).state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def conf(tmp_path_factory: pytest.TempPathFactory, source: Path) -> Path:
    root = tmp_path_factory.mktemp("conf") / "conf"
    shutil.copytree(config_dir(), root)
    tiny = "[" + ", ".join(f'"{t}"' for t in _TINY) + "]"
    (root / "suite" / "pw.yaml").write_text(SUITE.format(name=NAME, file=source, tiny=tiny, missing=source.parent / "gone.pt"))
    return root


@pytest.fixture(scope="module")
def ran(conf: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("suite") / "out"
    return out, bench(conf, out, "suite=pw")


def _bench_cfg(suite: dict) -> OmegaConf:
    return OmegaConf.create({"suite": suite, "device": None, "overrides": None})


@pytest.mark.slow  # about 40 s: pcbench-prep of synthetic ModelNet40 and three cells
def test_published_weights_are_evaluated_recorded_and_reported_apart(ran, source: Path) -> None:
    out, p = ran
    assert p.returncode == 1, p.stdout + p.stderr  # the entry whose checkpoint is gone failed; the others ran
    recs = {r["cell"]: r for r in records(out)}
    # the trained entry runs per seed; each weights entry once (nothing is trained, the first seed)
    assert sorted(recs) == ["objects-missing-s3", "objects-pointnet2_ssg_cls-s3", "objects-pointnet2_ssg_cls-s4",
                            "objects-ssg-s3"]
    gone = recs["objects-missing-s3"]
    assert gone["status"] == "failed" and "gone.pt does not exist" in gone["error"], gone
    assert "objects-missing-s3: FAILED after" in p.stdout
    r = recs["objects-ssg-s3"]
    assert r["status"] == "finished" and r["model"] == "pointnet2_ssg_cls" and r["task"] == "cls", r
    flag = r["extra"]["published_weights"]
    entry = PUBLISHED[NAME]
    assert flag["name"] == NAME and flag["source"] == "yanx27" and flag["sha256"] == file_sha256(source)
    assert flag["published"] == {"metric": entry.metric, "value": entry.value, "protocol": entry.protocol,
                                 "source": entry.reference}
    assert r["config"]["weights"] == {"name": NAME, "file": str(source)} and "probe" not in r["config"]
    assert r["config_sha256"] == config_sha256(r["config"])
    assert r["epochs"] == 0 and r["steps"] == 0 and r["probe"] is None
    assert r["splits"]["final"] == "test" and r["splits"]["final_role"] == "test"
    assert 0 <= r["test"]["oa"] <= 1 and 0 <= r["test_vote"]["oa"] <= 1  # plain, and the 12 votes of rotate_y12
    for key in ("pcbench_version", "torch_version", "dataset_manifest_sha256", "hostname", "started_at"):
        assert r[key], key
    run_dir = Path(r["run_dir"])
    assert not (run_dir / "checkpoints").exists()  # nothing trained
    ckpt = Path(r["extra"]["checkpoint"])
    assert ckpt.parent == run_dir / "weights" and torch.load(ckpt, weights_only=True)["source"]["sha256"] == \
        file_sha256(source)
    # the recorded score is what pcbench's own evaluation gives for that checkpoint (eval_test.json, same run dir)
    import json

    assert json.loads((run_dir / "eval_test.json").read_text())["test"]["oa"] == r["test"]["oa"]

    md = (out / "report" / "leaderboard.md").read_text()
    section = md.split("## synthetic-modelnet40 — published weights, evaluated by pcbench")[1].split("\n## ")[0]
    ours = 100 * r["test"]["oa"]
    row = re.search(rf"\| {re.escape(NAME)} \| pointnet2_ssg_cls \| test \| ([\d.]+) OA \| ([\d.]+) \(overall "
                    r"accuracy\) \| ([+-][\d.]+) \|", section)
    assert row, section
    assert float(row[1]) == pytest.approx(ours, abs=0.006) and float(row[2]) == entry.value
    assert float(row[3]) == pytest.approx(ours - entry.value, abs=0.006)
    assert re.search(rf"\| {re.escape(NAME)} \| pointnet2_ssg_cls \| test_vote \| {100 * r['test_vote']['oa']:.2f} OA",
                     section), section
    # never ranked: the trained section holds the trained row only
    ranked = md.split("## synthetic-modelnet40 — test")[1].split("\n## ")[0]
    assert NAME not in ranked and "pointnet2_ssg_cls" in ranked


@pytest.mark.slow
def test_rerun_skips_a_finished_published_weights_cell(conf: Path, ran) -> None:
    out, _ = ran
    before = {x["result_id"] for x in records(out)}
    p = bench(conf, out, "suite=pw", "only=[objects-ssg-*]")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "suite pw: 1 cells, 1 finished earlier (skipped), 0 to run" in p.stdout
    assert {x["result_id"] for x in records(out)} == before


def test_leaderboard_keeps_published_weights_out_of_the_ranking(tmp_path: Path) -> None:
    base = {"status": "finished", "dataset": "d", "task": "cls", "model": "m", "config_sha256": "c",
            "identity_sha256": "i", "finished_at": "2026-01-01T00:00:00+00:00", "seed": 0}
    trained = {**base, "result_id": "t", "cell": "t", "test": {"oa": 0.5}}
    pub = {**base, "result_id": "p", "cell": "p", "identity_sha256": "j", "test": {"oa": 0.9},
           "test_vote": {"oa": 0.91}, "extra": {"published_weights": {
               "name": "w", "sha256": "ab", "published": {"metric": "overall accuracy", "value": 92.2,
                                                          "protocol": "x", "source": "y"}}}}
    board = build_leaderboard([trained, pub], resamples=0)
    assert [r.mean for r in board.rows] == [0.5] and board.rows[0].rank == 1
    assert [(w.protocol, w.score) for w in board.weights] == [("test", 0.9), ("test_vote", 0.91)]
    assert board.weights[0].delta == pytest.approx(90.0 - 92.2) and board.weights[1].delta == pytest.approx(-1.2)
    md = render_markdown(board)
    section = md.split("## d — published weights, evaluated by pcbench")[1].split("\n## ")[0]
    assert "| w | m | test | 90.00 OA | 92.20 (overall accuracy) | -2.20 | x; y | ab |" in section
    assert "| w | m | test_vote | 91.00 OA | 92.20 (overall accuracy) | -1.20 |" in section
    assert "| w |" not in md.split("## d — test")[1].split("\n## ")[0]  # not in the ranked table
    page = render_html(board)
    assert "d — published weights, evaluated by pcbench</h2>" in page and ">-2.20<" in page
    # the CSV: published weights in their own file (numbers stay numbers), never in the ranked leaderboard.csv
    rows = list(csv.DictReader(io.StringIO(render_weights_csv(board)), quoting=csv.QUOTE_NONNUMERIC))
    assert [(r["weights"], r["protocol"], r["score"], r["published_value"]) for r in rows] == \
        [("w", "test", 0.9, 92.2), ("w", "test_vote", 0.91, 92.2)]
    assert rows[0]["delta_points"] == pytest.approx(-2.2) and rows[0]["sha256"] == "ab"
    assert "\"w\"" not in render_csv(board)
    out = write_report([trained, pub], tmp_path / "rep")
    assert out["weights_csv"].read_text() == render_weights_csv(board)
    write_report([trained], tmp_path / "rep")  # a later report without them leaves no stale file
    assert not (tmp_path / "rep" / "published_weights.csv").exists()


def test_bad_weights_entries_are_named() -> None:
    d = {"objects": {"data": "modelnet40", "root": "/x"}}
    with pytest.raises(SuiteError, match=r"suite.weights.w.name='nope' is not a published checkpoint"):
        expand_suite(_bench_cfg({"name": "s", "seeds": [0], "datasets": d, "weights": {"w": {"name": "nope",
                                                                                           "datasets": ["objects"]}}}))
    with pytest.raises(SuiteError, match=r"suite.weights.w has unknown key\(s\) \['fiel'\]"):
        expand_suite(_bench_cfg({"name": "s", "seeds": [0], "datasets": d, "weights": {"w": {
            "name": NAME, "fiel": "/x", "datasets": ["objects"]}}}))
    with pytest.raises(SuiteError, match=r"suite.weights.w.datasets names 'other'"):
        expand_suite(_bench_cfg({"name": "s", "seeds": [0], "datasets": d, "weights": {"w": {
            "name": NAME, "datasets": ["other"]}}}))
    cells = expand_suite(_bench_cfg({"name": "s", "seeds": [1, 2], "datasets": d, "weights": {"w": {
        "name": NAME, "checkpoint": "/c.pt", "datasets": ["objects"]}}}))
    assert [(c.name, c.seed, c.weights) for c in cells] == [("objects-w-s1", 1, {"name": NAME, "checkpoint": "/c.pt"})]
    assert cells[0].overrides[:2] == ("model=pointnet2_ssg_cls", "data=modelnet40")


def test_not_convertible_weights_need_a_checkpoint_and_a_missing_checkpoint_is_named(tmp_path: Path) -> None:
    from pcbench.bench.runner import published_checkpoint

    d = {"objects": {"data": "modelnet40", "root": "/x"}}
    tpc = "pointnet2_ssg_cls.modelnet40.torch-pointcloud"
    assert not PUBLISHED[tpc].convertible
    with pytest.raises(SuiteError, match=r"suite.weights.w.name=.*no converter from .*checkpoint=<a pcbench checkpoint>"):
        expand_suite(_bench_cfg({"name": "s", "seeds": [0], "datasets": d, "weights": {"w": {
            "name": tpc, "datasets": ["objects"]}}}))
    with pytest.raises(SuiteError, match=r"checkpoint=.*nope.pt does not exist; give a file `pcbench-weights fetch"):
        published_checkpoint({"name": NAME, "checkpoint": str(tmp_path / "nope.pt")}, tmp_path)


def test_released_ptv3_weights_build_the_legacy_network_they_were_trained_with(monkeypatch) -> None:
    # PT-v3m1's released weights need Pointcept v1.5.1's block chaining (xcpe_legacy, equal to torch-pointcloud's
    # legacy network in tests/models/test_equivalence_reference.py): suites and create_model apply it
    import pcbench.models.zoo as zoo

    name = "ptv3_seg.scannet20.torch-pointcloud"
    assert PUBLISHED[name].convertible and dict(PUBLISHED[name].model_overrides) == {"xcpe_legacy": True}
    cells = expand_suite(_bench_cfg({"name": "s", "seeds": [0], "datasets": {
        "scenes": {"data": "scannet20", "root": "/x"}}, "weights": {"w": {"name": name, "datasets": ["scenes"]}}}))
    assert cells[0].overrides[:3] == ("model=ptv3_seg", "model.xcpe_legacy=true", "data=scannet20")

    seen: list[dict] = []

    def capture(cfg, model_name, overrides):  # noqa: ANN001, ANN202 - stops before the 46M-parameter build
        seen.append(dict(overrides))
        raise RuntimeError("captured")

    monkeypatch.setattr(zoo, "_apply_overrides", capture)
    for kwargs, want in (({}, {"xcpe_legacy": True}), ({"xcpe_legacy": False}, {"xcpe_legacy": False})):
        with pytest.raises(RuntimeError, match="captured"):
            zoo.create_model("ptv3_seg", 6, 20, weights=name, **kwargs)
        assert seen[-1] == want  # the caller's own setting wins


def test_the_shipped_published_weights_suite_composes(tmp_path: Path) -> None:
    from pcbench.bench.suite import cell_config, compose_bench

    bench = compose_bench(["suite=published_modelnet40", f"data_dir={tmp_path}"])
    cells = expand_suite(bench)
    assert {c.weights["name"] for c in cells} == {n for n, w in PUBLISHED.items()
                                                  if w.dataset == "modelnet40" and w.convertible}
    for c in cells:
        cfg, choices = cell_config(c, tmp_path / c.name)
        assert choices["model"] == PUBLISHED[c.weights["name"]].model_config and choices["tta"] == "rotate_y12"
        assert cfg.data.root == str(tmp_path / "modelnet40")
