"""Point Transformer v1: parameter count of the paper configuration, the vector attention layer and the
transitions against direct per-point implementations of the paper's formulas, edge cases, overfitting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pcbench.models.ptv1 import (
    PointTransformerCls,
    PointTransformerLayer,
    PointTransformerSeg,
    TransitionDown,
    TransitionUp,
    _Level,
)
from pcbench.ops import PointBatch, farthest_point_sample, group_relative, knn, sample_offset
from tests.models._helpers import (
    build_from_yaml,
    modelnet_batch,
    n_params,
    naive_idw,
    overfit,
    plain_bn,
    ragged_objects,
    scannet_crop,
)


def _official_layer(c: int, s: int = 8) -> int:
    """Parameters of the official PointTransformerLayer(c, c, s): q, k, v; linear_p (3-3-BN-c); linear_w."""
    return 3 * (c * c + c) + (3 * 3 + 3) + 2 * 3 + (3 * c + c) + 2 * c + (c * c // s + c // s) + 2 * (c // s) \
        + ((c // s) ** 2 + c // s)


def _official_block(c: int) -> int:
    return 2 * c * c + 6 * c + _official_layer(c)  # Bottleneck: linear1, linear3 (no bias), bn1-3, the layer


def _official_encoder(c_in: int, blocks: list[int]) -> int:
    """TransitionDown (linear without bias + BN; 3 + C inputs when it groups) and the blocks of each stage."""
    total, c = 0, c_in
    for i, (p, b) in enumerate(zip((32, 64, 128, 256, 512), blocks, strict=True)):
        total += (c if i == 0 else 3 + c) * p + 2 * p + b * _official_block(p)
        c = p
    return total


def test_seg50_parameter_count_matches_the_official_model() -> None:
    # The official PointTransformerSeg50 (POSTECH-CVLab/point-transformer pointtransformer_seg_repro, c=6 i.e.
    # xyz + rgb, k=13 S3DIS classes): 7.8M parameters; the layer list counted independently.
    planes = (32, 64, 128, 256, 512)
    dec = (2 * 512 * 512 + 512 + 2 * 512) + (512 * 512 + 512) + _official_block(512)  # head TransitionUp + block
    for i in reversed(range(4)):
        dec += (planes[i] ** 2 + 3 * planes[i]) + (planes[i + 1] * planes[i] + 3 * planes[i]) + _official_block(planes[i])
    expected = _official_encoder(6, [1, 2, 3, 5, 2]) + dec + (32 * 32 + 32 + 2 * 32) + 32 * 13 + 13
    n = n_params(build_from_yaml("ptv1_seg", 3, 13))
    assert n == expected == 7_767_729
    assert abs(n - 7.8e6) / 7.8e6 < 0.02


def test_cls50_parameter_count_matches_pointcept() -> None:
    # Pointcept PointTransformer-Cls50 builds range(1, [1, 2, 3, 5, 2]) blocks: 0, 1, 2, 4, 1 (xyz + normal, 40 classes)
    head = (512 * 256 + 256 + 2 * 256) + (256 * 128 + 128 + 2 * 128) + 128 * 40 + 40
    expected = _official_encoder(6, [0, 1, 2, 4, 1]) + head
    model = build_from_yaml("ptv1_cls", 3, 40)
    assert n_params(model) == expected == 3_262_872
    assert [len(stage.blocks) for stage in model.encoder.stages] == [0, 1, 2, 4, 1]
    assert n_params(build_from_yaml("ptv1_cls", 3, 40, depths=[1, 2, 3, 5, 2])) == \
        _official_encoder(6, [1, 2, 3, 5, 2]) + head == 5_073_362


def test_layer_parameter_count_follows_the_official_layer_list() -> None:
    c, s = 64, 8
    expected = 3 * (c * c + c) + (3 * 3 + 3) + 2 * 3 + (3 * c + c) + 2 * c + (c * c // s + c // s) + 2 * (c // s) \
        + ((c // s) ** 2 + c // s)
    assert n_params(PointTransformerLayer(c, s, 16)) == expected


def _naive_layer(layer: PointTransformerLayer, x: torch.Tensor, xyz: torch.Tensor, offset: torch.Tensor):
    """y_i = sum_j softmax_j(gamma(q_i - k_j + delta_ij)) (.) (v_j + delta_ij), looping over points."""
    idx, _ = knn(xyz, xyz, layer.k, offset, offset)
    q, k, v = layer.linear_q(x), layer.linear_k(x), layer.linear_v(x)
    out = []
    for i in range(x.shape[0]):
        nb = idx[i][idx[i] >= 0]
        delta = layer.linear_p(xyz[nb] - xyz[i])  # [k', C]
        a = layer.linear_w((k[nb] - q[i]) + delta)  # official code: x_k - x_q + p_r
        w = torch.softmax(a, dim=0)  # [k', C / s]
        vals = (v[nb] + delta).view(len(nb), layer.share_planes, -1)  # channel c uses weight group c % (C/s)
        out.append((vals * w.unsqueeze(1)).sum(0).reshape(-1))
    return torch.stack(out)


def test_vector_attention_equals_the_per_point_formula_on_ragged_clouds() -> None:
    torch.manual_seed(0)
    batch = ragged_objects([40, 12], in_channels=16)  # second cloud smaller than k: masked neighbours
    layer = PointTransformerLayer(16, share_planes=4, k=16).eval()
    out = layer(batch.feat, _Level(batch.coord, batch.offset))
    torch.testing.assert_close(out, _naive_layer(layer, batch.feat, batch.coord, batch.offset), atol=1e-5,
                               rtol=1e-5)


def test_transition_down_equals_group_then_linear_then_maxpool() -> None:
    torch.manual_seed(0)
    batch = ragged_objects([64, 30], in_channels=5)
    td = TransitionDown(5, 12, stride=4, k=8).eval()
    td.bn.weight.data[::3] *= -1  # negative BN scales: the pooled BN must take the minimum there
    x, new = td(batch.feat, _Level(batch.coord, batch.offset))
    sel = farthest_point_sample(batch.coord, batch.offset, ratio=0.25)
    assert new.offset.tolist() == sample_offset(batch.offset, ratio=0.25).tolist() == [16, 24]
    torch.testing.assert_close(new.xyz, batch.coord[sel])
    idx, _ = knn(new.xyz, batch.coord, 8, new.offset, batch.offset)
    grouped = group_relative(new.xyz, batch.coord, idx, batch.feat)
    expected = F.relu(plain_bn(td.bn, td.linear(grouped))).amax(1)
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)


def test_transition_up_interpolates_with_the_one_ops_interpolate(monkeypatch: pytest.MonkeyPatch) -> None:
    # linear1(skip) + IDW(linear2(coarse)) through pcbench.ops.interpolate, equal to a brute-force float64 IDW
    # reference in value and in the gradients of the coarse features and the weights.
    import pcbench.models.ptv1 as ptv1  # noqa: PLC0415

    calls = []
    real = ptv1.interpolate
    monkeypatch.setattr(ptv1, "interpolate", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    fine = ragged_objects([90, 70, 5], in_channels=6, seed=1)
    coarse = ragged_objects([20, 10, 2], in_channels=12, seed=2)  # 2 < k: a missing neighbour
    up = TransitionUp(12, 6).double().eval()
    cx = coarse.feat.double().requires_grad_(True)
    out = up(fine.feat.double(), _Level(fine.coord.double(), fine.offset), cx,
             _Level(coarse.coord.double(), coarse.offset))
    assert len(calls) == 1
    ref = up.linear1(fine.feat.double()) + naive_idw(fine.coord, coarse.coord, up.linear2(cx), fine.offset,
                                                     coarse.offset, 3)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    r = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    params = (cx, up.linear2[0].weight)
    for a, b in zip(torch.autograd.grad((out * r).sum(), params), torch.autograd.grad((ref * r).sum(), params),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_empty_cloud_and_float64() -> None:
    model = build_from_yaml("ptv1_cls", 3, 4).eval()
    full = ragged_objects([128, 70], seed=2)
    with_empty = PointBatch(full.coord, full.feat, torch.tensor([128, 128, 198]))
    with torch.no_grad():
        a, b = model(full), model(with_empty)
        out64 = model.double()(PointBatch(full.coord.double(), full.feat.double(), full.offset))
    assert torch.isfinite(b).all()
    torch.testing.assert_close(b[[0, 2]], a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out64.float(), a, atol=1e-4, rtol=1e-4)


def test_invalid_configuration_raises() -> None:
    with pytest.raises(ValueError, match="divisible by share_planes"):
        PointTransformerLayer(20, share_planes=8)
    with pytest.raises(ValueError, match="one entry per stage"):
        PointTransformerSeg(3, 4, channels=[32, 64], depths=[1])
    with pytest.raises(ValueError, match="decoder_depths"):
        PointTransformerSeg(3, 4, decoder_depths=[1, 1])


@pytest.mark.slow
def test_cls_overfits_real_modelnet(shared_data: Path) -> None:
    batch = modelnet_batch(shared_data, 512)
    torch.manual_seed(0)
    model = PointTransformerCls(3, 40, dropout=0.0)
    losses = overfit(model, batch, batch.label, steps=45)  # Cls50 depths [0, 1, 2, 4, 1] (Pointcept) learn a little slower than [1, 2, 3, 5, 2]
    assert losses[-1] < 0.1 * losses[0], losses


@pytest.mark.slow
def test_seg_overfits_real_scannet(shared_data: Path) -> None:
    batch, num_classes = scannet_crop(shared_data, size=2.0)
    torch.manual_seed(0)
    losses = overfit(build_from_yaml("ptv1_seg", 3, num_classes), batch, batch.label, steps=60, lr=3e-3)
    assert losses[-1] < 0.1 * losses[0], losses
