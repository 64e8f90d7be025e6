"""Every paper recipe in conf/experiment/ composes and trains for a few steps on small prepared data.

Also checks that fit() can be called repeatedly in one process (no state left behind).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from pcbench.train import compose, fit
from pcbench.train.config import group_options

from ._cli import prep

EXPERIMENTS = group_options("experiment")


@pytest.fixture(scope="module")
def roots(prepared: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """Prepared synthetic folder for a data config name (ScanObjectNN variants prepared on demand)."""
    cache: dict[str, Path] = {}

    def root_for(data_name: str) -> Path:
        if data_name.startswith("modelnet"):
            return prepared["mn40_syn"] if data_name == "modelnet40" else cache.setdefault(
                data_name, prep("modelnet10", tmp_path_factory.mktemp("mn10")))
        if data_name.startswith("scannet"):
            return prepared["scannet_syn"]
        variant = data_name.removeprefix("scanobjectnn_").upper()
        if variant == "PB_T50_RS":
            return prepared["sonn_syn"]
        if variant not in cache:
            cache[variant] = prep("scanobjectnn", tmp_path_factory.mktemp(variant.lower()), "synthetic",
                                  f"variant={variant}")
        return cache[variant]
    return root_for


def test_there_is_at_least_one_recipe() -> None:
    assert "pointnet2_ssg_modelnet40" in EXPERIMENTS


# The scene recipes build the full published models (37-46M parameters): a minute or more each on 2 CPU cores.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if "scannet" in n else n for n in EXPERIMENTS])
def test_recipe_runs_a_few_steps(name: str, roots, tmp_path: Path) -> None:
    data_name = compose([f"experiment={name}"], run_dir=tmp_path).data.name
    small = ["trainer.max_steps=2", "trainer.batch_size=4", "trainer.num_workers=0", "logger.tensorboard=false",
             "trainer.accelerator=cpu", "trainer.strategy=single", "trainer.precision=fp32", "trainer.threads=1",
             "tta=none", "trainer.limit_eval_batches=1"]
    if data_name.startswith("scannet"):
        small += ["trainer.batch_size=1", "trainer.device_batch_size=1", "data.train_max_points=4000", "data.grid_size=0.05"]
        if name != "minkunet34c_scannet20":
            # one recipe (the fastest scene model) keeps the final test pass with fragment voting; the others
            # evaluate test like val, since voting multiplies the forward passes by the points per voxel
            small.append("data.transforms.test=${data.transforms.val}")
    cfg = compose([f"experiment={name}", f"data.root={roots(data_name)}", *small], run_dir=tmp_path / "run")
    threads = torch.get_num_threads()
    cwd = os.getcwd()
    handlers = list(logging.getLogger("pcbench.train").handlers)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    m = fit(cfg).to_dict()
    assert torch.equal(torch.get_rng_state(), before)  # the caller's generator state is given back
    assert m["steps"] == 2 and json.loads((tmp_path / "run" / "metrics.json").read_text()) == m
    assert torch.get_num_threads() == threads and os.getcwd() == cwd  # nothing left behind for the caller
    assert logging.getLogger("pcbench.train").handlers == handlers
    m2 = fit(compose([f"experiment={name}", f"data.root={roots(data_name)}", *small], run_dir=tmp_path / "run2")).to_dict()
    assert m2["val"] == m["val"] and m2["test"] == m["test"]  # same seed, same process: same result
