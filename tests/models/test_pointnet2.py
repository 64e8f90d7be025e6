"""PointNet++: parameter counts of the official configurations, blocks against the naive formulation, the official
first-found grouping, edge cases."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pcbench.models.layers import BatchNormReLUMax
from pcbench.models.pointnet2 import FeaturePropagation, GlobalSetAbstraction, PointNet2Cls, SetAbstraction
from pcbench.ops import (
    PointBatch,
    ball_query,
    farthest_point_sample,
    group_relative,
    interpolate,
    sample_offset,
)
from pcbench.ops._reference import ball_query_reference
from tests.models._helpers import (
    build_from_yaml,
    modelnet_batch,
    n_params,
    naive_idw,
    overfit,
    permute_within_clouds,
    plain_bn,
    ragged_objects,
    scannet_crop,
)


def _conv_bn(c_in: int, c_out: int) -> int:
    return c_in * c_out + c_out + 2 * c_out  # 1x1 conv with bias + BatchNorm (weight, bias)


def _mlp(c: int, ws: list[int]) -> int:
    return sum(_conv_bn(a, b) for a, b in zip([c, *ws[:-1]], ws, strict=True))


def test_ssg_cls_parameter_count_matches_the_layer_list_and_the_published_figure() -> None:
    # Independent count from the official pointnet2_cls_ssg layer list (xyz input, 40 classes) ...
    expected = (_mlp(3, [64, 64, 128]) + _mlp(3 + 128, [128, 128, 256]) + _mlp(3 + 256, [256, 512, 1024])
                + _conv_bn(1024, 512) + _conv_bn(512, 256) + 256 * 40 + 40)
    assert n_params(build_from_yaml("pointnet2_ssg_cls", 0, 40)) == expected == 1_475_688
    # ... and the 1.48M listed for PointNet++ (SSG) in Table 1 of the PCT paper (Guo et al. 2021).
    assert abs(expected - 1.48e6) / 1.48e6 < 0.02


def test_msg_cls_parameter_count_matches_the_layer_list_and_the_published_figure() -> None:
    # official pointnet2_cls_msg: three branches per level on [relative xyz, features]
    l1 = _mlp(3, [32, 32, 64]) + _mlp(3, [64, 64, 128]) + _mlp(3, [64, 96, 128])
    l2 = sum(_mlp(3 + 320, w) for w in ([64, 64, 128], [128, 128, 256], [128, 128, 256]))
    expected = l1 + l2 + _mlp(3 + 640, [256, 512, 1024]) + _conv_bn(1024, 512) + _conv_bn(512, 256) + 256 * 40 + 40
    n = n_params(build_from_yaml("pointnet2_msg_cls", 0, 40))
    assert n == expected == 1_747_368
    assert abs(n - 1.74e6) / 1.74e6 < 0.02  # PCT paper Table 1: PointNet++ (MSG) 1.74M


def test_seg_parameter_counts_follow_the_layer_lists() -> None:
    # official pointnet2_sem_seg (SSG) and yanx27 pointnet2_sem_seg_msg, with 3 feature channels and 13 classes
    sa = _mlp(6, [32, 32, 64]) + _mlp(3 + 64, [64, 64, 128]) + _mlp(3 + 128, [128, 128, 256]) \
        + _mlp(3 + 256, [256, 256, 512])
    fp = _mlp(512 + 256, [256, 256]) + _mlp(256 + 128, [256, 256]) + _mlp(256 + 64, [256, 128]) \
        + _mlp(128, [128, 128, 128])
    head = _conv_bn(128, 128) + 128 * 13 + 13
    ssg = build_from_yaml("pointnet2_ssg_seg", 3, 13)
    assert n_params(ssg) == sa + fp + head == 968_077
    assert n_params(ssg.head) == head
    msa = _mlp(6, [16, 16, 32]) + _mlp(6, [32, 32, 64]) + _mlp(3 + 96, [64, 64, 128]) + _mlp(3 + 96, [64, 96, 128]) \
        + 2 * _mlp(3 + 256, [128, 196, 256]) + _mlp(3 + 512, [256, 256, 512]) + _mlp(3 + 512, [256, 384, 512])
    mfp = _mlp(1024 + 512, [256, 256]) + _mlp(256 + 256, [256, 256]) + _mlp(256 + 96, [256, 128]) \
        + _mlp(128, [128, 128, 128])
    assert n_params(build_from_yaml("pointnet2_msg_seg", 3, 13)) == msa + mfp + head == 1_882_981


def _naive_branch(branch, xyz, feat, offset, centres, centre_offset):
    """The reference formulation: group [xyz_j - c, f_j], shared MLP on every neighbour, max-pool."""
    idx = ball_query(centres, xyz, branch.radius, branch.max_neighbors, centre_offset, offset,
                     order=branch.ball_query_order)
    idx = torch.where(idx < 0, idx[:, :1], idx)
    h = group_relative(centres, xyz, idx, feat)  # [M, k, 3 + C]
    for linear, norm in zip(branch.linears, branch.norms, strict=True):
        h = F.relu(plain_bn(norm, linear(h)))
    return h.amax(1)


@pytest.mark.parametrize("order", ["index", "distance"])
def test_set_abstraction_equals_the_grouped_reference_formulation(order: str) -> None:
    batch = ragged_objects([200, 120], in_channels=4)
    sa = SetAbstraction(4, radii=[0.15, 0.4], max_neighbors=[8, 32], widths=[[16, 16, 32], [16, 24]],
                        num_samples=64, ball_query_order=order)
    _randomise_bn(sa)  # includes negative scales, where the pooled BN must take the minimum
    sa.eval()
    centres, out, centre_offset = sa(batch.coord, batch.feat, batch.offset)
    assert out.shape == (128, 32 + 24) and centre_offset.tolist() == [64, 128]
    expected = torch.cat([_naive_branch(b, batch.coord, batch.feat, batch.offset, centres, centre_offset)
                          for b in sa.branches], 1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def _official_grouping(centres, xyz, radius, nsample, centre_offset, offset):
    """The official kernel's indices: the first nsample rows inside the ball, unused slots = the first found."""
    idx = ball_query_reference(centres, xyz, radius, nsample, centre_offset, offset, order="index")
    return torch.where(idx < 0, idx[:, :1], idx)


