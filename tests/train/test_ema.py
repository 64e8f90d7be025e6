"""The trainer's weight EMA equals torch's ``AveragedModel`` EMA step for step, without its per-step host reads."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pcbench.train.optim import build_ema

from .test_losses import SyncCount


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _train_step(net: nn.Module, x: torch.Tensor) -> None:
    net.train()
    loss = net(x).square().mean()
    loss.backward()
    with torch.no_grad():
        for p in net.parameters():
            p -= 0.1 * p.grad
            p.grad = None


def test_ema_matches_torch_averaged_model_exactly_and_resumes() -> None:
    net = _net()
    ours = build_ema(net, 0.9)
    torchs = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        _train_step(net, torch.randn(16, 4, generator=g))
        if step == 3:  # a resume: a fresh EMA loads the checkpointed state and continues alike
            state = ours.state_dict()
            ours = build_ema(net, 0.9)
            ours.load_state_dict(state)
        ours.update_parameters(net)
        torchs.update_parameters(net)
        for (k, a), (_, b) in zip(ours.state_dict().items(), torchs.state_dict().items(), strict=True):
            assert torch.equal(a, b), (step, k)
    assert int(ours.n_averaged) == 6
    # the averages moved away from the weights (decay < 1)
    assert not torch.equal(ours.module[0].weight, net[0].weight)


def test_ema_update_reads_nothing_from_the_device_after_the_first() -> None:
    net = _net()
    ema = build_ema(net, 0.99)
    with SyncCount() as count:
        for _ in range(3):
            _train_step(net, torch.randn(8, 4))
            ema.update_parameters(net)
    assert count.names == []
    ema.load_state_dict(ema.state_dict())
    with SyncCount() as count:
        ema.update_parameters(net)
        ema.update_parameters(net)
    assert count.names == ["_local_scalar_dense"]  # n_averaged read once after loading, not per update
