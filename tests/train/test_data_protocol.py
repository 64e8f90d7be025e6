"""Data side of the trainer: channels and ignore index from the dataset, the val hold-out, the batch sampler."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pcbench.data import ModelNetDataset, ScanNetDataset, ScanObjectNNDataset
from pcbench.train import compose
from pcbench.train.data import build_data, split_dataset, stratified_holdout
from pcbench.train.distributed import GlobalBatchSampler

from ._cli import FAST, SCENE, TINY, run


def test_in_channels_and_ignore_index_come_from_the_dataset(prepared: dict[str, Path]) -> None:
    assert ModelNetDataset(prepared["mn40_syn"], "train").in_channels == 6
    assert ModelNetDataset(prepared["mn40_syn"], "train", use_normals=False).in_channels == 3
    assert ScanObjectNNDataset(prepared["sonn_syn"], "train").in_channels == 3
    sn = ScanNetDataset(prepared["scannet_syn"], "train", feat_keys=("coord", "color", "normal"))
    assert sn.in_channels == 9 and sn.ignore_index == -1
    assert sn[0]["feat"].shape[1] == sn.in_channels
    with pytest.raises(ValueError, match="feat key 'rgb' is not stored"):
        _ = ScanNetDataset(prepared["scannet_syn"], "train", feat_keys=("rgb",)).in_channels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stratified_holdout_is_proportional_seeded_and_disjoint(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.choice(7, size=503, p=[0.4, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05])
    held = stratified_holdout(labels, 0.1, seed=5)
    assert len(held) == round(0.1 * 503) and len(np.unique(held)) == len(held)
    for c in range(7):  # each class within one sample of its share
        assert abs((labels[held] == c).sum() - 0.1 * (labels == c).sum()) < 1.0
    np.testing.assert_array_equal(held, stratified_holdout(labels, 0.1, seed=5))
    assert not np.array_equal(held, stratified_holdout(labels, 0.1, seed=6))


def test_build_data_holds_out_val_from_train(prepared: dict[str, Path], tmp_path: Path) -> None:
    cfg = compose([f"data.root={prepared['mn40_syn']}", "data.val_fraction=0.2"], run_dir=tmp_path)
    d = build_data(cfg)
    train_idx, val_idx = set(d.train.indices), set(d.val.indices)
    assert not train_idx & val_idx and len(train_idx | val_idx) == 120 and len(val_idx) == 24
    assert d.info["val"]["stratified"] and d.info["val"]["seed"] == 0
    assert d.in_channels == 6 and d.num_classes == 40 and d.ignore_index == -1


def test_ranks_together_see_the_single_process_batches() -> None:
    single = GlobalBatchSampler(37, 8, seed=3)
    ranks = [GlobalBatchSampler(37, 8, seed=3, rank=r, world_size=4) for r in range(4)]
    for s in (single, *ranks):
        s.set_epoch(2)
    merged = [sum(parts, []) for parts in zip(*ranks, strict=True)]
    assert merged == list(single) and len(merged) == 37 // 8
    skip = GlobalBatchSampler(37, 8, seed=3)
    skip.set_epoch(2, start_batch=2)
    assert list(skip) == list(single)[2:]
    with pytest.raises(ValueError, match="not divisible by the 3 ranks"):
        GlobalBatchSampler(37, 8, seed=3, world_size=3)


def test_loop_repeats_training_only(prepared: dict[str, Path], tmp_path: Path) -> None:
    # regression: data.py merged a loop-free node over cfg (merge never deletes a key), so val/test kept loop
    root = prepared["scannet_syn"]
    once = build_data(compose(["data=scannet20", f"data.root={root}"], run_dir=tmp_path))
    cfg = compose(["data=scannet20", f"data.root={root}", "data.dataset.loop=3"], run_dir=tmp_path)
    looped = build_data(cfg)
    assert len(looped.train) == 3 * len(once.train)
    assert len(looped.val) == len(once.val) and len(looped.test) == len(once.test)
    names = [looped.test[i]["name"] for i in range(len(looped.test))]
    assert len(set(names)) == len(names)
    assert cfg.data.dataset.loop == 3  # the run's config keeps its training repeat count
    assert len(split_dataset(cfg, "train")) == len(once.train)


@pytest.mark.slow  # trains one step and runs pcbench-eval (~1 min on the shared CPUs)
def test_eval_cli_writes_each_scene_once_under_loop(prepared: dict[str, Path], tmp_path: Path) -> None:
    # regression: `pcbench-eval ... data.dataset.loop=3` wrote every scene 3 times into predictions_<split>.npz
    run_dir = tmp_path / "run"
    model = "spunet_base_seg"
    root = prepared["scannet_syn"]
    run(["data=scannet20", f"data.root={root}", "trainer.batch_size=1", *SCENE, f"model={model}", *TINY[model],
         *FAST, "trainer.max_steps=1", "trainer.max_epochs=1", "logger.tensorboard=false", "data.dataset.loop=3",
         f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    m = json.loads((run_dir / "metrics.json").read_text())
    p = run([f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}", "eval.split=val", "eval.save_predictions=true",
             "data.dataset.loop=3"], cwd=tmp_path, tool="pcbench-eval")
    assert "val 2/2 samples (2/2 batches, 1 pass)" in p.stdout  # progress on the console, named by the split
    assert "val 2/2 samples" in (run_dir / "train.log").read_text()  # and in the training log
    manifest = json.loads((root / "manifest.json").read_text())
    scenes = manifest["splits"]["val"]["scenes"]
    z = np.load(run_dir / "predictions_val.npz")
    assert sorted(z["names"].tolist()) == sorted(scenes)
    assert int(z["offset"][-1]) == sum(manifest["scenes"][s]["num_points"] for s in scenes)
    ev = json.loads((run_dir / "eval_val.json").read_text())
    assert ev["val"]["miou"] == pytest.approx(m["val"]["miou"], abs=1e-12)  # training's val also read each once


@pytest.mark.parametrize("variant", ["pb_t25", "pb_t25_r", "pb_t50_r", "pb_t50_rs", "obj_bg"])
def test_scanobjectnn_holdout_states_it_is_not_grouped_by_object(variant: str, prepared: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    # regression: the PB_* hold-out (perturbed copies of a held-out object stay in train) was recorded as a plain
    # stratified split; metrics.json's val_split now says why it cannot be grouped and that val is optimistic
    cfg = compose([f"data=scanobjectnn_{variant}", f"data.root={prepared['sonn_syn']}",
                   ], run_dir=tmp_path)
    info = build_data(cfg, check=False).info["val"]
    if variant == "obj_bg":  # one scan per object: nothing to group
        assert "caveat" not in info
        return
    assert "not grouped by source object" in info["caveat"] and "optimistic" in info["caveat"]
    assert "no object or scene id" in info["caveat"] and info["stratified"]
