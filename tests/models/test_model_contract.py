"""The model contract, checked for EVERY ``conf/model/*.yaml`` (so models added later are covered too).

Each config declares its ``task``, gives Hydra ``_convert_: all`` and must build with
``pcbench.models.build_model(cfg, in_channels, num_classes)`` into a module whose constructor is typed and
documented, whose ``forward(PointBatch)`` returns ``[B, classes]`` (``task: cls``) or ``[N, classes]`` in input order
(``task: seg``), which ignores the input point order, gives a cloud the same output alone as inside a ragged batch,
trains (finite loss, a gradient for every parameter) on real samples and runs under bfloat16 / float16 autocast
(and on CUDA, where present).

Two reference behaviours are exempt from the order and batch checks, by overrides named in ``INDEPENDENT``: the
official PointNet++ grouping keeps the first points of a ball in input order (``ball_query_order: index``), and
Pointcept's PTv3 takes its curve depth from the whole batch (``serialization_depth: null``); both are pinned by
their own tests. PTv3 also shuffles its curves in evaluation, so every forward here runs from the same seed.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import hydra
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from pcbench.models import META_KEYS, build_model, model_task
from pcbench.ops import PointBatch, dispatch_as
from tests.models._helpers import (
    modelnet_batch,
    per_cloud,
    permute_within_clouds,
    ragged_objects,
    scannet_crop,
)

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"
CONFIGS = sorted(CONF.glob("*.yaml"))
NUM_CLASSES = 5
IN_CHANNELS = 3


# Settings under which every model ignores the point order and its batch mates (see the module docstring).
INDEPENDENT = {"ball_query_order": "distance", "serialization_depth": 16}


def _seeded(model: torch.nn.Module, batch: PointBatch) -> torch.Tensor:
    """One forward from a fixed seed: the same random curve shuffle (PTv3) on every call."""
    torch.manual_seed(1)
    return model(batch)


def _task(path: Path) -> str:
    return model_task(OmegaConf.load(path))


def build(path: Path, in_channels: int = IN_CHANNELS, num_classes: int = NUM_CLASSES, **overrides) -> torch.nn.Module:
    """Instantiate a model config (seeded) with the given input channels and classes."""
    cfg = OmegaConf.load(path)
    for k, v in overrides.items():
        if k in cfg:
            cfg[k] = v
    torch.manual_seed(0)
    return build_model(cfg, in_channels=in_channels, num_classes=num_classes)


def _ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


@pytest.fixture(scope="module")
def small_batch() -> PointBatch:
    # Ragged on purpose (different sizes, one cloud smaller than most stage k's after down-sampling).
    return ragged_objects([160, 96, 128])


def test_every_config_declares_its_task_and_leaves_channels_to_the_data() -> None:
    assert CONFIGS, f"no model configs under {CONF}"
    for p in CONFIGS:
        cfg = OmegaConf.load(p)
        task = model_task(cfg)
        assert p.stem.endswith(f"_{task}"), f"{p.name}: declares task: {task}, so name it <model>_{task}.yaml"
        for key in ("in_channels", "num_classes"):
            assert OmegaConf.is_missing(cfg, key), f"{p.name}: {key} must be ??? (filled from the dataset)"
        assert cfg.get("_convert_") == "all", f"{p.name}: set _convert_: all (plain lists and dicts for the model)"


def test_build_model_errors_name_the_fix() -> None:
    cfg = OmegaConf.load(CONFIGS[0])
    no_task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "task"])
    with pytest.raises(ValueError, match="set task: cls"):
        build_model(no_task, 3, 5)
    with pytest.raises(ValueError, match="num_classes >= 1"):
        build_model(cfg, 3, 0)


@pytest.mark.parametrize("path", CONFIGS, ids=_ids(CONFIGS))
def test_constructor_is_typed_and_documented(path: Path) -> None:
    target = hydra.utils.get_class(OmegaConf.load(path)["_target_"])
    sig = inspect.signature(target.__init__)
    params = [p for p in sig.parameters.values() if p.name != "self"]
    assert [p.name for p in params[:2]] == ["in_channels", "num_classes"], f"{path.name}: first args"
    missing = [p.name for p in params if p.annotation is inspect.Parameter.empty]
    assert not missing, f"{path.name}: untyped constructor args {missing}"
    assert target.__doc__ and "Args:" in target.__doc__, f"{path.name}: constructor args are not documented"
    for name in OmegaConf.load(path):
        # Hydra keys (_target_, _convert_, ...) and meta keys (task) are not constructor arguments.
        if not (name.startswith("_") and name.endswith("_")) and name not in META_KEYS:
            assert name in sig.parameters, f"{path.name}: config key {name!r} is not a constructor argument"
    assert hasattr(target, "forward_features"), f"{path.name}: forward_features must be split from the head"


@pytest.mark.parametrize("path", CONFIGS, ids=_ids(CONFIGS))
def test_output_shape_order_and_batch_consistency(path: Path, small_batch: PointBatch) -> None:
    model = build(path, **INDEPENDENT).eval()
    with torch.no_grad():
        out = _seeded(model, small_batch)
        want = (small_batch.num_clouds if _task(path) == "cls" else small_batch.num_points, NUM_CLASSES)
        assert tuple(out.shape) == want and out.dtype == torch.float32
        assert torch.isfinite(out).all()
        # Point order: classification is invariant, segmentation equivariant (per-point rows follow the points).
        shuffled, perm = permute_within_clouds(small_batch)
        out_perm = _seeded(model, shuffled)
        expected = out if _task(path) == "cls" else out[perm]
        torch.testing.assert_close(out_perm, expected, atol=1e-4, rtol=1e-4)
        # A cloud alone gives what it gives inside the ragged batch.
        alone = torch.cat([_seeded(model, c) for c in per_cloud(small_batch)])
        torch.testing.assert_close(alone, out, atol=1e-4, rtol=1e-4)
        # Where the config's own settings differ (see INDEPENDENT), those build and run too.
        if any(k in OmegaConf.load(path) for k in INDEPENDENT):
            ref = build(path).eval()
            assert _seeded(ref, small_batch).shape == out.shape


@pytest.mark.parametrize("path", CONFIGS, ids=_ids(CONFIGS))
def test_wrong_feature_channels_raise(path: Path, small_batch: PointBatch) -> None:
    model = build(path).eval()
    bad = PointBatch(small_batch.coord, small_batch.feat[:, :2], small_batch.offset)
    with pytest.raises(ValueError, match="in_channels"):
        model(bad)


@pytest.mark.parametrize("path", CONFIGS, ids=_ids(CONFIGS))
def test_batch_in_another_dtype_is_cast_to_the_parameters(path: Path, small_batch: PointBatch) -> None:
    # The one dtype policy: coord and feat are cast to the parameters' dtype (exact here: float32 -> float64
    # -> float32 round-trips), so a float64 batch gives exactly the float32 batch's output.
    model = build(path).eval()
    as64 = PointBatch(small_batch.coord.double(), small_batch.feat.double(), small_batch.offset)
    with torch.no_grad():
        ref = _seeded(model, small_batch)
        out = _seeded(model, as64)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("path", [p for p in CONFIGS if _task(p) == "cls"],
                         ids=_ids([p for p in CONFIGS if _task(p) == "cls"]))
def test_cls_trains_on_real_modelnet(path: Path, shared_data: Path) -> None:
    batch = modelnet_batch(shared_data, 1024)  # PTv1 keeps 4 points per cloud at stride 256
    model = build(path).train()
    out = model(batch)
    loss = F.cross_entropy(out, batch.label % NUM_CLASSES)
    loss.backward()
    assert torch.isfinite(loss)
    _assert_every_parameter_learns(model, path)


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in CONFIGS if _task(p) == "seg"],
                         ids=_ids([p for p in CONFIGS if _task(p) == "seg"]))
def test_seg_trains_on_real_scannet(path: Path, shared_data: Path) -> None:
    batch, num_classes = scannet_crop(shared_data, size=3.0)  # ~5.3k points, 7 classes
    model = build(path, num_classes=num_classes).train()
    out = model(batch)
    assert out.shape == (batch.num_points, num_classes)
    loss = F.cross_entropy(out, batch.label)
    loss.backward()
    assert torch.isfinite(loss)
    _assert_every_parameter_learns(model, path)


def _assert_every_parameter_learns(model: torch.nn.Module, path: Path) -> None:
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"{path.name}: parameters without gradient {no_grad[:5]}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"{path.name}: non-finite gradients in {bad[:5]}"
    zero = [n for n, p in model.named_parameters() if p.grad is not None and not p.grad.any()]
    assert not zero, f"{path.name}: all-zero gradients in {zero[:5]}"


@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, 0.1), (torch.float16, 0.02)], ids=["bf16", "fp16"])
@pytest.mark.parametrize("path", CONFIGS, ids=_ids(CONFIGS))
def test_autocast_forward(path: Path, small_batch: PointBatch, dtype: torch.dtype, tol: float) -> None:
    model = build(path).eval()
    with torch.no_grad():
        ref = _seeded(model, small_batch)
        with torch.autocast("cpu", dtype=dtype):
            out = _seeded(model, small_batch)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    # bfloat16 keeps ~3 significant digits, float16 ~4; the logits must still agree as a whole.
    rel = (out.float() - ref).norm() / ref.norm().clamp_min(1e-6)
    assert rel < tol, f"{path.name}: {dtype} autocast logits deviate by {rel:.4f} (relative L2)"


def _loss_and_grads(model: torch.nn.Module, batch: PointBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training forward + backward from a fixed seed: (loss, gradient of every parameter)."""
    model.zero_grad(set_to_none=True)
    out = _seeded(model.train(), batch)
    target = torch.arange(out.shape[0]) % out.shape[1]
    loss = F.cross_entropy(out, target)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("path", CONFIGS, ids=_ids(CONFIGS))
