"""Efficiency probe: FLOPs against a hand count, memory against a known allocation, real models end to end."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from pcbench.bench.probe import count_flops, peak_memory_mib, probe_efficiency, single_cloud
from pcbench.models import build_model
from pcbench.ops import PointBatch
from tests.models._helpers import ragged_objects

REPO = Path(__file__).resolve().parents[2]


class PointMLP(nn.Module):
    """Per-point MLP, max-pool per cloud, linear head: FLOPs easy to count by hand."""

    def __init__(self, c: int, h1: int, h2: int, k: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(c, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU())
        self.head = nn.Linear(h2, k)

    def forward(self, b: PointBatch) -> torch.Tensor:
        x = self.mlp(b.feat)
        idx = b.batch_index().unsqueeze(1).expand_as(x)
        pooled = torch.zeros(b.num_clouds, x.shape[1], dtype=x.dtype).scatter_reduce(0, idx, x, "amax",
                                                                                   include_self=False)
        return self.head(pooled)


class NoLinear(nn.Module):
    """A model without nn.Linear layers (int8 through torchao has nothing to quantize)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, k))

    def forward(self, b: PointBatch) -> torch.Tensor:
        x = b.feat @ self.w
        idx = b.batch_index().unsqueeze(1).expand_as(x)
        return torch.zeros(b.num_clouds, x.shape[1]).scatter_reduce(0, idx, x, "mean", include_self=False)


def _accuracy(model: nn.Module, batches: list[PointBatch], dtype: torch.dtype | None) -> float:
    right = total = 0
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        for b in batches:
            right += int((model(b).argmax(1) == b.label).sum())
            total += b.num_clouds
    return right / total


def test_flops_match_a_hand_count() -> None:
    c, h1, h2, k = 3, 16, 32, 5
    b = ragged_objects([40, 25, 31], in_channels=c)
    n, nb = b.num_points, b.num_clouds
    model = PointMLP(c, h1, h2, k)
    expected = 2 * n * (c * h1 + h1 * h2) + 2 * nb * h2 * k  # 2 FLOPs per multiply-add, bias adds not counted
    assert count_flops(model, b) == expected
    out = probe_efficiency(model, [b], [b], task="cls", device="cpu", warmup=1, repeats=1, latency_repeats=1,
                           bf16=False, int8=False)
    assert out["flops_per_sample"] == pytest.approx(expected / nb)
    assert out["flops_points_per_sample"] == pytest.approx(n / nb)


def test_probe_on_a_small_model_with_scores() -> None:
    torch.manual_seed(0)
    train = [ragged_objects([30, 20, 25], seed=s) for s in range(2)]
    evalb = [ragged_objects([28, 22], seed=10 + s) for s in range(2)]
    model = PointMLP(3, 32, 64, 5).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = probe_efficiency(model, train, evalb, task="cls", device="cpu", warmup=1, repeats=2, latency_repeats=3,
                           score=lambda m, dt: _accuracy(m, evalb, dt))
    assert model.training, "the probe restores the model's mode"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the probe trains a copy only"
    assert out["params"] == sum(p.numel() for p in model.parameters()) == out["trainable_params"]
    for key in ("train_samples_per_s", "infer_samples_per_s", "latency_b1_ms", "bf16_samples_per_s",
                "int8_samples_per_s", "train_points_per_s", "infer_points_per_s"):
        assert out[key] > 0 and math.isfinite(out[key]), key
    assert out["score_fp32"] == _accuracy(model, evalb, None)
    assert out["bf16_status"] == "ok" and abs(out["bf16_score_delta"]) <= 1.0
    assert out["bf16_score_delta"] == pytest.approx(_accuracy(model, evalb, torch.bfloat16) - out["score_fp32"])
    assert out["int8_status"] == "ok", out["int8_status"]
    assert out["int8_linear_param_share"] == pytest.approx(
        sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)) / out["params"])
    assert out["int8_speedup"] == pytest.approx(out["int8_samples_per_s"] / out["infer_samples_per_s"])
    assert out["memory_method"].startswith("peak RSS increase")
    assert out["train_peak_mib"] >= 0 and out["infer_peak_mib"] >= 0


