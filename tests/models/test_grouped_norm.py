"""Grouped BatchNorm layers on compact rows (``Repeats``, variable-size groups) against nn.BatchNorm1d on the
expanded tensor, and a PointNet++ set abstraction training step against the grouped reference formulation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from pcbench.models.layers import BatchNormReLUMax, PointBatchNorm
from pcbench.models.layers.grouped import CompactGroups
from pcbench.models.layers.norm import Repeats
from pcbench.models.pointnet2 import SetAbstraction
from pcbench.ops import ball_query, dispatch_as, group_relative
from tests.models._helpers import ragged_objects


def _compact(seed: int = 0, c: int = 5) -> tuple[torch.Tensor, Repeats, torch.Tensor]:
    """Distinct rows [V, C], their repeats, and the expansion index (expanded row i = compact row expand[i])."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(12, c, generator=g, dtype=torch.float64) * 2 + 1)
    rows = torch.tensor([0, 3, 7, 11])
    extra = torch.tensor([2.0, 1.0, 5.0, 3.0], dtype=torch.float64)
    expand = torch.cat([torch.arange(12), rows.repeat_interleave(extra.long())])
    return x, Repeats(rows, extra, 12 + int(extra.sum())), expand


def _pair(cls: type, c: int) -> tuple[torch.nn.BatchNorm1d, torch.nn.BatchNorm1d]:
    norm = cls(c).double()
    norm.weight.data = torch.randn(c, dtype=torch.float64)  # includes negative scales
    norm.bias.data = torch.randn(c, dtype=torch.float64)
    ref = torch.nn.BatchNorm1d(c).double()
    ref.load_state_dict(norm.state_dict())
    return norm, ref


def test_batchnorm_relu_with_repeats_equals_batchnorm_on_the_expanded_rows() -> None:
    x, repeats, expand = _compact()
    norm, ref = _pair(PointBatchNorm, x.shape[1])
    x.requires_grad_()
    for training in (True, False, True):
        norm.train(training)
        ref.train(training)
        out = norm.forward_relu(x, repeats)
        expected_full = F.relu(ref(x[expand]))
        torch.testing.assert_close(out[expand], expected_full)
        g_full = torch.randn_like(expected_full)
        # The compact row's gradient is the sum of its copies' gradients.
        g = torch.zeros_like(out).index_add_(0, expand, g_full)
        got = torch.autograd.grad(out, [x, norm.weight, norm.bias], g)
        want = torch.autograd.grad(expected_full, [x, ref.weight, ref.bias], g_full)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(norm.state_dict()[key], value)
    # without repeats it is BatchNorm1d + ReLU
    plain = norm.forward_relu(x)
    torch.testing.assert_close(plain, F.relu(ref(x)))
    norm.train()
    assert torch.autograd.gradcheck(lambda v: norm.forward_relu(v, repeats), (x,))


@pytest.mark.parametrize("dispatch", ["cpu", "cuda"])
def test_pooled_batchnorm_over_variable_size_groups_with_repeats(dispatch: str) -> None:
    # "cuda": the GPU path pools h * (+-1) per channel instead of asking the host about negative scales.
    with dispatch_as(dispatch):
        x, repeats, expand = _compact(seed=1)
        norm, ref = _pair(BatchNormReLUMax, x.shape[1])
        blocks = ((4, 2), (2, 1), (1, 2))  # groups: rows 0-3, 4-7, 8-9, 10, 11
        groups = [(0, 4), (4, 8), (8, 10), (10, 11), (11, 12)]
        x.requires_grad_()
        for training in (True, False, True):
            norm.train(training)
            ref.train(training)
            out = norm.pool(x, blocks, repeats)
            full = F.relu(ref(x[expand]))[: x.shape[0]]  # statistics over every copy; the copies pool like the original
            expected = torch.stack([full[a:b].amax(0) for a, b in groups])
            torch.testing.assert_close(out, expected)
            g = torch.randn_like(out)
            got = torch.autograd.grad(out, [x, norm.weight, norm.bias], g)
            want = torch.autograd.grad(expected, [x, ref.weight, ref.bias], g)
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a, b)
        for key, value in ref.state_dict().items():
            torch.testing.assert_close(norm.state_dict()[key], value)
        assert torch.autograd.gradcheck(lambda v: norm.pool(v, blocks, repeats), (x,))
        with pytest.raises(ValueError, match="blocks"):
            norm.pool(x, ((4, 2),), repeats)