def test_gpu_code_path_matches_cpu_path(path: Path, small_batch: PointBatch) -> None:
    # The branches each op takes on a GPU (dense kNN for every cloud, GPU block sizes, dense FPS), run on
    # CPU tensors under dispatch_as("cuda"): the same logits as the CPU branches.
    model = build(path).eval()
    with torch.no_grad():
        with dispatch_as("cpu"):
            ref = _seeded(model, small_batch)
        with dispatch_as("cuda"):
            out = _seeded(model, small_batch)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=_ids(CONFIGS))
def test_gpu_code_path_trains_like_cpu_path(path: Path, small_batch: PointBatch) -> None:
    # One training step under each dispatch: same loss and gradients. In float64: the two paths sum in other
    # orders (padded vs compact groups, pooled BatchNorm statistics), and train-mode BatchNorm on random weights
    # amplifies float32 rounding to ~3 % of a gradient (measured on PointNet++ SSG), while in float64 the paths
    # agree to ~1e-12; any real difference (another neighbour, another statistic) stays far above 1e-9.
    model = build(path).double()
    batch = PointBatch(coord=small_batch.coord.double(), feat=small_batch.feat.double(), offset=small_batch.offset,
                       label=small_batch.label)
    with dispatch_as("cpu"):
        ref_loss, ref_grads = _loss_and_grads(model, batch)
    with dispatch_as("cuda"):
        loss, grads = _loss_and_grads(model, batch)
    torch.testing.assert_close(loss, ref_loss, atol=1e-9, rtol=1e-9)
    assert grads.keys() == ref_grads.keys()
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-9 * scale, rtol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("path", CONFIGS, ids=_ids(CONFIGS))
def test_cuda_matches_cpu(path: Path, small_batch: PointBatch) -> None:
    model = build(path).eval()
    with torch.no_grad():
        ref = _seeded(model, small_batch)
        out = _seeded(model.cuda(), small_batch.to("cuda"))
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), ref, atol=1e-3, rtol=1e-3)
