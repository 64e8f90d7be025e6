"""What the final evaluation leaves behind (issues 16 item 5, 17 sections 1 and 3): the resampling payload,
plain and voted predictions, confusion matrices, probabilities, the per-class table, TensorBoard and metrics.csv
test figures, the ScanNet submission from the cited pass, preflight and recipe-data fidelity, ModelNet-C."""

from __future__ import annotations

import csv
import hashlib
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pcbench.bench.record import record_from_result
from pcbench.bench.stats import load_payload
from pcbench.data import corruptions as mc
from pcbench.ops import PointBatch
from pcbench.train import build_run, compose, evaluate_split, fit
from pcbench.train.errors import ConfigError
from pcbench.train.metrics import metrics_from_confusion
from pcbench.train.result import FitResult
from pcbench.train.trainer import evaluate

from ._cli import FAST, SCENE, TINY

CLS = ["model=pointnet2_ssg_cls", *TINY["pointnet2_ssg_cls"], *FAST, "trainer.batch_size=8", "logger.tensorboard=true"]


def _compose(run_dir: Path, *overrides: str) -> Any:
    return compose(list(overrides), run_dir=run_dir)


def _close(payload_metrics: dict[str, float], recorded: dict[str, Any]) -> None:
    for k in ("oa", "macc", "miou"):
        assert payload_metrics[k] == pytest.approx(recorded[k], abs=1e-12), k


@pytest.fixture(scope="module")
def cls_run(prepared: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FitResult, Any]:
    """One tiny classifier fit (xyz only, 4 rotation votes, predictions and probabilities kept, ModelNet-C)."""
    run_dir = tmp_path_factory.mktemp("cls") / "run"
    cfg = _compose(run_dir, f"data.root={prepared['mn40_syn']}", *CLS, "data.dataset.use_normals=false",
                   "tta=rotate_z4", "eval.save_predictions=true", "eval.save_probabilities=true",
                   "eval.corruptions=modelnet_c")
    return run_dir, fit(cfg), cfg


def test_classification_fit_keeps_a_payload_equal_to_its_test_metrics(cls_run: tuple[Path, FitResult, Any]) -> None:
    run_dir, result, _ = cls_run
    ref = result.extra["resample"]
    assert ref["path"] == "resample_test.npz"
    assert hashlib.sha256((run_dir / ref["path"]).read_bytes()).hexdigest() == ref["sha256"]
    payload = load_payload(run_dir / ref["path"], ref["sha256"])
    assert payload.task == "classification" and payload.n_items == result.metrics["test"]["count"]
    _close(payload.metrics(), result.metrics["test"])
    # the runner's record carries it, so the report (pcbench/bench/comparisons.py) finds it
    rec = record_from_result(result, cell="c", config={})
    assert rec["extra"]["resample"] == ref
    # metrics.json round trip keeps it in extra
    back = FitResult.from_dict(json.loads((run_dir / "metrics.json").read_text()))
    assert back.extra["resample"] == ref


