"""knn against scipy's cKDTree and the float64 brute-force reference, over the awkward cases."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from pcbench.ops import knn
from pcbench.ops._reference import knn_reference
from pcbench.testing.clouds import (
    load_modelnet_txt,
    load_scannet_scene,
    object_batch,
    scan_like_scene,
    uniform_cloud,
)

METHODS = ("grid", "dense", "auto")
# the module, not the function that pcbench.ops re-exports under the same name
knn_mod = importlib.import_module("pcbench.ops.knn")


# a few units in the last place: summation order of the three squared differences may differ
_ULPS = {torch.float16: 2e-3, torch.float32: 2.5e-7, torch.float64: 1e-15}


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-2, "atol": 1e-3} if dtype == torch.float16 else {"rtol": 1e-5, "atol": 0.0}


def check_against_reference(q, s, k, qo=None, so=None, method="auto"):
    """Same distance set as the float64 reference for every query, and idx consistent with dist2."""
    idx, d2 = knn(q, s, k, qo, so, method=method)
    ridx, rd2 = knn_reference(q, s, k, qo, so)
    assert idx.shape == (q.shape[0], k) and idx.dtype == torch.long
    assert d2.shape == (q.shape[0], k) and d2.dtype == q.dtype
    assert torch.equal(idx < 0, ridx < 0)
    assert torch.equal(torch.isinf(d2), idx < 0)
    torch.testing.assert_close(d2, rd2, **_tol(q.dtype))
    check_consistent(q, s, idx, d2, qo, so)
    return idx, d2


def check_consistent(q, s, idx, d2, qo=None, so=None):
    """idx rows are distinct, in the query's cloud, ascending, and reproduce dist2."""
    ok = idx >= 0
    m = q.shape[0]
    qb = _batch(qo, m)
    sb = _batch(so, s.shape[0])
    assert torch.equal(sb[idx.clamp(min=0)][ok], qb[:, None].expand_as(idx)[ok])
    diff = q.double()[:, None, :] - s.double()[idx.clamp(min=0)]
    exact = (diff * diff).sum(-1).to(q.dtype)
    torch.testing.assert_close(d2[ok], exact[ok], rtol=_ULPS[q.dtype], atol=0)
    assert bool((d2[:, 1:] >= d2[:, :-1]).logical_or(torch.isinf(d2[:, 1:])).all())
    srt = torch.sort(idx, dim=1).values
    assert not bool(((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any())


def _batch(offset, n):
    if offset is None:
        return torch.zeros(n, dtype=torch.long)
    lengths = torch.diff(offset, prepend=offset.new_zeros(1))
    return torch.repeat_interleave(torch.arange(offset.numel()), lengths)


def _ragged(sizes, gen, scale=1.0, dtype=torch.float32):
    pts = (torch.rand(sum(sizes), 3, generator=gen, dtype=torch.float64) * scale).to(dtype)
    return pts, torch.tensor(sizes).cumsum(0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("k", [1, 5, 16])
def test_ragged_batch_with_empty_single_and_small_clouds(method, k, gen):
    q, qo = _ragged([120, 0, 40, 1, 7, 300, 3], gen)
    s, so = _ragged([150, 6, 0, 1, 2, 260, 0], gen)
    check_against_reference(q, s, k, qo, so, method)


@pytest.mark.parametrize("method", METHODS)
def test_k_larger_than_every_cloud_pads_with_minus_one_and_inf(method, gen):
    q, qo = _ragged([5, 3], gen)
    s, so = _ragged([4, 2], gen)
    idx, d2 = check_against_reference(q, s, 9, qo, so, method)
    assert bool((idx[:5, 4:] == -1).all()) and bool((idx[5:, 2:] == -1).all())
    assert bool(torch.isinf(d2[:5, 4:]).all())


@pytest.mark.parametrize("method", METHODS)
def test_empty_query_or_support(method):
    s = torch.rand(10, 3)
    idx, d2 = knn(torch.zeros(0, 3), s, 4, method=method)
    assert idx.shape == (0, 4) and d2.shape == (0, 4)
    idx, d2 = knn(torch.rand(6, 3), torch.zeros(0, 3), 4, method=method)
    assert bool((idx == -1).all()) and bool(torch.isinf(d2).all())


@pytest.mark.parametrize("method", METHODS)
def test_duplicates_and_lattice_ties(method, gen):
    # Integer lattice: many exactly equal distances; plus 40 copies of one point.
    g = torch.arange(6, dtype=torch.float32)
    lattice = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    dup = torch.full((40, 3), 2.0)
    s = torch.cat([lattice, dup])
    q = torch.cat([lattice[::7], dup[:3], torch.rand(20, 3, generator=gen) * 5])
    check_against_reference(q, s, 12, method=method)
    check_against_reference(dup, dup, 8, method=method)  # all distances zero, extent zero


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("method", ("grid", "dense"))
def test_dtypes(dtype, method, gen):
    q, qo = _ragged([200, 50], gen, dtype=dtype)
    s, so = _ragged([300, 80], gen, dtype=dtype)
    check_against_reference(q, s, 10, qo, so, method)


@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e4])
@pytest.mark.parametrize("method", ("grid", "dense"))
def test_coordinate_scales_with_far_origin(scale, method, gen):
    # Far from the origin relative to the spacing: float32 cancellation would show here.
    base = torch.rand(3000, 3, generator=gen, dtype=torch.float64) * scale + 7.0 * scale
    q = base[:1500].float()
    s = base[1000:].float()
    check_against_reference(q, s, 8, method=method)


def test_query_set_differs_from_support_and_lies_outside_it(gen):
    s = torch.rand(2000, 3, generator=gen)
    q = torch.rand(300, 3, generator=gen) * 3.0 - 1.0  # partly far outside the support's box
    check_against_reference(q, s, 16, method="grid")


def test_non_uniform_scan_like_scene_matches_ckdtree():
    pts = scan_like_scene(30000, seed=1)
    # add isolated outliers so some queries must leave their stencil
    far = torch.tensor([[20.0, 20.0, 20.0], [-15.0, 3.0, 1.0], [4.0, 4.0, 30.0]])
    pts = torch.cat([pts, far])
    for k in (1, 16, 32):
        idx, d2 = knn(pts, pts, k)
        ref_d, _ = cKDTree(pts.double().numpy()).query(pts.double().numpy(), k=k)
        ref = torch.from_numpy(np.asarray(ref_d).reshape(len(pts), k) ** 2).float()
        torch.testing.assert_close(d2, ref, rtol=1e-5, atol=0.0)
        check_consistent(pts, pts, idx, d2)


def test_object_batch_matches_ckdtree_per_cloud():
    coord, offset = object_batch(6, 1024, seed=3)
    idx, d2 = knn(coord, coord, 16, offset, offset)
    check_consistent(coord, coord, idx, d2, offset, offset)
    start = 0
    for end in offset.tolist():
        c = coord[start:end].double().numpy()
        dd, ii = cKDTree(c).query(c, k=16)
        torch.testing.assert_close(d2[start:end], torch.from_numpy(dd**2).float(), rtol=1e-5, atol=0.0)
        start = end


@pytest.mark.parametrize("k", [8, 32])
def test_forced_methods_agree(k):
    q = uniform_cloud(4000, seed=5)
    s = uniform_cloud(5000, seed=6)
    ig, dg = knn(q, s, k, method="grid")
    idn, dd = knn(q, s, k, method="dense")
    torch.testing.assert_close(dg, dd, rtol=0, atol=0)
    # different indices only where distances tie
    diff = ig != idn
    assert bool((dg[diff] == dd[diff]).all())


def test_grid_coarsening_loop_is_exact_without_dense_fallback(monkeypatch, gen):
    # A dense cluster plus a sparse halo: many halo queries fail their first stencils.
    cluster = torch.rand(3000, 3, generator=gen) * 0.01
    halo = torch.rand(60, 3, generator=gen) * 10.0
    pts = torch.cat([cluster, halo])
    monkeypatch.setattr(knn_mod, "_FALLBACK_DENSE_WORK", 0)
    check_against_reference(pts, pts, 12, method="grid")


def test_real_scannet_scene_matches_ckdtree(shared_data):
    coord, _ = load_scannet_scene(shared_data / "scannet/scans/scene0000_00/scene0000_00_vh_clean_2.ply")
    q = coord[::4]
    idx, d2 = knn(q, coord, 16)
    dd, _ = cKDTree(coord.double().numpy()).query(q.double().numpy(), k=16)
    torch.testing.assert_close(d2, torch.from_numpy(dd**2).float(), rtol=1e-5, atol=0.0)
    check_consistent(q, coord, idx, d2)


def test_real_modelnet_batch_matches_reference(shared_data):
    root = shared_data / "modelnet40/modelnet40_normal_resampled"
    clouds = [load_modelnet_txt(root / f"{n.split('_')[0]}/{n}.txt")[0][:1500] for n in ("chair_0391", "sofa_0034")]
    coord = torch.cat(clouds)
    offset = torch.tensor([1500, 3000])
    for method in ("grid", "dense"):
        check_against_reference(coord, coord, 16, offset, offset, method)


@pytest.mark.slow
@pytest.mark.parametrize("n", [65536, 262144])
def test_scene_sizes_match_ckdtree(n):
    for pts in (uniform_cloud(n, seed=2), scan_like_scene(n, seed=2)):
        idx, d2 = knn(pts, pts, 16)
        dd, _ = cKDTree(pts.double().numpy()).query(pts.double().numpy(), k=16)
        torch.testing.assert_close(d2, torch.from_numpy(dd**2).float(), rtol=1e-5, atol=0.0)
        check_consistent(pts[:5000], pts, idx[:5000], d2[:5000])


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"query": torch.tensor([[0.0, math.nan, 0.0]])}, "query contains NaN or inf"),
        ({"support": torch.tensor([[0.0, math.inf, 0.0]])}, "support contains NaN or inf"),
        ({"query": torch.zeros(4, 2)}, r"query must have shape \[N, 3\]"),
        ({"support": torch.zeros(4)}, r"support must have shape \[N, 3\]"),
        ({"query": torch.zeros(4, 3, dtype=torch.long)}, "query must be a floating tensor"),
        ({"support": torch.zeros(4, 3, dtype=torch.float64)}, "must share a dtype"),
        ({"k": 0}, "k must be a positive int"),
        ({"k": -2}, "k must be a positive int"),
        ({"k": 2.5}, "k must be a positive int"),
        ({"k": True}, "k must be a positive int"),
        ({"query_offset": torch.tensor([3, 2, 5])}, "query_offset must be non-decreasing"),
        ({"support_offset": torch.tensor([2, 4])}, r"support_offset\[-1\] must equal the number of points 5"),
        ({"query_offset": torch.tensor([2.0, 5.0])}, "query_offset must be an integer tensor"),
        ({"query_offset": torch.tensor([2, 5]), "support_offset": torch.tensor([5])}, "same number of clouds"),
        ({"method": "kdtree"}, "method must be one of 'auto', 'dense', 'grid'"),
        ({"support": torch.zeros(5, 3, device="meta")}, "tensors must be on one device"),
    ],
)
def test_bad_inputs_raise_actionable_errors(kwargs, match):
    args = {"query": torch.rand(5, 3), "support": torch.rand(5, 3), "k": 3, "query_offset": None,
            "support_offset": None, "method": "auto"}
    args.update(kwargs)
    method = args.pop("method")
    with pytest.raises(ValueError, match=match):
        knn(**args, method=method)



