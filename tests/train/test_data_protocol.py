"""Data side of the trainer: channels and ignore index from the dataset, the val hold-out, the batch sampler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pcbench.data import ModelNetDataset, ScanNetDataset, ScanObjectNNDataset
from pcbench.train import compose
from pcbench.train.data import build_data, stratified_holdout
from pcbench.train.distributed import GlobalBatchSampler


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
