"""Loop options: CPU bf16 autocast, accumulation, clipping, label smoothing, class weights, EMA, schedules."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from pcbench.train import compose, fit
from pcbench.train.optim import cosine_with_warmup, multistep, step_decay

from ._cli import TINY

MODEL = "pointnet2_ssg_cls"


def _fit(prepared: dict[str, Path], run_dir: Path, *extra: str) -> dict:
    return fit(compose(["data=modelnet40", f"data.root={prepared['mn40_syn']}", f"model={MODEL}", *TINY[MODEL],
                        "trainer.batch_size=4", "trainer.max_steps=2", "trainer.num_workers=0",
                        "logger.tensorboard=false", "trainer.limit_eval_batches=1", *extra], run_dir=run_dir)).to_dict()


def test_bf16_autocast_on_cpu_with_every_loop_option(prepared: dict[str, Path], tmp_path: Path) -> None:
    m = _fit(prepared, tmp_path / "run", "trainer.precision=bf16", "trainer.device_batch_size=2",
             "trainer.gradient_clip_val=1.0", "trainer.label_smoothing=0.1",
             "trainer.class_weights=inverse_log_frequency", "trainer.ema_decay=0.9", "sched=onecycle")
    assert m["precision"] == "bf16" and m["steps"] == 2 and m["skipped_steps"] == 0
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["ema"] is not None and ckpt["progress"]["batch"] == 0  # 2 steps x 2 micro-batches = one epoch cut
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)["model"]
    assert not all(torch.equal(best[k], ckpt["model"][k]) for k in best if best[k].is_floating_point())  # EMA weights


def test_schedules_follow_their_formulas() -> None:
    def lrs(make, steps: int) -> list[float]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = make(opt)
        out = []
        for _ in range(steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    cos = lrs(lambda o: cosine_with_warmup(o, 10, warmup_steps=2, warmup_start_factor=0.0), 10)
    assert cos[:3] == pytest.approx([0.0, 0.5, 1.0]) and cos[-1] == pytest.approx(0.5 * (1 + torch.cos(
        torch.tensor(7 / 8 * torch.pi)).item()))
    assert lrs(lambda o: multistep(o, 10, milestones=[0.5], gamma=0.1), 10) == pytest.approx([1.0] * 5 + [0.1] * 5)
    assert lrs(lambda o: step_decay(o, 10, step_size=3, gamma=0.5, min_lr=0.2), 10) == pytest.approx(
        [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.2])
    with pytest.raises(ValueError, match="covers the whole run"):
        lrs(lambda o: cosine_with_warmup(o, 4, warmup_steps=4), 1)


@pytest.mark.slow
def test_torch_compile_option(prepared: dict[str, Path], tmp_path: Path) -> None:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile's CPU backend (inductor) needs a C compiler; none on PATH")
    m = _fit(prepared, tmp_path / "run", "trainer.compile=true")
    assert m["steps"] == 2 and m["test"]["oa"] is not None