def _extreme_batch(gen, exponents, dtype):
    """Clouds ``base * 2^e`` (base uniform in the unit cube, every other one shifted off the origin) plus an
    empty cloud: (points in ``dtype``, offsets, the base clouds in float64). Scaling by 2^e is exact, so the
    float64 brute force on the base clouds is the reference at any scale, even where squares overflow."""
    clouds, bases = [], []
    for i, e in enumerate(exponents):
        b = torch.rand(150 + 20 * i, 3, generator=gen, dtype=torch.float64) + (0.5 if i % 2 else 0.0)
        b = b.to(dtype).double()  # the values the input dtype can hold
        bases.append(b)
        clouds.append((b * 2.0**e).to(dtype))
    scale = torch.cat([torch.full((b.shape[0],), 2.0**e, dtype=torch.float64) for b, e in zip(bases, exponents,
                                                                                          strict=True)])
    clouds.insert(1, torch.zeros(0, 3, dtype=dtype))
    bases.insert(1, torch.zeros(0, 3, dtype=torch.float64))
    return torch.cat(clouds), torch.tensor([c.shape[0] for c in clouds]).cumsum(0), torch.cat(bases), scale


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("dtype", "exponents"), [
    (torch.float32, (66, 100, 124)),  # 7e19, 1.3e30, 2e37
    (torch.float32, (-66, -100, -124)),  # 1.4e-20, 7.9e-31, 4.7e-38
    (torch.float32, (100, 0, -100)),  # mixed scales in one batch
    (torch.float64, (530, -530, 0)),  # 3.5e159 (squares overflow float64), 2.9e-160
])
def test_exact_at_extreme_coordinate_scales(method, dtype, exponents, gen):
    # Float32 distances overflow beyond ~1.8e19 and flush to zero below ~1e-19: without rescaling, knn
    # returned -1 (huge clouds) or arbitrary neighbours (tiny clouds).
    p, off, base, scale = _extreme_batch(gen, exponents, dtype)
    k = 10
    idx, d2 = knn(p, p, k, off, off, method=method)
    _, rd2 = knn_reference(base, base, k, off, off)
    assert bool((idx >= 0).all()), "every cloud holds more than k points: no neighbour may be missing"
    diff = base[:, None, :] - base[idx]
    exact = (diff * diff).sum(-1)
    # the selected set is the k nearest: the reference's float64 distances, row by row
    torch.testing.assert_close(exact, rd2, rtol=1e-12, atol=0)
    cloud = torch.searchsorted(off, torch.arange(p.shape[0]), right=True)
    assert torch.equal(cloud[idx], cloud[:, None].expand_as(idx))
    # dist2 is the exact value at the input's scale, rounded to the input dtype (inf where it overflows)
    torch.testing.assert_close(d2, (exact * scale[:, None] * scale[:, None]).to(dtype), rtol=_ULPS[dtype], atol=0)


def test_unit_scale_factors_are_the_powers_of_two_frexp_gives() -> None:
    """The grid's rescaling of clouds at extreme scales, against math.frexp: 2^-e where |e| > 32, else 1."""
    import math

    from pcbench.ops._grid import _SAFE_EXP, unit_scale

    values = [0.0, 5e-324, 2.2e-308, 1e-300, 1e-30, 2.0**-33, 2.0**-32, 0.5, 1.0, 3.0, 2.0**32 * (1 - 2.0**-53),
              2.0**32, 1e20, 1e308]
    m = torch.tensor(values, dtype=torch.float64)
    lo, hi = torch.stack([-m / 2, m, m / 4], 1), torch.stack([m / 3, -m, m / 8], 1)  # largest |.| is m
    want = []
    for v in values:
        e = max(-1000, min(1000, math.frexp(v)[1]))
        want.append(2.0**-e if abs(e) > _SAFE_EXP else 1.0)
    assert unit_scale(lo, hi, always=True).tolist() == want
    assert unit_scale(lo[7:10], hi[7:10]) is None  # 0.5, 1, 3: nothing to rescale, no factors built
