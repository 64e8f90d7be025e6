"""group / group_relative against explicit loops, gradients, -1 padding and bad indices."""

from __future__ import annotations

import pytest
import torch

from pcbench.ops.grouping import group, group_relative
from pcbench.ops.knn import knn
from pcbench.testing.clouds import uniform_cloud


def _loop_group(features: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(idx.shape[0], idx.shape[1], features.shape[1], dtype=features.dtype)
    for i in range(idx.shape[0]):
        for j in range(idx.shape[1]):
            if idx[i, j] >= 0:
                out[i, j] = features[idx[i, j]]
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_group_matches_loop_with_missing_neighbours(dtype):
    feat = torch.randn(10, 4, generator=torch.Generator().manual_seed(0)).to(dtype)
    idx = torch.tensor([[0, 9, -1], [3, 3, 3], [-1, -1, -1], [5, 2, 7]])
    out = group(feat, idx)
    assert out.shape == (4, 3, 4) and out.dtype == dtype
    assert torch.equal(out, _loop_group(feat, idx))
    assert torch.equal(out[2], torch.zeros(3, 4, dtype=dtype))
    assert torch.equal(group(feat, idx.int()), out)


def test_group_relative_matches_loop_on_knn():
    support = uniform_cloud(40, seed=1)
    query = uniform_cloud(15, seed=2)
    so, qo = torch.tensor([2, 40]), torch.tensor([7, 15])
    idx, _ = knn(query, support, 4, qo, so)  # first cloud has 2 support points: two -1 per row
    assert bool((idx[:7, 2:] == -1).all())
    feat = torch.randn(40, 3, generator=torch.Generator().manual_seed(1))
    rel = group_relative(query, support, idx)
    both = group_relative(query, support, idx, feat)
    only = group_relative(query, support, idx, feat, with_xyz=False)
    for i in range(15):
        for j in range(4):
            m = int(idx[i, j])
            want = support[m] - query[i] if m >= 0 else torch.zeros(3)
            assert torch.equal(rel[i, j], want)
            assert torch.equal(both[i, j, 3:], feat[m] if m >= 0 else torch.zeros(3))
    assert torch.equal(both[..., :3], rel) and torch.equal(only, both[..., 3:])


def test_gradcheck():
    feat = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[0, 1, -1], [1, 1, 7], [-1, 4, 0]])  # repeats accumulate, -1 gets no gradient
    assert torch.autograd.gradcheck(lambda f: group(f, idx), (feat,))
    q = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    s = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, f: group_relative(a, b, idx, f), (q, s, feat))
    g = torch.autograd.grad(group(feat, idx).sum(), feat)[0]
    assert g[:, 0].tolist() == [2.0, 3.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0]


def test_bad_indices_are_named():
    feat = torch.rand(5, 2)
    with pytest.raises(ValueError, match=r"idx values must be in \[-1, 4\] .* got \[0, 5\]"):
        group(feat, torch.tensor([[0, 5]]))
    with pytest.raises(ValueError, match=r"idx values must be in \[-1, 4\] .* got \[-2, 1\]"):
        group(feat, torch.tensor([[1, -2]]))
    with pytest.raises(ValueError, match=r"idx must be an integer \[M, k\] tensor, got shape \[2\] dtype torch.int64"):
        group(feat, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"idx must be an integer \[M, k\] tensor, got shape \[1, 2\] dtype torch.float32"):
        group(feat, torch.tensor([[0.0, 1.0]]))
    with pytest.raises(ValueError, match=r"features must be \[N, C\], got shape \[5\]"):
        group(feat[:, 0], torch.tensor([[0]]))
    with pytest.raises(ValueError, match=r"query has 3 rows but idx has 1; pass one idx row per query point"):
        group_relative(torch.rand(3, 3), torch.rand(5, 3), torch.tensor([[0]]))
