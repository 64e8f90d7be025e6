"""Global batch vs per-device batch: micro-batch accumulation gives the gradient of the mean over the global batch
(Pointcept's W GPUs, each with its own mean loss, averaged by DDP), and BatchNorm / Mix3D see micro-batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from pcbench.ops.batch import PointBatch
from pcbench.train import compose, fit
from pcbench.train.data import batch_layout
from pcbench.train.distributed import GlobalBatchSampler
from pcbench.train.errors import ConfigError
from pcbench.train.trainer import _loss

from ._cli import TINY, metrics, run

HERE = __name__  # the name pytest imported this module under, so the probes record into this copy


class ProbeCls(nn.Module):
    """logits = W @ (per-cloud mean of coord) + b, in float64; optional BatchNorm on the means; records inputs."""

    seen: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, in_channels: int, num_classes: int, bn: bool = False, **_: Any) -> None:
        super().__init__()
        self.lin = nn.Linear(3, num_classes).double()
        self.bn = nn.BatchNorm1d(3, affine=False).double() if bn else None
        self.task = "cls"

    def forward(self, batch: PointBatch) -> torch.Tensor:  # noqa: D102
        starts = torch.cat([batch.offset.new_zeros(1), batch.offset[:-1]])
        means = torch.stack([batch.coord[s:e].double().mean(0) for s, e in zip(starts.tolist(),
                                                                                 batch.offset.tolist(), strict=True)])
        if self.training:
            ProbeCls.seen.append({"x": means.detach().clone(), "y": batch.label.clone(),
                                  "w": self.lin.weight.detach().clone(), "b": self.lin.bias.detach().clone()})
        return self.lin(self.bn(means) if self.bn is not None else means)


class ProbeSeg(nn.Module):
    """Per-point logits from coord (float64); records the clouds of every training forward pass."""

    seen: ClassVar[list[int]] = []

    def __init__(self, in_channels: int, num_classes: int, **_: Any) -> None:
        super().__init__()
        self.lin = nn.Linear(3, num_classes).double()
        self.task = "seg"

    def forward(self, batch: PointBatch) -> torch.Tensor:  # noqa: D102
        if self.training:
            ProbeSeg.seen.append(int(batch.offset.numel()))
        return self.lin(batch.coord.double())


LR = 0.5


def _fit_cls(prepared: dict[str, Path], run_dir: Path, *extra: str) -> dict:
    ProbeCls.seen.clear()
    return fit(compose(["data=modelnet40", f"data.root={prepared['mn40_syn']}", "model=pointnet2_ssg_cls",
                        f"model._target_={HERE}.ProbeCls", "optim=sgd", f"optim.lr={LR}", "optim.momentum=0",
                        "optim.weight_decay=0", "optim.nesterov=false", "sched=step", "trainer.batch_size=4",
                        "trainer.max_steps=1", "trainer.num_workers=0", "logger.tensorboard=false",
                        "trainer.limit_eval_batches=1", *extra], run_dir=run_dir)).to_dict()


def _softmax_ce_grad(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Closed-form gradient of the MEAN cross-entropy of a linear softmax classifier: (P - Y)^T X / n."""
    p = torch.softmax(x @ w.T + b, dim=1)
    p[torch.arange(len(y)), y] -= 1.0
    return p.T @ x / len(y), p.sum(0) / len(y)


@pytest.mark.parametrize("device_batch", [4, 2, 1])
def test_accumulated_gradient_is_the_mean_over_the_global_batch(prepared: dict[str, Path], tmp_path: Path,
                                                                 device_batch: int) -> None:
    m = _fit_cls(prepared, tmp_path / "run", f"trainer.device_batch_size={device_batch}")
    seen = list(ProbeCls.seen)
    assert [len(s["y"]) for s in seen] == [device_batch] * (4 // device_batch)  # forward passes of the device batch
    assert m["batch"] == {"global": 4, "device": device_batch, "micro_batches_per_step": 4 // device_batch,
                          "ranks": 1}
    x = torch.cat([s["x"] for s in seen])
    y = torch.cat([s["y"] for s in seen])
    w0, b0 = seen[0]["w"], seen[0]["b"]
    assert all(torch.equal(s["w"], w0) for s in seen)  # no optimizer step inside the window
    gw, gb = _softmax_ce_grad(x, y, w0, b0)  # every sample counts 1/4, however the batch was cut
    w1 = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]
    torch.testing.assert_close(w1["lin.weight"], w0 - LR * gw, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(w1["lin.bias"], b0 - LR * gb, rtol=1e-6, atol=1e-7)


def test_one_device_and_micro_batches_see_the_same_global_batch(prepared: dict[str, Path], tmp_path: Path) -> None:
    _fit_cls(prepared, tmp_path / "a", "trainer.device_batch_size=4")
    whole = torch.cat([s["x"] for s in ProbeCls.seen])
    _fit_cls(prepared, tmp_path / "b", "trainer.device_batch_size=2")
    parts = torch.cat([s["x"] for s in ProbeCls.seen])
    torch.testing.assert_close(parts, whole)  # same samples, same order: micro-batches cut the global batch
    wa = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)["model"]
    torch.testing.assert_close(wb["lin.weight"], wa["lin.weight"], rtol=1e-6, atol=1e-7)


