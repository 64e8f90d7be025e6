"""pcbench-train / pcbench-eval through the real command line, from a working directory outside the repo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pcbench.train.metrics import confusion_matrix, metrics_from_confusion

from ._cli import FAST, SCENE, TINY, metrics, run
from .conftest import real_or_synthetic

METRIC_KEYS = {"val", "test", "best_epoch", "selected_on", "epochs", "steps", "train_samples_per_s",
               "eval_samples_per_s", "peak_memory_mib", "params", "wall_s", "seed", "config_sha256",
               "dataset_manifest_sha256", "pcbench_version", "git_commit", "torch_version", "device", "malloc"}
SPLIT_KEYS = {"oa", "macc", "miou", "iou_per_class", "acc_per_class"}

# (model config, data kind): every family, real samples (where ../shared has them) and synthetic sets
FAMILIES = [
    ("pointnet2_ssg_cls", "mn40_real"),
    ("pct_cls", "sonn_syn"),
    ("ptv1_seg", "scannet_real"),
    ("ptv2_seg", "scannet_syn"),
    ("ptv3_cls", "mn40_syn"),
    ("minkunet14a_seg", "scannet_real"),
    ("spunet_base_seg", "scannet_syn"),
]
SLOW_FAMILIES = [("pointnet2_ssg_seg", "scannet_real"), ("pct_cls", "mn40_real"), ("ptv1_cls", "mn40_real"),
                 ("ptv2_cls", "sonn_syn"), ("ptv3_seg", "scannet_real"), ("minkunet14a_seg", "scannet_syn"),
                 ("spunet_base_seg", "scannet_real"), ("sparse_resnet_cls", "mn40_syn"),
                 ("pointnet2_ssg_seg", "scannet_syn"), ("ptv1_seg", "scannet_syn"), ("ptv3_cls", "mn40_real")]


def data_args(prepared: dict[str, Path], kind: str) -> list[str]:
    """Overrides selecting a prepared folder; real sample folders have only one scene / one object per class."""
    if kind.startswith("mn40"):
        root, _ = real_or_synthetic(prepared, "mn40_real", "mn40_syn") if kind == "mn40_real" else (
            prepared["mn40_syn"], False)
        return ["data=modelnet40", f"data.root={root}", "data.val_fraction=0.3", "trainer.batch_size=2"]
    if kind == "sonn_syn":
        return ["data=scanobjectnn_pb_t50_rs", f"data.root={prepared['sonn_syn']}", "trainer.batch_size=4",
                "data.num_points=256"]
    root, real = real_or_synthetic(prepared, "scannet_real", "scannet_syn") if kind == "scannet_real" else (
        prepared["scannet_syn"], False)
    splits = ["data.splits.val=train", "data.splits.test=train"] if real else []  # one real scene, in train
    return ["data=scannet20", f"data.root={root}", "trainer.batch_size=1", *SCENE, *splits]


def check_run_dir(run_dir: Path, task: str) -> dict:
    for rel in (".hydra/config.yaml", "train.log", "metrics.csv", "checkpoints/last.pt", "checkpoints/best.pt",
                "metrics.json"):
        assert (run_dir / rel).is_file(), f"{rel} missing in {sorted(p.name for p in run_dir.iterdir())}"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard event file"
    m = metrics(run_dir)
    assert METRIC_KEYS <= set(m), f"missing {METRIC_KEYS - set(m)}"
    for split in ("val", "test"):
        assert SPLIT_KEYS <= set(m[split])
        for k in ("oa", "macc", "miou"):
            assert m[split][k] is None or 0.0 <= m[split][k] <= 1.0
        assert len(m[split]["iou_per_class"]) == m["num_classes"]
    assert m["selected_on"] == "val" and m["task"] == task and m["params"] > 0 and m["steps"] >= 1
    rows = (run_dir / "metrics.csv").read_text().strip().splitlines()
    assert rows[0].startswith("epoch,step,train_loss") and len(rows) == m["epochs"] + 1
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)  # not trusted code: tensors only
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "progress", "config"} <= set(ckpt)
    return m


@pytest.mark.parametrize(("model", "kind"), FAMILIES)
def test_every_family_trains_and_evaluates_through_the_cli(model: str, kind: str, prepared: dict[str, Path],
                                                           tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    p = run([*data_args(prepared, kind), f"model={model}", *TINY[model], *FAST, f"hydra.run.dir={run_dir}"],
            cwd=tmp_path)
    m = check_run_dir(run_dir, model.rsplit("_", 1)[1])
    assert m["malloc"] == "env"  # the CLI re-ran itself with the tuned glibc allocator
    # stdout is a pipe here: periodic log lines instead of a progress bar
    assert "epoch 0 step 1/2 loss" in p.stdout and "\r" not in p.stdout


@pytest.mark.slow
@pytest.mark.parametrize(("model", "kind"), SLOW_FAMILIES)
def test_more_family_data_pairs(model: str, kind: str, prepared: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run([*data_args(prepared, kind), f"model={model}", *TINY[model], *FAST, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    check_run_dir(run_dir, model.rsplit("_", 1)[1])


def _recompute(npz: Path, num_classes: int, ignore: int) -> dict:
    z = np.load(npz)
    assert z["offset"][-1] == len(z["pred"]) == len(z["label"]) and len(z["names"]) == len(z["offset"])
    cm = confusion_matrix(torch.from_numpy(z["pred"]), torch.from_numpy(z["label"]), num_classes, ignore)
    return metrics_from_confusion(cm)


def test_predictions_reproduce_metrics_and_vote_is_separate(prepared: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    model = "pointnet2_ssg_cls"
    run([*data_args(prepared, "mn40_syn"), f"model={model}", *TINY[model], *FAST, "eval.save_predictions=true",
         "eval.report_test_selected=true", "tta=rotate_y12", "logger.tensorboard=false",
         f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    m = metrics(run_dir)
    again = _recompute(run_dir / "predictions_test.npz", m["num_classes"], m["ignore_index"])
    for k in ("oa", "macc", "miou", "iou_per_class", "acc_per_class"):
        assert again[k] == m["test"][k]
    assert again["count"] == 40  # every synthetic test object (5 classes x 8), once
    assert m["test_vote"]["passes"] == 12 and "oa" in m["test_vote"]
    assert "optimistic" in m["test_selected"]["note"]
    assert m["val_split"]["stratified"] and m["val_split"]["fraction"] == 0.3


def test_scene_predictions_cover_every_original_vertex(prepared: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    model = "minkunet14a_seg"
    run([*data_args(prepared, "scannet_syn"), f"model={model}", *TINY[model], *FAST, "eval.save_predictions=true",
         "eval.max_points=1500", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    m = metrics(run_dir)
    manifest = json.loads((prepared["scannet_syn"] / "manifest.json").read_text())
    z = np.load(run_dir / "predictions_test.npz")
    want = {s: manifest["scenes"][s]["num_points"] for s in manifest["splits"]["val"]["scenes"]}
    got = dict(zip(z["names"].tolist(), np.diff(np.concatenate([[0], z["offset"]])).tolist(), strict=True))
    assert got == want  # metrics on every original vertex (test = val for ScanNet), crops of 1500 points
    again = _recompute(run_dir / "predictions_test.npz", m["num_classes"], m["ignore_index"])
    assert again["miou"] == m["test"]["miou"] and again["iou_per_class"] == m["test"]["iou_per_class"]
    assert m["splits"]["test"] == "val"


def test_eval_cli_and_scannet_submission_files(prepared: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    model = "spunet_base_seg"
    run([*data_args(prepared, "scannet_syn"), f"model={model}", *TINY[model], *FAST, "logger.tensorboard=false",
         f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    m = metrics(run_dir)
    ckpt = run_dir / "checkpoints" / "best.pt"
    run([f"checkpoint={ckpt}", "eval.split=val"], cwd=tmp_path, tool="pcbench-eval")
    ev = json.loads((run_dir / "eval_val.json").read_text())
    assert ev["val"]["miou"] == pytest.approx(m["val"]["miou"], abs=1e-12)
    sub = tmp_path / "submission"
    run([f"checkpoint={ckpt}", "eval.split=test", f"eval.submission_dir={sub}"], cwd=tmp_path, tool="pcbench-eval")
    manifest = json.loads((prepared["scannet_syn"] / "manifest.json").read_text())
    nyu40 = set(manifest["label_sets"]["scannet20"]["source_ids"])
    scenes = manifest["splits"]["test"]["scenes"]
    assert sorted(p.name for p in sub.iterdir()) == sorted(f"{s}.txt" for s in scenes)
    for s in scenes:
        lines = (sub / f"{s}.txt").read_text().splitlines()
        assert len(lines) == manifest["scenes"][s]["num_points"]  # one id per original vertex
        assert {int(v) for v in lines} <= nyu40


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def test_resume_after_sigkill_is_bit_identical(prepared: dict[str, Path], tmp_path: Path) -> None:
    model = "pointnet2_ssg_cls"
    common = [*data_args(prepared, "mn40_syn"), f"model={model}", *TINY[model], "trainer.num_workers=1",
              "trainer.max_epochs=2", "trainer.checkpoint_every_n_steps=3", "trainer.threads=1",
              "logger.tensorboard=false", "model.dropout=0.5"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    run([*common, f"hydra.run.dir={full}"], cwd=tmp_path)
    # killed with SIGKILL right after step 7 (mid-epoch 0: 15 steps per epoch); last checkpoint at step 6
    p = run([*common, "fault.sigkill_after_step=7", f"hydra.run.dir={cut}"], cwd=tmp_path, check=False)
    assert p.returncode == -9, p.stderr[-2000:]
    assert not (cut / "metrics.json").exists()
    assert torch.load(cut / "checkpoints" / "last.pt", weights_only=True)["progress"]["step"] == 6
    run([*common, "resume=true", f"hydra.run.dir={cut}"], cwd=tmp_path)
    for name in ("last.pt", "best.pt"):
        a, b = _weights(full / "checkpoints" / name), _weights(cut / "checkpoints" / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}:{k} differs after resume"
    ma, mb = metrics(full), metrics(cut)
    for k in ("val", "test", "best_epoch", "steps", "epochs"):
        assert ma[k] == mb[k]
    assert (full / "metrics.csv").read_text().splitlines()[1].split(",")[:5] == \
        (cut / "metrics.csv").read_text().splitlines()[1].split(",")[:5]


def test_run_dir_is_not_overwritten_without_resume(prepared: dict[str, Path], tmp_path: Path) -> None:
    model = "pointnet2_ssg_cls"
    args = [*data_args(prepared, "mn40_syn"), f"model={model}", *TINY[model], *FAST, "logger.tensorboard=false",
            f"hydra.run.dir={tmp_path / 'run'}"]
    run(args, cwd=tmp_path)
    p = run(args, cwd=tmp_path, check=False)
    assert p.returncode == 2 and "resume=true" in p.stderr
