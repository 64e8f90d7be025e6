"""trainer.compile: the torch.compile path of the training loop, and every object classifier under dynamo.

The unit tests use the trace-only backends (``eager`` / ``aot_eager``): they exercise dynamo's graph capture and
the trainer's wrapping in seconds; inductor's real code generation is measured by ``benchmarks/bm_models.py
--compile`` (see benchmarks/compile.md).
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from pcbench.models import build_model
from pcbench.ops import PointBatch, dispatch_as
from pcbench.testing.clouds import object_batch
from pcbench.train import compose, fit
from pcbench.train.config import compile_settings, config_identity_sha256
from pcbench.train.errors import ConfigError

from ._cli import TINY

OBJECT_CLASSIFIERS = ["pointnet2_ssg_cls", "pct_cls", "ptv1_cls", "ptv2_cls", "ptv3_cls", "sparse_resnet_cls"]
# Point-based models whose every size follows from the batch's cloud sizes (read once, when the loader builds the
# PointBatch on the CPU): on the GPU code path dynamo captures their whole forward as one graph, what CUDA graphs
# (compile_mode=reduce-overhead) need. The voxel models read each level's voxel count (data-dependent).
ONE_GRAPH_ON_GPU_PATH = ["pointnet2_ssg_cls", "pointnet2_msg_cls", "pct_cls", "ptv1_cls", "pointnet2_ssg_seg",
                         "pct_seg", "ptv1_seg"]
_FAST_ONE_GRAPH = ("pointnet2_ssg_cls", "pct_cls", "ptv1_cls")  # tiny configs, train mode


def _fit(prepared: dict[str, Path], run_dir: Path, *extra: str) -> dict:
    model = "pointnet2_ssg_cls"
    return fit(compose(["data=modelnet40", f"data.root={prepared['mn40_syn']}", f"model={model}", *TINY[model],
                        "trainer.batch_size=4", "trainer.max_steps=3", "trainer.num_workers=0", "trainer.threads=1",
                        "logger.tensorboard=false", "trainer.limit_eval_batches=1", *extra], run_dir=run_dir)).to_dict()


def _losses(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv") as f:
        return [float(r["train_loss"]) for r in csv.DictReader(f) if r["train_loss"]]


@pytest.mark.slow  # two tiny fits plus dynamo + AOTAutograd tracing: ~1 CPU-minute, 6 min on the shared machine
def test_compiled_training_matches_eager_and_is_recorded(prepared: dict[str, Path], tmp_path: Path) -> None:
    eager = _fit(prepared, tmp_path / "eager")
    comp = _fit(prepared, tmp_path / "compiled", "trainer.compile=true", "trainer.compile_backend=aot_eager")
    assert eager["compile"] is None
    assert comp["compile"] == {"backend": "aot_eager", "mode": "default", "dynamic": None}
    assert comp["steps"] == eager["steps"] == 3
    # aot_eager runs the same aten ops as eager (traced through autograd), so losses and weights agree to
    # float32 rounding of a reordered backward.
    assert _losses(tmp_path / "compiled") == pytest.approx(_losses(tmp_path / "eager"), rel=1e-4)
    a = torch.load(tmp_path / "eager" / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "compiled" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()  # the checkpoint holds the bare module's names, no "_orig_mod." prefix
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5)


def test_compile_settings_validate_backend_and_mode() -> None:
    t = OmegaConf.create({"compile": False, "compile_backend": "nope", "compile_mode": "nope", "compile_dynamic": 2})
    assert compile_settings(t) is None  # off: the other keys are not looked at
    t.compile = True
    with pytest.raises(ConfigError, match=r"trainer.compile_mode='nope' is unknown"):
        compile_settings(t)
    t.compile_mode = "max-autotune"
    with pytest.raises(ConfigError, match=r"trainer.compile_dynamic=2 must be null .*, true .* or false"):
        compile_settings(t)
    t.compile_dynamic = False
    with pytest.raises(ConfigError, match=r"trainer.compile_backend='nope' is unknown.*inductor"):
        compile_settings(t)
    t.compile_backend = "inductor"
    assert compile_settings(t) == {"backend": "inductor", "mode": "max-autotune", "dynamic": False}
    t.compile_mode, t.compile_dynamic = "default", None
    assert compile_settings(t) == {"backend": "inductor", "mode": None, "dynamic": None}


@pytest.mark.slow  # dynamo traces each model for ~10 s to a minute on a shared 2-core machine
@pytest.mark.parametrize("name", OBJECT_CLASSIFIERS)
def test_every_object_classifier_traces_under_dynamo(name: str) -> None:
    # backend="eager": dynamo captures the graphs (splitting at graph breaks) and runs them as plain torch, so
    # logits and gradients must equal the eager model's up to float32 reassociation.
    cfg = compose([f"model={name}", *TINY[name]]).model
    torch.manual_seed(0)
    model = build_model(cfg, in_channels=3, num_classes=5).train()
    coord, offset = object_batch(2, 256)
    batch = PointBatch(coord, torch.nn.functional.normalize(coord + 0.1, dim=1), offset)
    labels = torch.tensor([1, 3])
    ref_state = {k: v.clone() for k, v in model.state_dict().items()}

    def step(m: torch.nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.load_state_dict(ref_state)  # BatchNorm running stats move in train mode: same start for both
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        logits = m(batch)
        torch.nn.functional.cross_entropy(logits, labels).backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    torch._dynamo.reset()
    ref_logits, ref_grads = step(model)
    logits, grads = step(torch.compile(model, backend="eager"))
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    assert len(grads) == len(ref_grads) > 0
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize(("name", "train"), [
    pytest.param(n, t, id=f"{n}-{'train' if t else 'eval'}",
                 # the full-size configs (~20 s each) and the eval forwards (no BatchNorm updates): slow tier
                 marks=() if t and n in _FAST_ONE_GRAPH else pytest.mark.slow)
    for n in ONE_GRAPH_ON_GPU_PATH for t in (True, False)
])
def test_point_models_compile_to_one_graph_on_the_gpu_code_path(name: str, train: bool) -> None:
    cfg = compose([f"model={name}", *TINY.get(name, [])]).model
    model = build_model(cfg, in_channels=3, num_classes=5).train(train)
    coord, offset = object_batch(3, 256)
    batch = PointBatch(coord, torch.nn.functional.normalize(coord + 0.1, dim=1), offset)
    torch._dynamo.reset()
    with dispatch_as("cuda"), torch.set_grad_enabled(train):
        explained = torch._dynamo.explain(model)(batch)
    reasons = [f"{r.reason.splitlines()[0]} at {r.user_stack[-1].filename}:{r.user_stack[-1].lineno}"
               for r in explained.break_reasons if r.user_stack]
    assert explained.graph_count == 1 and explained.graph_break_count == 0, reasons


def test_backend_and_mode_place_a_run_while_compile_itself_is_part_of_its_identity() -> None:
    # how torch.compile runs the model does not change what a run computes (leaderboard identity, resume), and
    # configs written before these keys existed keep their identity
    base = {"trainer": {"compile": True, "compile_backend": "inductor", "compile_mode": "default",
                        "compile_dynamic": None, "lr": 1}}
    other = {"trainer": {**base["trainer"], "compile_backend": "aot_eager", "compile_mode": "max-autotune",
                         "compile_dynamic": False}}
    older = {"trainer": {"compile": True, "lr": 1}}
    assert config_identity_sha256(base) == config_identity_sha256(other) == config_identity_sha256(older)
    assert config_identity_sha256(base) != config_identity_sha256({"trainer": {**base["trainer"], "compile": False}})