def test_batchnorm_sees_micro_batch_statistics(prepared: dict[str, Path], tmp_path: Path) -> None:
    _fit_cls(prepared, tmp_path / "run", "trainer.device_batch_size=2", "+model.bn=true")
    seen = list(ProbeCls.seen)
    assert len(seen) == 2
    mom = 0.1  # torch's default BatchNorm momentum: running = (1 - m) running + m batch_mean
    expect = mom * (1 - mom) * seen[0]["x"].mean(0) + mom * seen[1]["x"].mean(0)
    pooled = mom * torch.cat([s["x"] for s in seen]).mean(0)  # what one forward over the global batch gives
    got = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]["bn.running_mean"]
    torch.testing.assert_close(got, expect)
    assert not torch.allclose(got, pooled)


def test_mix3d_pairs_clouds_within_micro_batches_only(prepared: dict[str, Path], tmp_path: Path) -> None:
    def run(device_batch: int, name: str) -> list[int]:
        ProbeSeg.seen.clear()
        fit(compose(["data=scannet20", f"data.root={prepared['scannet_syn']}", "model=pointnet2_ssg_seg",
                     f"model._target_={HERE}.ProbeSeg", "trainer.batch_size=4", f"trainer.device_batch_size={device_batch}",
                     "trainer.mix_prob=1.0", "trainer.max_steps=1", "trainer.num_workers=0",
                     "logger.tensorboard=false", "trainer.limit_eval_batches=1"],
                    run_dir=tmp_path / name))
        return list(ProbeSeg.seen)

    assert run(4, "one") == [2]  # 4 scenes in one pass: pairs (0,1), (2,3)
    progress = torch.load(tmp_path / "one" / "checkpoints" / "last.pt", weights_only=True)["progress"]
    assert progress["train_samples"] == 4  # scenes counted before Mix3D merged them
    assert run(2, "two") == [1, 1]  # each micro-batch of 2 scenes is one pair
    assert run(1, "four") == [1, 1, 1, 1]  # a lone scene stays alone (no pairing across micro-batches)


def _linear_seg_grad(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(x @ w.T, dim=1)
    p[torch.arange(len(y)), y] -= 1.0
    return p.T @ x / len(y)


def test_scene_loss_is_the_mean_of_per_device_means_as_pointcept() -> None:
    # two scenes of 3 and 7 points: Pointcept on 2 GPUs (1 scene each) averages the two scene means; pooling all
    # 10 points would weight the large scene 7:3 instead of 1:1
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(7, 4, generator=g, dtype=torch.float64)]
    ys = [torch.tensor([0, 2, 1]), torch.tensor([1, 1, 0, 2, 2, 0, 1])]
    w0 = torch.randn(3, 4, generator=g, dtype=torch.float64)
    w = w0.clone().requires_grad_(True)
    for x, y in zip(xs, ys, strict=True):  # the trainer's accumulation on one device: 2 micro-batches, each loss / 2
        (_loss(x @ w.T, y, None, -1, 0.0) / 2).backward()
    reference = (_linear_seg_grad(xs[0], ys[0], w0) + _linear_seg_grad(xs[1], ys[1], w0)) / 2
    torch.testing.assert_close(w.grad, reference.float().double(), rtol=1e-5, atol=1e-6)
    pooled = _linear_seg_grad(torch.cat(xs), torch.cat(ys), w0)
    assert not torch.allclose(w.grad, pooled, atol=1e-3)


def test_loss_of_a_micro_batch_with_only_ignored_points_is_zero() -> None:
    logits = torch.randn(5, 3, requires_grad=True)
    loss = _loss(logits, torch.full((5,), -1), None, -1, 0.0)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.count_nonzero(logits.grad) == 0