def test_compact_groups_describe_the_padded_ball_query() -> None:
    idx = torch.tensor([[5, 2, -1, -1], [7, 1, 3, 0], [4, -1, -1, -1], [6, 8, -1, -1]])
    groups = CompactGroups.from_ball_query(idx)
    assert groups.order.tolist() == [1, 0, 3, 2] and groups.blocks == ((4, 1), (2, 2), (1, 1))
    assert groups.neighbour.tolist() == [7, 1, 3, 0, 5, 2, 6, 8, 4]
    rep = groups.repeats
    assert rep.rows.tolist() == [4, 6, 8] and rep.extra.tolist() == [2.0, 2.0, 3.0] and rep.total == 16
    # gather: per_point[neighbour] + per_centre[centre], gradients summed back to points and centres
    g = torch.Generator().manual_seed(0)
    per_point = torch.randn(9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    per_centre = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    centre = torch.tensor([1, 1, 1, 1, 0, 0, 3, 3, 2])
    torch.testing.assert_close(groups.gather(per_point, per_centre), per_point[groups.neighbour] + per_centre[centre])
    assert torch.autograd.gradcheck(groups.gather, (per_point, per_centre))
    pooled = torch.arange(4.0).unsqueeze(1)  # group g -> row g
    assert groups.to_centre_order(pooled).squeeze(1).tolist() == [1.0, 0.0, 3.0, 2.0]
    with pytest.raises(ValueError, match="at least one neighbour"):
        CompactGroups.from_ball_query(torch.tensor([[-1, -1], [1, 2]]))


def _reference_branch(branch, xyz, feat, offset, centres, centre_offset):  # noqa: ANN001, ANN202
    """Grouped reference: [xyz_j - c, f_j] of all k (padding = copies of the first), MLP + BatchNorm1d, max."""
    idx = ball_query(centres, xyz, branch.radius, branch.max_neighbors, centre_offset, offset,
                     order=branch.ball_query_order)
    idx = torch.where(idx < 0, idx[:, :1], idx)
    h = group_relative(centres, xyz, idx, feat)  # [M, k, 3 + C]
    for linear, norm in zip(branch.linears, branch.norms, strict=True):
        h = linear(h)
        h = F.relu(torch.nn.BatchNorm1d.forward(norm, h.reshape(-1, h.shape[-1])).view(h.shape))
    return h.amax(1)


@pytest.mark.parametrize("dispatch", ["cpu", "cuda"])
@pytest.mark.parametrize("order", ["index", "distance"])
def test_set_abstraction_training_step_equals_the_grouped_reference(order: str, dispatch: str) -> None:
    # "cuda": padded groups (copies of column 0), dense ball query and sign pooling, i.e. the GPU code path.
    with dispatch_as(dispatch):
        # Ragged clouds and small radii: many centres with padded balls, several group sizes.
        batch = ragged_objects([150, 90], in_channels=4)
        torch.manual_seed(0)
        sa = SetAbstraction(4, radii=[0.2, 0.5], max_neighbors=[8, 24], widths=[[16, 16, 32], [16, 24]],
                            num_samples=48, ball_query_order=order).double().train()
        for m in sa.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.weight.data = torch.randn(m.num_features, dtype=torch.float64)
        ref = copy.deepcopy(sa)
        xyz_a, feat_a = batch.coord.double().requires_grad_(), batch.feat.double().requires_grad_()
        xyz_b, feat_b = batch.coord.double().requires_grad_(), batch.feat.double().requires_grad_()
        centres, out, centre_offset = sa(xyz_a, feat_a, batch.offset)
        sel = torch.cdist(centres.detach(), xyz_b.detach()).argmin(1)
        expected = torch.cat([_reference_branch(b, xyz_b, feat_b, batch.offset, xyz_b[sel], centre_offset)
                              for b in ref.branches], 1)
        torch.testing.assert_close(out, expected)
        g = torch.randn_like(out)
        params = [p for p in sa.parameters()]
        got = torch.autograd.grad(out, [xyz_a, feat_a, *params], g)
        want = torch.autograd.grad(expected, [xyz_b, feat_b, *ref.parameters()], g)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)
        for (key, value), (_, other) in zip(sa.state_dict().items(), ref.state_dict().items(), strict=True):
            torch.testing.assert_close(value, other, msg=key)
