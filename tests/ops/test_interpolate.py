"""IDW interpolation against the float64 reference and an independent scipy cKDTree + numpy version."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pcbench.ops import dispatch_as
from pcbench.ops._reference import interpolate_reference
from pcbench.ops.fps import farthest_point_sample
from pcbench.ops.interpolate import interpolate
from pcbench.testing.clouds import load_modelnet_txt, scan_like_scene, uniform_cloud


def _scipy_idw(query: np.ndarray, support: np.ndarray, feat: np.ndarray, k: int) -> np.ndarray:
    """Independent IDW: cKDTree neighbours, weights 1 / (dist + 1e-8), normalised."""
    from scipy.spatial import cKDTree

    dist, idx = cKDTree(support).query(query, k=k)
    dist, idx = dist.reshape(len(query), k), idx.reshape(len(query), k)
    w = 1.0 / (dist + 1e-8)
    w /= w.sum(1, keepdims=True)
    return (feat[idx] * w[..., None]).sum(1)


def test_matches_scipy_on_a_scene():
    support = scan_like_scene(3000, seed=1, dtype=torch.float64)
    query = scan_like_scene(5000, seed=2, dtype=torch.float64)
    feat = torch.randn(3000, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = interpolate(query, support, feat, k=3)
    want = _scipy_idw(query.numpy(), support.numpy(), feat.numpy(), 3)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_ragged_batches_with_empty_and_tiny_clouds(k):
    # clouds: normal, empty support (-> zeros), support smaller than k (missing weigh 0), empty query
    sl = [400, 0, 2, 50]
    ql = [300, 40, 25, 0]
    support = torch.cat([uniform_cloud(n, seed=i) for i, n in enumerate(sl)])
    query = torch.cat([uniform_cloud(n, seed=10 + i) for i, n in enumerate(ql)])
    so, qo = torch.cumsum(torch.tensor(sl), 0), torch.cumsum(torch.tensor(ql), 0)
    feat = torch.randn(support.shape[0], 5, generator=torch.Generator().manual_seed(1))
    got = interpolate(query, support, feat, k, qo, so)
    want = interpolate_reference(query, support, feat, k, qo, so)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[300:340], torch.zeros(40, 5))  # empty support cloud
    if k < 2:
        return
    # cloud with 2 support points: an exact mix of those two rows only
    q, s, f = query[340:365].double(), support[400:402].double(), feat[400:402].double()
    w = 1.0 / (torch.cdist(q, s) + 1e-8)
    torch.testing.assert_close(got[340:365].double(), (w / w.sum(1, keepdim=True)) @ f, rtol=1e-5, atol=1e-6)


def test_duplicate_support_points_and_exact_hits():
    support = torch.tensor([[0.0, 0, 0], [0.0, 0, 0], [1.0, 0, 0], [5.0, 5, 5]])
    feat = torch.tensor([[1.0], [3.0], [10.0], [100.0]], dtype=torch.float64)
    query = torch.tensor([[0.0, 0, 0], [0.5, 0, 0]])
    got = interpolate(query, support, feat, k=3)
    # query on the duplicates: both at distance 0 weigh 1e8 each, the third (distance 1) ~1
    w = torch.tensor([1e8, 1e8, 1.0 / (1 + 1e-8)], dtype=torch.float64)
    assert torch.allclose(got[0], (w / w.sum()) @ feat[:3])
    torch.testing.assert_close(got, interpolate_reference(query, support, feat, 3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_feature_dtypes(dtype):
    support = uniform_cloud(500, seed=3)
    query = uniform_cloud(700, seed=4)
    feat = torch.randn(500, 4, generator=torch.Generator().manual_seed(2)).to(dtype)
    got = interpolate(query, support, feat)
    assert got.dtype == dtype
    tol = {torch.float16: 2e-3, torch.float32: 1e-5, torch.float64: 1e-6}[dtype]
    torch.testing.assert_close(got.double(), interpolate_reference(query, support, feat).double(), rtol=tol, atol=tol)


def test_gradcheck_wrt_features():
    support = uniform_cloud(30, seed=5, dtype=torch.float64)
    query = uniform_cloud(20, seed=6, dtype=torch.float64)
    feat = torch.randn(30, 3, dtype=torch.float64, requires_grad=True)
    so, qo = torch.tensor([12, 12, 30]), torch.tensor([8, 14, 20])  # middle support cloud empty
    assert torch.autograd.gradcheck(lambda f: interpolate(query, support, f, 4, qo, so), (feat,))


def test_modelnet_upsampling_matches_scipy(shared_data):
    coord, _ = load_modelnet_txt(shared_data / "modelnet40/modelnet40_normal_resampled/airplane/airplane_0126.txt")
    sub = farthest_point_sample(coord, n=512)
    feat = torch.randn(512, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got = interpolate(coord.double(), coord[sub].double(), feat, k=3)
    want = _scipy_idw(coord.double().numpy(), coord[sub].double().numpy(), feat.numpy(), 3)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-12)


def test_bad_arguments_are_named():
    q, s, f = uniform_cloud(5), uniform_cloud(6), torch.rand(6, 2)
    with pytest.raises(ValueError, match=r"features has 5 rows but support has 6"):
        interpolate(q, s, torch.rand(5, 2))
    with pytest.raises(ValueError, match=r"features must be a floating \[N, C\] tensor, got shape \[6\]"):
        interpolate(q, s, torch.rand(6))
    with pytest.raises(ValueError, match=r"k must be a positive int number of neighbours, got 0"):
        interpolate(q, s, f, k=0)
    with pytest.raises(ValueError, match=r"query is torch.float64 but support is torch.float32"):
        interpolate(q.double(), s, f)
    with pytest.raises(ValueError, match=r"query_offset has 2 clouds but support_offset has 1"):
        interpolate(q, s, f, query_offset=torch.tensor([2, 5]), support_offset=torch.tensor([6]))
    with pytest.raises(ValueError, match=r"support_offset\[-1\] must equal the number of points 6"):
        interpolate(q, s, f, support_offset=torch.tensor([5]))
    bad = q.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"query contains NaN or inf in 1 rows"):
        interpolate(bad, s, f)


@pytest.mark.parametrize("path", ["cpu", "cuda"])
@pytest.mark.parametrize("exponent", [70, 100, 120])
def test_extreme_coordinate_scales_keep_the_weights(exponent, path):
    # float32 dist2 saturates to inf beyond ~1.8e19: the weights then came out 0 and every row 0. IDW weights
    # are scale-free (up to the 1e-8 term), so the scaled clouds must give the unscaled result. The GPU branch
    # repairs the saturated rows without a host read.
    support = scan_like_scene(800, seed=4, dtype=torch.float64).float()
    query = scan_like_scene(300, seed=5, dtype=torch.float64).float()
    feat = torch.randn(800, 5, generator=torch.Generator().manual_seed(1))
    ref = interpolate(query, support, feat, 3)
    with dispatch_as(path):
        got = interpolate(query * 2.0**exponent, support * 2.0**exponent, feat, 3)
        # a batch of a saturated and a plain cloud: each as on its own (the plain one within float32 rounding:
        # the CPU branch takes the whole batch's weights in float64 once any row saturates)
        both = interpolate(torch.cat([query * 2.0**exponent, query]), torch.cat([support * 2.0**exponent, support]),
                           torch.cat([feat, feat]), 3, torch.tensor([300, 600]), torch.tensor([800, 1600]))
    assert bool(ref.abs().sum(1).gt(0).all())
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both, torch.cat([ref, ref]), rtol=1e-5, atol=1e-6)