def test_sampler_layouts_cut_the_global_batch_into_the_same_groups() -> None:
    one = list(GlobalBatchSampler(40, 12, seed=5, micro_batches=4))  # 1 device x 4 micro-batches of 3
    four = [list(GlobalBatchSampler(40, 12, seed=5, rank=r, world_size=4)) for r in range(4)]  # 4 ranks x 3
    two = [list(GlobalBatchSampler(40, 12, seed=5, rank=r, world_size=2, micro_batches=2)) for r in range(2)]
    plain = list(GlobalBatchSampler(40, 12, seed=5))
    assert len(one) == 12 and all(len(b) == 3 for b in one)
    for step in range(3):
        groups = one[4 * step:4 * step + 4]
        assert [four[r][step] for r in range(4)] == groups
        assert [two[r][2 * step + m] for r in range(2) for m in range(2)] == groups
        assert sum(groups, []) == plain[step]
    resumed = GlobalBatchSampler(40, 12, seed=5, micro_batches=4)
    resumed.set_epoch(0, 6)  # the micro-batch position (TrainState.batch) is what a resume skips
    assert list(resumed) == one[6:]
    limited = GlobalBatchSampler(40, 12, seed=5, micro_batches=4, limit_batches=2)
    assert limited.num_steps() == 2 and list(limited) == one[:8]


@pytest.mark.parametrize(("batch", "device", "world", "expect"), [
    (12, None, 1, (12, 1)), (12, None, 4, (3, 1)), (12, 3, 1, (3, 4)), (12, 3, 2, (3, 2)), (12, 3, 4, (3, 1))])
def test_batch_layout(batch: int, device: int | None, world: int, expect: tuple[int, int]) -> None:
    t = OmegaConf.create({"batch_size": batch, "device_batch_size": device, "accumulate_grad_batches": None})
    assert batch_layout(t, world) == expect


def test_batch_layout_errors_name_the_fix() -> None:
    def t(**kw: Any) -> Any:
        return OmegaConf.create({"batch_size": 12, "device_batch_size": None, "accumulate_grad_batches": None, **kw})

    with pytest.raises(ConfigError, match=r"trainer.device_batch_size=5 does not divide .*batch_size=12"):
        batch_layout(t(device_batch_size=5), 1)
    with pytest.raises(ConfigError, match=r"device_batch_size=3 does not divide .* over 8 rank"):
        batch_layout(t(batch_size=16, device_batch_size=3), 8)
    with pytest.raises(ConfigError, match=r"accumulate_grad_batches=2 is replaced by trainer.device_batch_size"):
        batch_layout(t(accumulate_grad_batches=2), 1)


@pytest.mark.slow
def test_resume_with_micro_batches_and_mix3d_is_bit_identical(prepared: dict[str, Path], tmp_path: Path) -> None:
    # a killed run resumes at its micro-batch position (TrainState.batch) with the same Mix3D draws
    model = "pointnet2_ssg_seg"
    common = ["data=scannet20", f"data.root={prepared['scannet_syn']}", f"model={model}", *TINY[model],
              "trainer.batch_size=4", "trainer.device_batch_size=2", "trainer.mix_prob=0.5", "trainer.max_steps=4",
              "trainer.checkpoint_every_n_steps=2", "trainer.num_workers=0", "trainer.threads=1",
              "trainer.limit_eval_batches=1", "logger.tensorboard=false", "data.dataset.loop=3"]  # >= 4 steps an epoch
    full, cut = tmp_path / "full", tmp_path / "cut"
    run([*common, f"hydra.run.dir={full}"], cwd=tmp_path)
    p = run([*common, "fault.sigkill_after_step=3", f"hydra.run.dir={cut}"], cwd=tmp_path, check=False)
    assert p.returncode == -9, p.stderr[-2000:]
    progress = torch.load(cut / "checkpoints" / "last.pt", weights_only=True)["progress"]
    assert (progress["step"], progress["batch"]) == (2, 4)  # 2 steps x 2 micro-batches
    run([*common, "resume=true", f"hydra.run.dir={cut}"], cwd=tmp_path)
    a = torch.load(full / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(cut / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert metrics(full)["batch"] == metrics(cut)["batch"] == {"global": 4, "device": 2, "micro_batches_per_step": 2,
                                                               "ranks": 1}
