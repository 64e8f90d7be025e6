"""torchrun with two CPU processes (gloo) equals one process with the same global batch."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from ._cli import BIN, TINY, env, metrics, run


def test_torchrun_two_ranks_equal_one_process(prepared: dict[str, Path], tmp_path: Path) -> None:
    if shutil.which("torchrun", path=str(BIN)) is None:
        pytest.skip("torchrun is not installed next to this python")
    # sparse ResNet: plain BatchNorm layers, synchronised across ranks by trainer.sync_batchnorm. SGD: Adam divides
    # by sqrt(v) ~ 0 on its first steps, which blows float32 summation-order noise (1e-7) up to 1e-5.
    model = "sparse_resnet_cls"
    common = ["data=modelnet40", f"data.root={prepared['mn40_syn']}", "data.val_fraction=0.2", f"model={model}",
              *TINY[model], "trainer.batch_size=4", "trainer.max_steps=5", "trainer.max_epochs=2",
              "trainer.num_workers=0", "trainer.threads=1", "logger.tensorboard=false", "optim=sgd", "optim.lr=0.05",
              "trainer.accelerator=cpu", "eval.save_predictions=true"]
    single, cwd = tmp_path / "single", tmp_path / "cwd"
    cwd.mkdir()
    run([*common, f"hydra.run.dir={single}"], cwd=tmp_path)
    # no hydra.run.dir: each rank would make its own timestamped folder; rank 0 must choose one for both
    p = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node=2", "--master_port=29533", "-m", "pcbench.train",
                        *common, "trainer=ddp", "trainer.sync_batchnorm=true"],
                       cwd=cwd, env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    made = list((cwd / "outputs" / "train").iterdir())
    assert len(made) == 1, made  # one run directory for all ranks
    multi = made[0]
    ms, mm = metrics(single), metrics(multi)
    assert mm["world_size"] == 2 and ms["world_size"] == 1
    assert ms["steps"] == mm["steps"] == 5
    a = torch.load(single / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(multi / "checkpoints" / "last.pt", weights_only=True)["model"]
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=f"{k} differs")
        else:
            assert torch.equal(a[k], b[k]), k
    for split in ("val", "test"):
        assert mm[split]["count"] == ms[split]["count"]
        assert mm[split]["oa"] == pytest.approx(ms[split]["oa"])
    assert (multi / ".hydra" / "config.yaml").is_file() and (multi / "train.log").read_text().count("run dir") == 1
