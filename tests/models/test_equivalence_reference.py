"""Reference tier: whole-network forward equivalence against torch-pointcloud 0.0.18 on CPU (spconv 2.3.8).

A torch-pointcloud network with random weights (and BatchNorm / LayerNorm parameters and statistics drawn away
from their defaults) is saved the way torch-pointcloud's hub publishes weights (safetensors), converted with
``pcbench.models.convert.convert_checkpoint``, loaded with ``create_model``, and both run in eval mode on a real
ScanNet crop (scene0000_00, 3 m x 3 m, 2 cm voxels, ~5k voxels). What is pinned and why:
tests/models/_tpc.py. Train-mode gradients are not compared: spconv's CPU build runs forward only.

Measured (this CPU, one thread; python -m benchmarks.eq_reference --tpc): SpUNet fp32 max |logit difference| 0.0
(the same bits), fp64 6.9e-17; PTv3 fp32 2.0e-6 at logit scale 3.4, fp64 5.3e-15.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("spconv.pytorch")
pytest.importorskip("torch_pointcloud.models")
safetensors_torch = pytest.importorskip("safetensors.torch")

from pcbench.models import create_model  # noqa: E402
from pcbench.models.convert import convert_checkpoint  # noqa: E402
from tests.models._tpc import (  # noqa: E402
    one_thread,
    ptv3_overrides,
    randomise_norms,
    scene_voxels,
    spconv_train_mode_bias,
    tpc_forward,
    tpc_ptv3,
)

pytestmark = pytest.mark.reference


def _convert(ref: torch.nn.Module, tmp_path: Path, config: str) -> Path:
    src = tmp_path / "model.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(src))
    dst = tmp_path / "converted.pt"
    torch.save(convert_checkpoint(src, "torch-pointcloud", config), dst)
    return dst


def test_spunet_forward_equals_torch_pointcloud(shared_data: Path, tmp_path: Path) -> None:
    from torch_pointcloud.models import create_model as tpc_create_model  # noqa: PLC0415

    grid, feat, batch = scene_voxels(shared_data)
    torch.manual_seed(0)
    ref = spconv_train_mode_bias(randomise_norms(tpc_create_model("spunet-v1m1.scannet20.pointcept",
                                                                  pretrained=False)))
    ours = create_model("spunet_base_seg", 6, 20, weights=_convert(ref, tmp_path, "spunet_base_seg")).eval()
    with one_thread(), torch.no_grad():
        want = tpc_forward(ref, grid, feat)
        again = tpc_forward(ref, grid, feat)
        got = ours(batch)
    assert torch.equal(want, again)  # one thread: spconv repeats itself bit for bit
    assert float(want.abs().max()) > 0.01
    # same kernel maps and per-offset GEMMs: measured 0.0; the tolerance is float32 summation order only
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("legacy", [False, True], ids=["block-v1.5.2", "block-v1.5.1"])
def test_ptv3_forward_equals_torch_pointcloud(shared_data: Path, tmp_path: Path, legacy: bool) -> None:
    grid, feat, batch = scene_voxels(shared_data)
    torch.manual_seed(0)
    ref = spconv_train_mode_bias(randomise_norms(tpc_ptv3(legacy=legacy)))
    ours = create_model("ptv3_seg", 6, 20, weights=_convert(ref, tmp_path, "ptv3_seg"),
                        **ptv3_overrides(grid, legacy)).eval()
    with one_thread(), torch.no_grad():
        want = tpc_forward(ref, grid, feat)
        got = ours(batch)
    assert float(want.abs().max()) > 1.0
    if legacy:  # the other chaining computes something else: the comparison can tell them apart
        other = create_model("ptv3_seg", 6, 20, weights=tmp_path / "converted.pt", **ptv3_overrides(grid)).eval()
        with one_thread(), torch.no_grad():
            assert float((other(batch) - want).abs().max()) > 0.1
    # 46M parameters, 26 attention blocks: float32 summation order gives ~1e-6 at logit scale ~3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)
