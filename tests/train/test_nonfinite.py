"""A non-finite loss is skipped and reported instead of stepping the optimizer (and stops the run past a limit)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pcbench.train import compose, fit

from ._cli import TINY

NAN_WEIGHTS = "trainer.class_weights=[" + ",".join(["nan"] * 40) + "]"


def _cfg(prepared: dict[str, Path], run_dir: Path, *extra: str):
    model = "pointnet2_ssg_cls"
    return compose(["data=modelnet40", f"data.root={prepared['mn40_syn']}", f"model={model}", *TINY[model],
                    "trainer.batch_size=4", "trainer.max_steps=3", "trainer.num_workers=0", "optim=adam",
                    "logger.tensorboard=false", "trainer.limit_eval_batches=1", NAN_WEIGHTS, *extra], run_dir=run_dir)


def test_nan_loss_steps_are_skipped_and_counted(prepared: dict[str, Path], tmp_path: Path) -> None:
    m = fit(_cfg(prepared, tmp_path / "run", "trainer.max_skipped_fraction=1.0")).to_dict()
    assert m["steps"] == 3 and m["skipped_steps"] == 3
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["optimizer"]["state"] == {}  # Adam never stepped: no moment estimates exist
    log = (tmp_path / "run" / "train.log").read_text()
    assert "step 1: non-finite loss; the step is skipped (1 skipped so far)" in log
    # no finite step in the window: the loss shown is nan, never 0
    assert "train loss nan" in log and "loss 0.0000" not in log
    assert (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1].split(",")[2] == "nan"


def test_too_many_skipped_steps_stop_the_run(prepared: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(FloatingPointError, match=r"lower optim.lr, set trainer.gradient_clip_val"):
        fit(_cfg(prepared, tmp_path / "run", "trainer.max_skipped_steps=1"))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gpu_mixed_precision_trains(prepared: dict[str, Path], tmp_path: Path, precision: str) -> None:
    model = "ptv3_cls"
    m = fit(compose(["data=modelnet40", f"data.root={prepared['mn40_syn']}", f"model={model}", *TINY[model],
                     "trainer=gpu", f"trainer.precision={precision}", "trainer.batch_size=4", "trainer.max_steps=4",
                     "trainer.num_workers=0", "logger.tensorboard=false"], run_dir=tmp_path / "run")).to_dict()
    assert m["precision"] == precision and m["skipped_steps"] <= 1 and m["test"]["oa"] is not None
    assert m["device"] != "cpu" and m["peak_memory_mib"] > 0