def test_plain_and_voted_predictions_confusion_and_probabilities(cls_run: tuple[Path, FitResult, Any]) -> None:
    run_dir, result, _ = cls_run
    payload = load_payload(run_dir / "resample_test.npz")
    outputs = result.extra["outputs"]
    assert outputs["predictions_test"] == "predictions_test.npz"
    assert outputs["predictions_test_vote"] == "predictions_test_vote.npz"
    for proto in ("test", "test_vote"):
        with np.load(run_dir / outputs[f"predictions_{proto}"]) as z:
            pred, label, conf, prob = z["pred"], z["label"], z["confusion"], z["prob"]
        c = result.num_classes
        assert np.array_equal(conf, np.bincount(label * c + pred, minlength=c * c).reshape(c, c))
        assert np.array_equal(conf, np.load(run_dir / outputs[f"confusion_{proto}"]))
        ref = metrics_from_confusion(torch.from_numpy(conf))
        assert ref["oa"] == pytest.approx(result.metrics[proto]["oa"], abs=1e-12)
        assert prob.shape == (len(pred), c) and prob.dtype == np.float16
        assert np.allclose(prob.astype(np.float64).sum(1), 1.0, atol=1e-2)
        top2 = np.sort(prob.astype(np.float64), 1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 1e-2  # float16 can tie near-equal classes
        assert np.array_equal(prob.argmax(1)[clear], pred[clear])
        if proto == "test":
            assert np.array_equal(pred, payload.pred) and np.array_equal(label, payload.target)


def test_per_class_table_csv_and_tensorboard_hold_the_test_figures(cls_run: tuple[Path, FitResult, Any]) -> None:
    run_dir, result, _ = cls_run
    test = result.metrics["test"]
    log = (run_dir / "train.log").read_text()
    assert "test per class (checkpoint of epoch" in log and "test_vote per class" in log
    n = result.metrics["test"]["count"]
    assert f"test vote {n}/{n} samples" in log and "4 passes" in log  # the voted pass is named in its progress
    names = result.class_names

    def shown(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f}"

    row = next(ln.split() for ln in log.splitlines() if ln.startswith(names[0] + " "))
    assert row[-2:] == [shown(test["iou_per_class"][0]), shown(test["acc_per_class"][0])]
    assert f"{100 * test['miou']:7.2f}" in log
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    best = next(r for r in rows if int(r["epoch"]) == result.best_epoch)
    assert float(best["test_oa"]) == pytest.approx(test["oa"]) and float(best["test_miou"]) == pytest.approx(test["miou"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert acc.Scalars("test/oa")[-1].value == pytest.approx(test["oa"], abs=1e-6)
    assert "test_vote/oa" in tags
    defined = [n for n, v in zip(names, test["iou_per_class"], strict=True) if v is not None]
    assert {f"test_iou/{n}" for n in defined} <= set(tags)


def _key(coord: np.ndarray) -> tuple[int, float]:
    return len(coord), round(float(np.asarray(coord, dtype=np.float64).sum()), 3)


class _Lookup(torch.nn.Module):
    """A 'classifier' that knows exact clouds: the label of a cloud it was shown, class ``miss`` otherwise."""

    def __init__(self, table: dict[tuple[int, float], int], num_classes: int, miss: int) -> None:
        super().__init__()
        self.table, self.num_classes, self.miss = table, num_classes, miss

    def forward(self, batch: PointBatch) -> torch.Tensor:
        starts = [0, *batch.offset.tolist()]
        out = torch.zeros(len(starts) - 1, self.num_classes)
        for i in range(len(starts) - 1):
            cloud = batch.coord[starts[i]:starts[i + 1]].numpy()
            out[i, self.table.get(_key(cloud), self.miss)] = 1.0
        return out


def test_modelnet_c_figures_match_a_hand_corrupted_reference(prepared: dict[str, Path], tmp_path: Path) -> None:
    from pcbench.data import ModelNetDataset
    from pcbench.train.robustness import evaluate_corruptions

    cfg = _compose(tmp_path, f"data.root={prepared['mn40_syn']}", *CLS, "data.dataset.use_normals=false",
                   "eval.corruptions=modelnet_c", "eval.corruption_seed=7")
    ds = ModelNetDataset(str(cfg.data.root), "test", use_normals=False)
    raws = [ds.convert(ds.read(i)) for i in range(len(ds))]
    labels = [int(r["label"]) for r in raws]
    miss = int(np.argmin(np.bincount(labels, minlength=ds.num_classes)))  # rarely right when guessing
    # the model knows every other test cloud of two (kind, severity) pairs, corrupted by hand from the first
    # 1024 points with seed (corruption_seed, crc32(name)); everything else it misses
    known = {("drop_local", 3), ("add_global", 5)}
    table = {}
    for kind, sev in known:
        for r in raws[::2]:
            pts = mc.corrupt(r["coord"][:1024], kind, sev, (7, zlib.crc32(r["name"].encode()))).astype(np.float32)
            table[_key(pts)] = int(r["label"])
    run = build_run(cfg)
    run.model = _Lookup(table, ds.num_classes, miss)
    got = evaluate_corruptions(cfg, run, clean_oa=0.5)
    hits = sum(lab == miss for lab in labels)  # a miss is right when the cloud's class is `miss`
    for kind in mc.CORRUPTIONS:
        for sev in mc.SEVERITIES:
            if (kind, sev) in known:
                want = (len(raws[::2]) + sum(lab == miss for lab in labels[1::2])) / len(raws)
            else:
                want = hits / len(raws)
            assert got[kind][sev - 1] == pytest.approx(want, abs=1e-12), (kind, sev)
    oa = {k: got[k] for k in mc.CORRUPTIONS}
    assert got["clean_oa"] == 0.5
    assert got["mce"] == pytest.approx(mc.mce(oa)) and got["relative_mce"] == pytest.approx(mc.relative_mce(oa, 0.5))


def test_fit_records_modelnet_c_in_the_reports_format(cls_run: tuple[Path, FitResult, Any]) -> None:
    run_dir, result, _ = cls_run
    c = result.extra["corruptions"]
    assert set(c) == {*mc.CORRUPTIONS, "clean_oa", "mce", "relative_mce"}
    assert all(len(c[k]) == 5 and all(0 <= v <= 1 for v in c[k]) for k in mc.CORRUPTIONS)
    assert c["clean_oa"] == result.metrics["test"]["oa"]
    assert "regenerates" in result.extra["corruptions_note"]
    assert "released ModelNet-C h5 files are not read" in (run_dir / "train.log").read_text()
    rec = record_from_result(result, cell="c", config={})
    assert rec["extra"]["corruptions"] == c  # where pcbench/bench/leaderboard.py reads it


def test_evaluate_writes_both_predictions_and_keeps_the_runs_payload(cls_run: tuple[Path, FitResult, Any],
                                                                     tmp_path: Path) -> None:
    run_dir, result, cfg = cls_run
    before = (run_dir / "resample_test.npz").read_bytes()
    cfg2 = cfg.copy()
    cfg2.paths.run_dir = str(tmp_path)
    cfg2.eval.corruptions = "modelnet_c"
    cfg2.trainer.precision = "bf16"
    out = evaluate(cfg2, run_dir / "checkpoints" / "best.pt")
    assert out["precision"] == "fp32"  # evaluation in fp32 unless the recipe says otherwise
    assert out["test"]["oa"] == pytest.approx(result.metrics["test"]["oa"])
    assert out["corruptions"] == result.extra["corruptions"]  # deterministic corruptions
    assert (tmp_path / "predictions_test.npz").is_file() and (tmp_path / "predictions_test_vote.npz").is_file()
    assert out["resample"]["path"] == "resample_eval_test.npz"
    _close(load_payload(tmp_path / "resample_eval_test.npz", out["resample"]["sha256"]).metrics(), out["test"])
    assert (run_dir / "resample_test.npz").read_bytes() == before
    # regression: eval.autocast=train reached autocast_context as "train" (ValueError)
    cfg2.eval.autocast = "train"
    cfg2.eval.corruptions = None
    assert evaluate(cfg2, run_dir / "checkpoints" / "best.pt")["precision"] == "bf16"


class _Autocast(torch.nn.Module):
    """Wraps a model and records whether autocast was on in its forward passes."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, batch: PointBatch) -> torch.Tensor:
        self.seen.append(torch.is_autocast_enabled("cpu"))
        return self.inner(batch)


def test_evaluate_split_runs_fp32_unless_the_recipe_says(prepared: dict[str, Path], tmp_path: Path) -> None:
    # regression: evaluate_split evaluated under the training precision (bf16 here)
    base = [f"data.root={prepared['mn40_syn']}", *CLS, "trainer.precision=bf16", "trainer.accelerator=cpu"]
    for extra, want in (([], False), (["eval.autocast=train"], True), (["eval.autocast=bf16"], True)):
        cfg = _compose(tmp_path, *base, *extra)
        run = build_run(cfg)
        assert run.precision == "bf16"
        wrapped = _Autocast(run.model)
        evaluate_split(cfg, run, "test", model=wrapped, limit=1, progress=False)
        assert wrapped.seen and set(wrapped.seen) == {want}, extra


def test_preflight_refuses_once_listing_every_problem(prepared: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = _compose(run_dir, f"data.root={prepared['mn40_syn']}", *CLS, "trainer.batch_size=100000",
                   "data.splits.test=nope", "trainer.precision=fp16", "trainer.accelerator=cpu")
    with pytest.raises(ConfigError) as err:
        fit(cfg)
    msg = str(err.value)
    assert "3 problems" in msg
    assert "data.splits.test=nope is not a split" in msg and "trainer.batch_size=100000 exceeds" in msg
    assert "trainer.precision=fp16 needs a CUDA device" in msg
    assert "all together:" in msg and "trainer.precision=bf16" in msg
    assert not run_dir.exists()  # refused before the run dir was taken


def test_recipe_on_other_data_is_recorded_as_a_variant(prepared: dict[str, Path], tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    run_dir = tmp_path / "run"
    cfg = _compose(run_dir, "experiment=pointnet2_ssg_modelnet40", f"data.root={prepared['mn40_syn']}",
                   *TINY["pointnet2_ssg_cls"], *FAST, "trainer.batch_size=8", "trainer=cpu", "tta=none",
                   "data.dataset.use_normals=false")
    result = fit(cfg)
    assert result.recipe["recipe"] == "pointnet2_ssg_modelnet40"
    assert result.recipe["fidelity"] == "pcbench variant"
    reasons = result.recipe["fidelity_reasons"]
    assert len(reasons) >= 2 and any("options.sampling='first'" in r for r in reasons)
    assert "recorded as a pcbench variant" in (run_dir / "train.log").read_text()
    back = FitResult.from_dict(json.loads((run_dir / "metrics.json").read_text()))
    assert back.recipe == result.recipe


@pytest.fixture(scope="module")
def scene_run(prepared: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FitResult, Any]:
    run_dir = tmp_path_factory.mktemp("seg") / "run"
    cfg = _compose(run_dir, "data=scannet20", f"data.root={prepared['scannet_syn']}", "model=ptv1_seg",
                   *TINY["ptv1_seg"], *FAST, *SCENE, "trainer.batch_size=1", "eval.save_predictions=true")
    return run_dir, fit(cfg), cfg


def test_scene_fit_keeps_one_confusion_matrix_per_scene(scene_run: tuple[Path, FitResult, Any]) -> None:
    run_dir, result, _ = scene_run
    payload = load_payload(run_dir / result.extra["resample"]["path"], result.extra["resample"]["sha256"])
    assert payload.task == "segmentation"
    with np.load(run_dir / "predictions_test.npz") as z:
        names, offset, pred, label = list(z["names"]), z["offset"], z["pred"], z["label"]
    assert list(payload.items) == names and payload.n_items >= 1
    c = result.num_classes
    starts = [0, *offset[:-1].tolist()]
    for i, (a, b) in enumerate(zip(starts, offset.tolist(), strict=True)):
        keep = label[a:b] != result.ignore_index
        ref = np.bincount(label[a:b][keep] * c + pred[a:b][keep], minlength=c * c).reshape(c, c)
        assert np.array_equal(payload.confusion[i], ref), names[i]
    _close(payload.metrics(), result.metrics["test"])


def test_submission_comes_from_the_cited_pass(scene_run: tuple[Path, FitResult, Any], tmp_path: Path) -> None:
    run_dir, _, cfg = scene_run
    ckpt = run_dir / "checkpoints" / "best.pt"
    cfg2 = cfg.copy()
    cfg2.paths.run_dir = str(tmp_path)
    cfg2.eval.save_predictions = True
    cfg2.tta = compose(["tta=rotate_z4"], run_dir=tmp_path).tta
    ids = np.asarray(json.loads((Path(cfg.data.root) / "manifest.json").read_text())["label_sets"]["scannet20"]
                     ["source_ids"])
    for source, npz in (("auto", "predictions_test_vote.npz"), ("plain", "predictions_test.npz")):
        cfg2.eval.submission_from = source
        cfg2.eval.submission_dir = str(tmp_path / f"sub_{source}")
        out = evaluate(cfg2, ckpt)
        assert out["submission"]["from"] == ("vote" if source == "auto" else "plain")
        with np.load(tmp_path / npz) as z:
            name, end, pred = str(z["names"][0]), int(z["offset"][0]), z["pred"]
        written = np.loadtxt(tmp_path / f"sub_{source}" / f"{name}.txt", dtype=np.int64)
        assert np.array_equal(written, ids[pred[:end]])
    cfg2.tta = compose(["tta=none"], run_dir=tmp_path).tta
    cfg2.eval.submission_from = "vote"
    with pytest.raises(ConfigError, match="eval.submission_from=vote but tta has no passes"):
        evaluate(cfg2, ckpt)


def test_corruptions_are_refused_for_segmentation(prepared: dict[str, Path], tmp_path: Path) -> None:
    cfg = _compose(tmp_path / "run", "data=scannet20", f"data.root={prepared['scannet_syn']}", "model=ptv1_seg",
                   *TINY["ptv1_seg"], *FAST, *SCENE, "trainer.batch_size=1", "eval.corruptions=modelnet_c")
    with pytest.raises(ConfigError, match=r"eval.corruptions=modelnet_c evaluates a classifier .* segmentation"):
        fit(cfg)
    cfg = _compose(tmp_path / "run2", f"data.root={prepared['mn40_syn']}", *CLS, "eval.corruptions=modelnet_c")
    with pytest.raises(ConfigError, match=r"corrupts coordinates only, but the model reads \['normal'\]"):
        fit(cfg)


@pytest.mark.slow  # two pcbench-eval processes (~25 s on 2 shared cores); the same path runs in-process above
def test_pcbench_eval_corruptions_command_line(cls_run: tuple[Path, FitResult, Any],
                                               scene_run: tuple[Path, FitResult, Any], tmp_path: Path) -> None:
    from ._cli import run

    run_dir, result, _ = cls_run
    p = run([f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}", "eval.corruptions=modelnet_c",
             f"paths.run_dir={tmp_path}", "trainer.num_workers=0"], tmp_path, tool="pcbench-eval")
    assert "the released ModelNet-C h5 files are not read" in p.stdout
    out = json.loads((tmp_path / "eval_test.json").read_text())
    assert out["corruptions"] == result.extra["corruptions"] and "regenerates" in out["corruptions_note"]
    seg_dir = scene_run[0]
    p = run([f"checkpoint={seg_dir / 'checkpoints' / 'best.pt'}", "eval.corruptions=modelnet_c",
             f"paths.run_dir={tmp_path / 'seg'}"], tmp_path, tool="pcbench-eval", check=False)
    assert p.returncode == 2, p.stderr
    assert "evaluates a classifier" in p.stderr and "Traceback" not in p.stderr
