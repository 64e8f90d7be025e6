"""torchrun with two CPU processes (gloo) equals one process with the same global batch, and the check that says
so fails for a run without the gradient all-reduce or without synchronised BatchNorm."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from ._cli import BIN, REPO, TINY, env, metrics, run

# Two ranks sum each gradient and each BatchNorm statistic in another order than one process, and float32
# rounding then differs by a few ulps per step; five SGD steps grow that by an amount that depends on the CPU's
# vector width (2.2e-5 absolute on one conv5.weight of an Intel Xeon, AVX2, beyond the old elementwise
# tolerance). Elementwise tolerances fail on the entries near zero, whose error is set by the tensor's scale,
# not by their own, so each tensor is compared as a whole: ||b - a|| <= REL_TOL * ||a|| (the normwise error
# of Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., sec. 1.1). The zero-initialised
# BatchNorm biases hold nothing but the training updates, so the check is as sensitive as the update itself.
# Measured on an AMD EPYC (2 ranks vs 1 process): worst 2.4e-5 (a BatchNorm bias); the negative controls
# below (no gradient all-reduce, unsynchronised BatchNorm) give 2.8 and 2.3 and must exceed CONTROL_MARGIN x.
REL_TOL = 1e-3
CONTROL_MARGIN = 10.0
MODEL = "sparse_resnet_cls"  # plain BatchNorm layers, synchronised across ranks by trainer.sync_batchnorm


def _common(prepared: dict[str, Path]) -> list[str]:
    # SGD: Adam divides by sqrt(v) ~ 0 on its first steps, which blows float32 summation-order noise up
    return ["data=modelnet40", f"data.root={prepared['mn40_syn']}", "data.val_fraction=0.2", f"model={MODEL}",
            *TINY[MODEL], "trainer.batch_size=4", "trainer.max_steps=5", "trainer.max_epochs=2",
            "trainer.num_workers=0", "trainer.threads=1", "logger.tensorboard=false", "optim=sgd", "optim.lr=0.05",
            "trainer.accelerator=cpu", "eval.save_predictions=true"]


def _free_port() -> int:
    # a fixed port collides with any other torchrun on the machine (parallel test sessions, other checkouts)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(args: list[str], cwd: Path, path_first: Path | None = None) -> Path:
    """Run the trainer on 2 CPU ranks from ``cwd`` (``path_first`` leading PYTHONPATH); returns its run dir."""
    cwd.mkdir()
    e = env()
    e["PYTHONPATH"] = os.pathsep.join(str(p) for p in (path_first, REPO, e.get("PYTHONPATH")) if p)
    p = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node=2", f"--master_port={_free_port()}", "-m",
                        "pcbench.train", *args, "trainer=ddp"], cwd=cwd, env=e, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    # no hydra.run.dir: each rank would make its own timestamped folder; rank 0 must choose one for both
    made = list((cwd / "outputs" / "train").iterdir())
    assert len(made) == 1, made  # one run directory for all ranks
    return made[0]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def normwise_errors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """``||b[k] - a[k]|| / ||a[k]||`` (in float64) per floating-point tensor; integer tensors must be equal."""
    assert a.keys() == b.keys()
    out = {}
    for k in a:
        if not a[k].is_floating_point():
            assert torch.equal(a[k], b[k]), k
            continue
        x, y = a[k].double(), b[k].double()
        out[k] = float(torch.linalg.vector_norm(y - x) / torch.linalg.vector_norm(x).clamp_min(1e-12))
    return out


def test_normwise_check_takes_the_xeon_rounding_noise_and_rejects_an_update_sized_change() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 32, generator=g) * 0.05  # conv-weight scale; many entries near zero
    a = {"conv5.weight": w, "bn.num_batches_tracked": torch.tensor(5)}
    # ~2.2e-5 absolute on every entry, the size reported on an Intel Xeon: the old elementwise check refused it
    noisy = {**a, "conv5.weight": w + 2.2e-5 * torch.randn(64, 32, generator=g).sign()}
    with pytest.raises(AssertionError):
        torch.testing.assert_close(noisy["conv5.weight"], w, rtol=1e-4, atol=1e-5)
    assert normwise_errors(a, noisy)["conv5.weight"] <= REL_TOL
    update = 0.05 * torch.randn(64, 32, generator=g) * w.abs().mean()  # ~4 % of the norm (the controls: >200 %)
    assert normwise_errors(a, {**a, "conv5.weight": w + update})["conv5.weight"] > REL_TOL
    with pytest.raises(AssertionError, match="num_batches_tracked"):
        normwise_errors(a, {**a, "bn.num_batches_tracked": torch.tensor(4)})


@pytest.fixture(scope="module")
def single(prepared: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one-process run every two-rank run is compared with."""
    if shutil.which("torchrun", path=str(BIN)) is None:
        pytest.skip("torchrun is not installed next to this python")
    out = tmp_path_factory.mktemp("ddp") / "single"
    run([*_common(prepared), f"hydra.run.dir={out}"], cwd=out.parent)
    return out


def test_torchrun_two_ranks_equal_one_process(prepared: dict[str, Path], single: Path, tmp_path: Path) -> None:
    multi = _torchrun([*_common(prepared), "trainer.sync_batchnorm=true"], tmp_path / "cwd")
    ms, mm = metrics(single), metrics(multi)
    assert mm["world_size"] == 2 and ms["world_size"] == 1
    assert ms["steps"] == mm["steps"] == 5
    err = normwise_errors(_weights(single), _weights(multi))
    worst = max(err, key=err.get)
    print(f"two ranks vs one process: worst {worst} {err[worst]:.2e}")
    assert err[worst] <= REL_TOL, f"{worst} differs: ||b - a|| / ||a|| = {err[worst]:.2e} > {REL_TOL:.0e}"
    for split in ("val", "test"):
        assert mm[split]["count"] == ms[split]["count"]
        assert mm[split]["oa"] == pytest.approx(ms[split]["oa"])
    assert (multi / ".hydra" / "config.yaml").is_file() and (multi / "train.log").read_text().count("run dir") == 1


@pytest.mark.slow
@pytest.mark.parametrize("defect", ["unsynchronised BatchNorm", "no gradient all-reduce"])
def test_the_equivalence_check_catches_a_ddp_defect(prepared: dict[str, Path], single: Path, tmp_path: Path,
                                                     defect: str) -> None:
    if defect == "unsynchronised BatchNorm":  # each rank normalises with the statistics of its 2 samples only
        broken = _torchrun([*_common(prepared), "trainer.sync_batchnorm=false"], tmp_path / "cwd")
    else:
        broken = _torchrun([*_common(prepared), "trainer.sync_batchnorm=true"], tmp_path / "cwd",
                           path_first=Path(__file__).with_name("no_allreduce"))  # its sitecustomize.py
    assert metrics(broken)["world_size"] == 2 and metrics(broken)["steps"] == 5
    err = normwise_errors(_weights(single), _weights(broken))
    worst = max(err, key=err.get)
    print(f"{defect}: worst {worst} {err[worst]:.2e}")
    assert err[worst] > CONTROL_MARGIN * REL_TOL, f"{defect} went unnoticed: {worst} differs by only {err[worst]:.2e}"