def test_a_given_fp32_score_is_used_not_measured_again() -> None:
    torch.manual_seed(0)
    train = [ragged_objects([30, 20, 25], seed=1)]
    evalb = [ragged_objects([28, 22], seed=11)]
    model = PointMLP(3, 16, 16, 5)
    calls: list[torch.dtype | None] = []

    def score(m: nn.Module, dt: torch.dtype | None) -> float:
        calls.append(dt)
        return _accuracy(m, evalb, dt)

    out = probe_efficiency(model, train, evalb, task="cls", device="cpu", warmup=0, repeats=1, latency_repeats=1,
                           score=score, fp32_score=0.25, int8=False)
    assert calls == [torch.bfloat16]  # fp32 is the caller's figure (the trainer's final test): no second pass
    assert out["score_fp32"] == 0.25 and out["score_fp32_source"].startswith("given")
    assert out["bf16_score_delta"] == pytest.approx(_accuracy(model, evalb, torch.bfloat16) - 0.25)


def test_int8_unsupported_is_said_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    b = ragged_objects([20, 30])
    out = probe_efficiency(NoLinear(5), [b], [b], task="cls", device="cpu", warmup=0, repeats=1,
                           latency_repeats=1, bf16=False)
    assert out["int8_status"] == "unsupported: the model has no nn.Linear layers"
    assert out["int8_samples_per_s"] is None and out["bf16_status"] == "skipped"
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if torchao were not installed
    out = probe_efficiency(PointMLP(3, 8, 8, 5), [b], [b], task="cls", device="cpu", warmup=0, repeats=1,
                           latency_repeats=1, bf16=False)
    assert out["int8_status"].startswith("unsupported: torchao cannot be imported (ModuleNotFoundError")


def test_bad_arguments_name_the_fix() -> None:
    b = ragged_objects([20, 30])
    m = PointMLP(3, 8, 8, 5)
    with pytest.raises(ValueError, match="task='det'; use 'cls' or 'seg'"):
        probe_efficiency(m, [b], [b], task="det", device="cpu")
    with pytest.raises(ValueError, match="got 0 train and 1 eval batches"):
        probe_efficiency(m, [], [b], task="cls", device="cpu")
    unlabeled = PointBatch(b.coord, b.feat, b.offset)
    with pytest.raises(ValueError, match="train_batches need labels"):
        probe_efficiency(m, [unlabeled], [b], task="cls", device="cpu", warmup=0, repeats=1)


def test_single_cloud_slices_labels_per_task() -> None:
    b = ragged_objects([4, 3, 5])
    one = single_cloud(b, 1)
    assert one.num_points == 3 and one.offset.tolist() == [3] and one.label.tolist() == [b.label[1].item()]
    assert torch.equal(one.coord, b.coord[4:7])
    seg = PointBatch(b.coord, b.feat, b.offset, label=torch.arange(12))
    assert single_cloud(seg, 2).label.tolist() == list(range(7, 12))


_MEM_SCRIPT = textwrap.dedent("""
    import json, torch
    from pcbench.bench.probe import peak_memory_mib
    def big():  # one 96 MiB tensor (mmap'd by glibc), pages touched, freed at return
        return float(torch.ones(96 * 2**20 // 4)[-1])
    def small():  # 96 MiB in 64 KiB tensors: served from the heap, which keeps freed chunks for reuse
        xs = [torch.ones(2**14) for _ in range(1536)]
        return float(xs[-1][0])
    def nothing():
        return 0
    # the repeats must see the full peak again: freed heap of the previous call must not hide it
    print(json.dumps([peak_memory_mib(f, "cpu") for f in (big, big, small, small, small, nothing)]))
""")


