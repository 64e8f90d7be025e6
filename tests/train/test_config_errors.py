"""Every configuration error is reported before the first step, naming what to change (CLI and Python API)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pcbench.train import ConfigError, compose, fit
from pcbench.train.config import config_dir, group_options

from ._cli import run


def _err(args: list[str], cwd: Path) -> str:
    p = run(args, cwd=cwd, check=False)
    assert p.returncode != 0, p.stdout[-2000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    return p.stderr


def test_unknown_group_option_lists_the_valid_ones(tmp_path: Path) -> None:
    msg = _err(["model=pointnet3", f"hydra.run.dir={tmp_path / 'r'}"], tmp_path)
    assert "Could not find 'model/pointnet3'" in msg
    for option in ("pointnet2_ssg_cls", "ptv3_seg", "minkunet34c_seg"):
        assert option in msg


def test_unknown_key_lists_the_keys_of_its_node(tmp_path: Path) -> None:
    msg = _err(["trainer.max_epoch=3", f"hydra.run.dir={tmp_path / 'r'}"], tmp_path)
    assert "'trainer' has no key 'max_epoch'" in msg and "max_epochs" in msg


def test_missing_data_root_prints_the_prep_command(tmp_path: Path) -> None:
    msg = _err([f"hydra.run.dir={tmp_path / 'r'}"], tmp_path)
    assert "data.root is not set" in msg and "pcbench-prep modelnet40 raw=" in msg


def test_unprepared_root_prints_the_prep_command(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = _err(["data=scannet20", f"data.root={empty}", "model=minkunet14a_seg", f"hydra.run.dir={tmp_path / 'r'}"],
               tmp_path)
    assert "not a prepared dataset (no manifest.json)" in msg
    assert f"pcbench-prep scannet raw=<ScanNet v2 folder with scans/> out={empty}" in msg


@pytest.fixture
def cfg_for(prepared: dict[str, Path], tmp_path: Path):
    def make(*overrides: str):
        return compose(list(overrides), run_dir=tmp_path / "run")
    return make


def test_manifest_must_match_the_data_config(prepared: dict[str, Path], cfg_for) -> None:
    with pytest.raises(ConfigError, match=r"data=modelnet10 expects a prepared folder with dataset=modelnet10, "
                                          r"but data.root=.* has dataset='modelnet40'"):
        fit(cfg_for("data=modelnet10", f"data.root={prepared['mn40_syn']}"))
    with pytest.raises(ConfigError, match=r"options.variant=OBJ_BG.*has options.variant='PB_T50_RS'"):
        fit(cfg_for("data=scanobjectnn_obj_bg", f"data.root={prepared['sonn_syn']}", "model=pct_cls"))


def test_missing_feature_channel_names_the_fix(prepared: dict[str, Path], tmp_path: Path, cfg_for) -> None:
    root = shutil.copytree(prepared["mn40_syn"], tmp_path / "mn40")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["keys"] = ["coord", "label"]  # as if prepared with normals=false
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"feat_keys includes 'normal'.*data.dataset.use_normals=false"):
        fit(cfg_for(f"data.root={root}"))


def test_model_and_data_tasks_must_agree(prepared: dict[str, Path], cfg_for) -> None:
    with pytest.raises(ConfigError, match=r"is a segmentation model but data=modelnet40 is a classification dataset;"
                                          r" choose a model=..._cls config \(options: \['pct_cls'"):
        fit(cfg_for(f"data.root={prepared['mn40_syn']}", "model=ptv3_seg"))
    with pytest.raises(ConfigError, match="is a classification model but data=scannet20 is a segmentation dataset"):
        fit(cfg_for("data=scannet20", f"data.root={prepared['scannet_syn']}", "model=ptv3_cls"))


@pytest.mark.parametrize(("override", "match"), [
    ("trainer.precision=fp8", r"trainer.precision='fp8' is unknown"),
    ("trainer.precision=fp16", r"fp16 needs a CUDA device"),
    ("trainer.batch_size=1000", r"trainer.batch_size=1000 exceeds the \d+ training samples"),
    ("trainer.strategy=ddp", r"launch with `torchrun --nproc_per_node=N -m pcbench.train trainer=ddp"),
    ("trainer.class_weights=[1,2]", r"class_weights has 2 entries but the dataset has 40 classes"),
    # fit's preflight lists this with its override before check_data would name it alone
    ("data.splits.test=nope", r"data.splits.test=nope is not a split of data.root=.* \(splits with samples: "
                              r"\['test', 'train'\]\) -> data.splits.test=test"),
    ("trainer.accelerator=tpu", r"trainer.accelerator='tpu' is unknown"),
])
def test_trainer_options_are_checked(prepared: dict[str, Path], cfg_for, override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        fit(cfg_for(f"data.root={prepared['mn40_syn']}", "trainer.num_workers=0", override))


def test_every_group_option_composes() -> None:
    for group in ("data", "model", "optim", "sched", "aug", "tta", "trainer", "logger", "paths", "debug"):
        for option in group_options(group):
            cfg = compose([f"{group}={option}"], run_dir="/tmp/x")
            assert cfg is not None
    assert (config_dir() / "train.yaml").is_file()