def test_training_step_equals_the_official_grouping_with_filled_duplicates() -> None:
    # In training, BatchNorm statistics run over every (centre, slot) pair, the first-found duplicates included,
    # as in the official network (tf_util.conv2d + batch_norm over [B, npoint, nsample]); so the filled slots
    # matter there, and the whole set abstraction must equal the official formulation in train mode too.
    torch.manual_seed(0)
    batch = ragged_objects([2000, 1200], in_channels=2)
    sa = SetAbstraction(2, radii=[0.35], max_neighbors=[32], widths=[[16, 32]], num_samples=96).train()
    _, out, centre_offset = sa(batch.coord, batch.feat, batch.offset)
    centres = batch.coord[farthest_point_sample(batch.coord, batch.offset, n=96)]
    assert centre_offset.tolist() == sample_offset(batch.offset, n=96).tolist()
    idx = _official_grouping(centres, batch.coord, 0.35, 32, centre_offset, batch.offset)
    full = (ball_query(centres, batch.coord, 0.35, 32, centre_offset, batch.offset, order="index") >= 0).all(1)
    assert 0 < int(full.sum()) < len(full)  # some balls hold more than 48 points, some fewer: both cases count
    branch = sa.branches[0]
    h = group_relative(centres, batch.coord, idx, batch.feat)
    for linear, norm in zip(branch.linears, branch.norms, strict=True):
        z = linear(h)
        mean, var = z.mean((0, 1)), z.var((0, 1), unbiased=False)  # batch statistics over all slots
        h = F.relu((z - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias)
    torch.testing.assert_close(out, h.amax(1), atol=1e-5, rtol=1e-5)


def test_index_grouping_follows_the_input_order_and_distance_grouping_ignores_it() -> None:
    batch = ragged_objects([1024, 700], seed=6)  # fuller balls than nsample: which points are kept matters
    shuffled, _ = permute_within_clouds(batch, seed=1)
    for order, invariant in (("index", False), ("distance", True)):
        model = build_from_yaml("pointnet2_ssg_cls", 3, 5, ball_query_order=order).eval()
        with torch.no_grad():
            same = torch.allclose(model.forward_features(batch), model.forward_features(shuffled), atol=1e-5,
                                  rtol=1e-4)
        assert same == invariant, order


def _randomise_bn(module: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(5)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            c = m.num_features
            m.weight.data = torch.randn(c, generator=g)
            m.bias.data = torch.randn(c, generator=g)
            m.running_mean = torch.randn(c, generator=g)
            m.running_var = torch.rand(c, generator=g) + 0.5


def test_global_set_abstraction_equals_mlp_then_cloud_max_for_equal_and_ragged_clouds() -> None:
    for lengths in ([40, 40], [40, 25, 0]):
        batch = ragged_objects(lengths, in_channels=2) if all(lengths) else ragged_objects([40, 25], in_channels=2)
        offset = torch.tensor(lengths).cumsum(0)
        gsa = GlobalSetAbstraction(2, [8, 16])
        _randomise_bn(gsa)
        gsa.eval()
        out = gsa(batch.coord, batch.feat, offset)
        h = F.relu(plain_bn(gsa.last_norm, gsa.last(gsa.mlp(torch.cat([batch.coord, batch.feat], 1)))))
        expected = torch.stack([h[a:b].amax(0) if b > a else h.new_zeros(16)
                                for a, b in zip([0, *offset[:-1].tolist()], offset.tolist(), strict=True)])
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_pooled_batchnorm_matches_batchnorm_relu_max() -> None:
    # Outputs, gradients (input, weight, bias) and running statistics of the fused layer against
    # nn.BatchNorm1d + ReLU + amax, in float64, with negative scales, over train / eval / train steps.
    torch.manual_seed(0)
    norm = BatchNormReLUMax(6).double()
    ref = torch.nn.BatchNorm1d(6).double()
    norm.weight.data = torch.randn(6, dtype=torch.float64)
    ref.load_state_dict(norm.state_dict())
    h = (torch.randn(30, 7, 6, dtype=torch.float64) * 3 + 2).requires_grad_()
    for training in (True, False, True):
        norm.train(training)
        ref.train(training)
        out = norm(h)
        expected = F.relu(ref(h.reshape(-1, 6))).reshape(30, 7, 6).amax(1)
        torch.testing.assert_close(out, expected)
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, [h, norm.weight, norm.bias], g)
        want = torch.autograd.grad(expected, [h, ref.weight, ref.bias], g)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(norm.state_dict()[key], value)
    assert torch.autograd.gradcheck(lambda x: norm.eval()(x), (h,))


def test_feature_propagation_equals_interpolate_then_concat_then_mlp() -> None:
    fine = ragged_objects([90, 70], in_channels=5, seed=1)
    coarse = ragged_objects([20, 10], in_channels=12, seed=2)
    fp = FeaturePropagation(12, 5, [16, 8]).eval()
    out = fp(fine.coord, fine.feat, fine.offset, coarse.coord, coarse.feat, coarse.offset)
    up = interpolate(fine.coord, coarse.coord, coarse.feat, 3, fine.offset, coarse.offset)  # reference op
    expected = fp.rest(F.relu(fp.first_norm(fp.first(torch.cat([up, fine.feat], 1)))))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_decoder_interpolates_with_the_one_ops_interpolate(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every FP layer goes through pcbench.ops.interpolate (no model-local IDW helper), and its output and the
    # gradients of the coarse features and the weights equal a brute-force float64 IDW reference.
    import pcbench.models.layers as layers  # noqa: PLC0415
    import pcbench.models.pointnet2 as pn2  # noqa: PLC0415

    assert not hasattr(layers, "idw_interpolate")
    calls = []
    real = pn2.interpolate
    monkeypatch.setattr(pn2, "interpolate", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with torch.no_grad():
        build_from_yaml("pointnet2_ssg_seg", 3, 4).eval()(ragged_objects([100, 80], seed=4))
    assert len(calls) == 4  # one per FP level

    fine = ragged_objects([90, 70, 5], in_channels=5, seed=1)
    coarse = ragged_objects([20, 10, 2], in_channels=12, seed=2)  # 2 < k: a missing neighbour
    fp = FeaturePropagation(12, 5, [16, 8]).double().eval()
    cf = coarse.feat.double().requires_grad_(True)
    out = fp(fine.coord.double(), fine.feat.double(), fine.offset, coarse.coord.double(), cf, coarse.offset)
    up = naive_idw(fine.coord, coarse.coord, cf, fine.offset, coarse.offset, 3)
    ref = fp.rest(F.relu(fp.first_norm(fp.first(torch.cat([up, fine.feat.double()], 1)))))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    r = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    params = (cf, fp.first.weight, fp.first.bias)
    for a, b in zip(torch.autograd.grad((out * r).sum(), params), torch.autograd.grad((ref * r).sum(), params),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_empty_and_tiny_clouds() -> None:
    model = build_from_yaml("pointnet2_ssg_cls", 3, 4).eval()
    full = ragged_objects([64, 3], seed=3)
    with_empty = PointBatch(full.coord, full.feat, torch.tensor([64, 64, 67]))
    with torch.no_grad():
        a, b = model(full), model(with_empty)
    assert b.shape == (3, 4) and torch.isfinite(b).all()
    torch.testing.assert_close(b[[0, 2]], a, atol=1e-5, rtol=1e-5)
    seg = build_from_yaml("pointnet2_ssg_seg", 3, 4).eval()
    with torch.no_grad():
        out = seg(with_empty)
    assert out.shape == (67, 4) and torch.isfinite(out).all()


def test_float64_matches_float32() -> None:
    batch = ragged_objects([100, 80], seed=4)
    model = build_from_yaml("pointnet2_ssg_seg", 3, 6).eval()
    with torch.no_grad():
        out32 = model(batch)
        out64 = model.double()(PointBatch(batch.coord.double(), batch.feat.double(), batch.offset))
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), out32, atol=1e-4, rtol=1e-4)


def test_invalid_configuration_raises() -> None:
    with pytest.raises(ValueError, match="radii, max_neighbors and widths"):
        SetAbstraction(3, radii=[0.1, 0.2], max_neighbors=[16], widths=[[8]], num_samples=8)
    with pytest.raises(ValueError, match="exactly one of num_samples or sample_ratio"):
        SetAbstraction(3, radii=[0.1], max_neighbors=[16], widths=[[8]])
    with pytest.raises(ValueError, match="num_samples needs one entry per level"):
        PointNet2Cls(3, 4, radii=[[0.2]], max_neighbors=[[8]], widths=[[[8]]], num_samples=[64, 16])
    with pytest.raises(ValueError, match="radius and max_neighbors must be positive"):
        SetAbstraction(3, radii=[0.0], max_neighbors=[16], widths=[[8]], num_samples=8)
    with pytest.raises(ValueError, match="ball_query_order must be one of"):
        PointNet2Cls(3, 4, radii=[[0.2]], max_neighbors=[[8]], widths=[[[8]]], num_samples=[16],
                     ball_query_order="first")


@pytest.mark.slow
def test_ssg_cls_overfits_real_modelnet(shared_data: Path) -> None:
    batch = modelnet_batch(shared_data, 256)
    torch.manual_seed(0)
    model = PointNet2Cls(3, 40, num_samples=[512, 128], radii=[[0.2], [0.4]], max_neighbors=[[32], [64]],
                         widths=[[[64, 64, 128]], [[128, 128, 256]]], dropout=0.0)
    losses = overfit(model, batch, batch.label, steps=30)
    assert losses[-1] < 0.1 * losses[0], losses


@pytest.mark.slow
def test_ssg_seg_overfits_real_scannet(shared_data: Path) -> None:
    batch, num_classes = scannet_crop(shared_data, size=2.0)  # ~2.1k points, 3 classes
    torch.manual_seed(0)
    model = build_from_yaml("pointnet2_ssg_seg", 3, num_classes)
    model.head = type(model.head)(128, [128], num_classes, dropout=0.0)
    losses = overfit(model, batch, batch.label, steps=60, lr=3e-3)
    assert losses[-1] < 0.1 * losses[0], losses