@pytest.mark.parametrize("malloc", ["default", "tuned"])
def test_peak_rss_increase_sees_a_known_allocation(malloc: str) -> None:
    if not Path("/proc/self/status").exists():
        pytest.skip("peak RSS is read from /proc (Linux only)")
    import json
    import os

    env = dict(os.environ)
    if malloc == "tuned":  # large temporaries stay in the heap after free: exactly what could hide a peak
        env.update(MALLOC_MMAP_THRESHOLD_="4294967296", MALLOC_TRIM_THRESHOLD_="68719476736")
    out = subprocess.run([sys.executable, "-c", _MEM_SCRIPT], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=300, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert all(method.startswith("peak RSS increase") for _, method in res)
    mib = [m for m, _ in res]
    assert all(90 <= m <= 110 for m in mib[:5]), mib
    assert mib[5] < 8, mib


def _probe_config(name: str) -> dict:
    cfg = OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml")
    torch.manual_seed(0)
    model = build_model(cfg, in_channels=3, num_classes=5)
    b = ragged_objects([128, 96])  # small and few passes: this checks that every path runs, it times nothing
    if cfg.task == "seg":
        b.label = torch.randint(0, 5, (b.num_points,))
    return probe_efficiency(model, [b], [b], task=cfg.task, device="cpu", warmup=0, repeats=1, latency_repeats=1)


def _check_real(out: dict, name: str) -> None:
    cfg = OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml")
    torch.manual_seed(0)
    params = sum(p.numel() for p in build_model(cfg, 3, 5).parameters())
    assert out["params"] == params
    assert out["flops_per_sample"] > 0 and out["train_samples_per_s"] > 0 and out["latency_b1_ms"] > 0
    assert out["bf16_status"] == "ok"
    # every model quantizes on CPU (a model that does arithmetic on Linear weights breaks torchao's int8 tensors)
    assert out["int8_status"] in ("ok", "unsupported: the model has no nn.Linear layers"), out["int8_status"]


@pytest.mark.parametrize("name", ["pointnet2_ssg_cls", "pct_cls", "minkunet14a_seg"])
def test_probe_real_models(name: str) -> None:
    _check_real(_probe_config(name), name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml")))
def test_probe_every_model_config(name: str) -> None:
    _check_real(_probe_config(name), name)


@pytest.mark.gpu
def test_cuda_peak_memory_sees_a_known_allocation() -> None:
    mib, method = peak_memory_mib(lambda: torch.ones(96 * 2**20 // 4, device="cuda").sum().item(), "cuda")
    assert method.startswith("CUDA max_memory_allocated") and 96 <= mib <= 100


@pytest.mark.gpu
def test_probe_on_cuda() -> None:
    cfg = OmegaConf.load(REPO / "conf" / "model" / "pointnet2_ssg_cls.yaml")
    torch.manual_seed(0)
    model = build_model(cfg, in_channels=3, num_classes=5).cuda()
    b = ragged_objects([160, 96, 128])
    out = probe_efficiency(model, [b], [b], task="cls", device="cuda", warmup=1, repeats=2, latency_repeats=3)
    assert out["device"] == "cuda" and out["device_name"] == torch.cuda.get_device_name(0)
    assert out["memory_method"].startswith("CUDA") and out["train_peak_mib"] > 0
    assert out["bf16_status"] == "ok"
    # every model quantizes on CPU (a model that does arithmetic on Linear weights breaks torchao's int8 tensors)
    assert out["int8_status"] in ("ok", "unsupported: the model has no nn.Linear layers"), out["int8_status"]


def test_machine_load_keeps_the_higher_reading_and_says_when_there_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from pcbench.bench.probe import machine_load

    monkeypatch.setattr(os, "getloadavg", lambda: (2.5, 9.0, 9.0))  # only the 1-minute figure counts
    assert machine_load() == {"load_avg": 2.5, "cpu_count": os.cpu_count()}
    assert machine_load({"load_avg": 4.0})["load_avg"] == 4.0
    assert machine_load({"load_avg": 1.0})["load_avg"] == 2.5

    def unavailable() -> tuple[float, float, float]:
        raise OSError("load average unobtainable")

    monkeypatch.setattr(os, "getloadavg", unavailable)
    assert machine_load()["load_avg"] is None and machine_load({"load_avg": 1.5})["load_avg"] == 1.5
