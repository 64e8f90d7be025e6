"""PCT: parameter count of the paper classifier, offset attention against the dense formula (ragged, chunked,
checkpointed), neighbour embedding against grouping, the split seg head, edge cases, overfitting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pcbench.models import pct
from pcbench.models.pct import NeighborEmbedding, OffsetAttention, PCTCls, PCTSeg
from pcbench.ops import PointBatch, farthest_point_sample, group, knn
from tests.models._helpers import (
    build_from_yaml,
    modelnet_batch,
    n_params,
    overfit,
    plain_bn,
    ragged_objects,
    scannet_crop,
)


def test_cls_parameter_count_matches_the_port_and_the_paper() -> None:
    # Strawberry-Eat-Mango/PCT_Pytorch model.py Pct, counted from its layer list (xyz input, 40 classes):
    # conv1-2 + BN, two Local_op (two convs without bias + BN), Point_Transformer_Last (two convs + BN, four
    # SA_Layers with shared q/k), conv_fuse + BN, linear1 (no bias) + BN, linear2 + BN, linear3.
    sa = 256 * 64 + (256 * 256 + 256) + (256 * 256 + 256) + 2 * 256
    expected = (3 * 64 + 2 * 64 + 64 * 64 + 2 * 64) + (128 * 128 + 2 * 128 + 128 * 128 + 2 * 128) \
        + (256 * 256 + 2 * 256 + 256 * 256 + 2 * 256) + (2 * (256 * 256 + 2 * 256) + 4 * sa) \
        + (1280 * 1024 + 2 * 1024) + (1024 * 512 + 2 * 512) + (512 * 256 + 256 + 2 * 256) + 256 * 40 + 40
    n = n_params(build_from_yaml("pct_cls", 0, 40))
    assert n == expected == 2_876_136
    # PCT paper (Guo et al. 2021), Table 1: PCT has 2.88M parameters (ModelNet40, xyz input).
    assert abs(n - 2.88e6) / 2.88e6 < 0.02, n


def test_offset_attention_layer_parameter_count_shares_query_and_key() -> None:
    c = 256  # official SA_Layer: q_conv and k_conv share one weight, no bias
    assert n_params(OffsetAttention(c)) == c * c // 4 + 2 * (c * c + c) + 2 * c


def _dense_offset_attention(layer: OffsetAttention, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Per cloud: A = softmax(QK^T, rows), A /= (1e-9 + column sums), x_r = A^T V (official SA_Layer)."""
    outs, start = [], 0
    for end in offset.tolist():
        xi = x[start:end]
        q = layer.qk(xi)
        att = torch.softmax(q @ q.T, dim=-1)
        att = att / (1e-9 + att.sum(0, keepdim=True))
        x_r = att.T @ layer.v(xi)
        outs.append(xi + F.relu(layer.norm(layer.trans(xi - x_r))))
        start = end
    return torch.cat(outs)


@pytest.mark.parametrize("chunk", [1 << 24, 64])
def test_offset_attention_equals_the_dense_formula(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    monkeypatch.setattr(pct, "_CHUNK_ELEMS", chunk)  # 64: many query chunks per cloud
    torch.manual_seed(0)
    layer = OffsetAttention(32).eval()
    x = torch.randn(70, 32)
    for offset in (torch.tensor([70]), torch.tensor([40, 40, 70]), torch.tensor([10, 50, 70])):
        torch.testing.assert_close(layer(x, offset), _dense_offset_attention(layer, x, offset), atol=1e-5,
                                   rtol=1e-5)


def test_checkpointed_chunks_give_the_same_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    layer = OffsetAttention(16).eval()
    x = torch.randn(50, 16, requires_grad=True)
    offset = torch.tensor([20, 50])
    _dense_offset_attention(layer, x, offset).square().sum().backward()
    ref = x.grad.clone()
    x.grad = None
    monkeypatch.setattr(pct, "_CHUNK_ELEMS", 100)
    monkeypatch.setattr(pct, "_CHECKPOINT_ELEMS", 0)
    layer(x, offset).square().sum().backward()
    torch.testing.assert_close(x.grad, ref, atol=1e-5, rtol=1e-5)


def test_neighbor_embedding_equals_grouping_then_mlp() -> None:
    torch.manual_seed(0)
    batch = ragged_objects([60, 25], in_channels=8)
    emb = NeighborEmbedding(8, 16, num_samples=32, k=12).eval()
    emb.bn2.weight.data[::2] *= -1  # negative BN scales: the pooled BN must take the minimum there
    centres, out, new_offset = emb(batch.coord, batch.feat, batch.offset)
    assert new_offset.tolist() == [32, 57]
    sel = farthest_point_sample(batch.coord, batch.offset, n=32)
    idx, _ = knn(centres, batch.coord, 12, new_offset, batch.offset)
    idx = torch.where(idx < 0, idx[:, :1], idx)
    f_c = batch.feat[sel].unsqueeze(1).expand(-1, 12, -1)
    h = torch.cat([group(batch.feat, idx) - f_c, f_c], -1)  # official sample_and_group: [f_j - f_c, f_c]
    h = F.relu(plain_bn(emb.bn2, emb.linear2(F.relu(plain_bn(emb.bn1, emb.linear1(h)))))).amax(1)
    torch.testing.assert_close(out, h, atol=1e-5, rtol=1e-5)


def test_seg_forward_equals_head_on_forward_features() -> None:
    batch = ragged_objects([50, 30], seed=1)
    model = build_from_yaml("pct_seg", 3, 7).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batch), model.head_logits(model.forward_features(batch)), atol=1e-5,
                                   rtol=1e-5)
        assert model.forward_features(batch).shape == (80, 3 * 1024)


def test_empty_cloud_and_float64() -> None:
    full = ragged_objects([80, 40], seed=2)
    with_empty = PointBatch(full.coord, full.feat, torch.tensor([80, 80, 120]))
    for model in (build_from_yaml("pct_cls", 3, 4).eval(), build_from_yaml("pct_seg", 3, 4).eval()):
        with torch.no_grad():
            a, b = model(full), model(with_empty)
            out64 = model.double()(PointBatch(full.coord.double(), full.feat.double(), full.offset))
        assert torch.isfinite(b).all()
        if isinstance(model, PCTCls):
            torch.testing.assert_close(b[[0, 2]], a, atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out64.float(), a, atol=1e-4, rtol=1e-4)


def test_invalid_configuration_raises() -> None:
    with pytest.raises(ValueError, match="embed_channels needs 3 widths"):
        PCTCls(3, 4, embed_channels=[64, 128])
    with pytest.raises(ValueError, match="head_hidden needs at least one width"):
        PCTSeg(3, 4, head_hidden=[])


@pytest.mark.slow
def test_cls_overfits_real_modelnet(shared_data: Path) -> None:
    batch = modelnet_batch(shared_data, 512)
    torch.manual_seed(0)
    losses = overfit(PCTCls(3, 40, dropout=0.0), batch, batch.label, steps=30)
    assert losses[-1] < 0.1 * losses[0], losses


@pytest.mark.slow
def test_seg_overfits_real_scannet(shared_data: Path) -> None:
    batch, num_classes = scannet_crop(shared_data, size=1.5)  # ~1k points: attention is O(n^2)
    torch.manual_seed(0)
    losses = overfit(PCTSeg(3, num_classes, dropout=0.0), batch, batch.label, steps=40, lr=3e-3)
    assert losses[-1] < 0.1 * losses[0], losses
