"""ball_query against scipy's cKDTree ball search and the float64 brute-force reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from pcbench.ops import ball_query
from pcbench.ops._reference import ball_query_reference, knn_reference
from pcbench.testing.clouds import load_scannet_scene, object_batch, scan_like_scene, uniform_cloud

# a few units in the last place: summation order of the three squared differences may differ
_ULPS = {torch.float16: 2e-3, torch.float32: 2.5e-7, torch.float64: 1e-15}


def check_against_reference(q, s, radius, max_neighbors, qo=None, so=None, ties=False):
    """Same neighbour distances as the reference (ties may swap indices), valid and nearest first."""
    idx, d2 = ball_query(q, s, radius, max_neighbors, qo, so, return_dist2=True)
    ref = ball_query_reference(q, s, radius, max_neighbors, qo, so)
    _, rd2 = knn_reference(q, s, max_neighbors, qo, so)
    rd2 = torch.where(ref >= 0, rd2, torch.full_like(rd2, math.inf))
    assert idx.shape == (q.shape[0], max_neighbors) and idx.dtype == torch.long
    assert torch.equal(idx < 0, ref < 0)
    tol = {"rtol": 1e-2, "atol": 1e-3} if q.dtype == torch.float16 else {"rtol": 1e-6, "atol": 0.0}
    torch.testing.assert_close(d2, rd2, **tol)
    # idx consistent with dist2, inside the radius, ascending, padded only at the tail
    ok = idx >= 0
    diff = q.double()[:, None, :] - s.double()[idx.clamp(min=0)]
    exact = (diff * diff).sum(-1)
    torch.testing.assert_close(d2[ok], exact.to(q.dtype)[ok], rtol=_ULPS[q.dtype], atol=0)
    assert bool((exact[ok].to(q.dtype).double() < radius * radius).all())
    assert not bool((~ok[:, :-1] & ok[:, 1:]).any())
    assert bool((d2[:, 1:] >= d2[:, :-1]).logical_or(~ok[:, 1:]).all())
    if not ties:  # without exact ties the indices themselves must match (near-ties aside)
        assert float((idx == ref).float().mean()) > 0.999
    return idx, d2


def _ragged(sizes, gen, scale=1.0, dtype=torch.float32):
    pts = (torch.rand(sum(sizes), 3, generator=gen, dtype=torch.float64) * scale).to(dtype)
    return pts, torch.tensor(sizes).cumsum(0)


@pytest.mark.parametrize("radius", [0.02, 0.15, 0.4, 3.0])
@pytest.mark.parametrize("max_neighbors", [1, 8, 40])
def test_ragged_batch_with_empty_and_single_point_clouds(radius, max_neighbors, gen):
    q, qo = _ragged([150, 0, 30, 1, 200, 4], gen)
    s, so = _ragged([180, 5, 0, 1, 220, 0], gen)
    check_against_reference(q, s, radius, max_neighbors, qo, so)


def check_against_ckdtree(q, s, r, max_neighbors):
    """Neighbour counts and distances as scipy's cKDTree ball search (an independent implementation)."""
    idx, d2 = ball_query(q, s, r, max_neighbors, return_dist2=True)
    tree = cKDTree(s.double().numpy())
    counts = np.array([len(x) for x in tree.query_ball_point(q.double().numpy(), r)])
    # cKDTree counts closed balls (<= r); boundary hits have probability zero here
    got = (idx >= 0).sum(1).numpy()
    np.testing.assert_array_equal(got, np.minimum(counts, max_neighbors))
    dd, _ = tree.query(q.double().numpy(), k=max_neighbors, distance_upper_bound=r)
    ref = torch.from_numpy(np.where(np.isfinite(dd), dd**2, np.inf)).float()
    torch.testing.assert_close(d2, ref, rtol=1e-5, atol=0.0)
    ok = idx >= 0
    diff = q.double()[:, None, :] - s.double()[idx.clamp(min=0)]
    torch.testing.assert_close(d2[ok], (diff * diff).sum(-1).float()[ok], rtol=0, atol=0)


def test_matches_ckdtree_ball_counts_and_nearest_first():
    check_against_ckdtree(uniform_cloud(20000, seed=4), uniform_cloud(20000, seed=4), 0.05, 64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_dtypes(dtype, gen):
    q, qo = _ragged([300, 100], gen, dtype=dtype)
    s, so = _ragged([400, 50], gen, dtype=dtype)
    check_against_reference(q, s, 0.2, 16, qo, so)


@pytest.mark.parametrize("scale", [1e-4, 1e4])
def test_coordinate_scales(scale, gen):
    base = torch.rand(3000, 3, generator=gen, dtype=torch.float64) * scale + 5.0 * scale
    check_against_reference(base[:1000].float(), base[500:].float(), 0.1 * scale, 24)


def test_duplicates_and_lattice(gen):
    g = torch.arange(5, dtype=torch.float32)
    lattice = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    s = torch.cat([lattice, torch.full((30, 3), 1.0)])
    q = torch.cat([lattice, torch.rand(40, 3, generator=gen) * 4])
    # radius 1.5: the 6 unit neighbours (distance 1) in, the 12 at sqrt(2) in, sqrt(3) out
    check_against_reference(q, s, 1.5, 64, ties=True)


def test_radius_tiny_relative_to_extent():
    # 1e6 cells per dimension at this radius: the grid must clamp its cell count and stay exact.
    # (float32 near 1e3 has a 6e-5 spacing, so the second cluster holds exact duplicates: ties)
    pts = torch.cat([torch.rand(500, 3) * 1e-3, torch.rand(500, 3) * 1e-3 + 1e3])
    check_against_reference(pts, pts, 1e-6 * 3, 4, ties=True)
    check_against_reference(pts, pts, 2e-4, 16, ties=True)


def test_scan_like_scene_matches_reference_on_a_subset():
    pts = scan_like_scene(20000, seed=2)
    check_against_reference(pts[::100], pts, 0.1, 32)
    check_against_ckdtree(pts, pts, 0.05, 32)


def test_real_scannet_scene(shared_data):
    coord, _ = load_scannet_scene(shared_data / "scannet/scans/scene0000_00/scene0000_00_vh_clean_2.ply")
    check_against_ckdtree(coord[::3], coord, 0.05, 32)
    check_against_ckdtree(coord[::50], coord, 0.2, 64)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"radius": 0.0}, "radius must be a positive finite number"),
        ({"radius": -1.0}, "radius must be a positive finite number"),
        ({"radius": math.inf}, "radius must be a positive finite number"),
        ({"radius": math.nan}, "radius must be a positive finite number"),
        ({"max_neighbors": 0}, "max_neighbors must be a positive int"),
        ({"max_neighbors": 3.0}, "max_neighbors must be a positive int"),
        ({"query": torch.tensor([[0.0, math.nan, 0.0]])}, "query contains NaN or inf"),
        ({"support": torch.zeros(5, 4)}, r"support must have shape \[N, 3\]"),
        ({"query_offset": torch.tensor([4, 2, 5])}, "query_offset must be non-decreasing"),
        ({"support_offset": torch.tensor([3, 4])}, r"support_offset\[-1\] must equal the number of points 5"),
        ({"query_offset": torch.tensor([2, 5])}, "same number of clouds"),
        ({"support": torch.zeros(5, 3, device="meta")}, "tensors must be on one device"),
    ],
)
def test_bad_inputs_raise_actionable_errors(kwargs, match):
    args = {"query": torch.rand(5, 3), "support": torch.rand(5, 3), "radius": 0.5, "max_neighbors": 4}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ball_query(**args)



@pytest.mark.parametrize(("dtype", "exponent"), [
    (torch.float32, 76), (torch.float32, 100), (torch.float32, -76), (torch.float32, -100),
    (torch.float64, 530), (torch.float64, -530),
])
def test_exact_at_extreme_coordinate_scales(dtype, exponent, gen):
    # The cell search squares coordinate differences in float32 (float64 for float64 input): at 1e20
    # they overflow (every neighbour was -1), at 1e-20 they flush to zero. Scaling by 2^e is exact, so
    # the float64 brute force on the unscaled clouds is the reference.
    sizes = [200, 0, 150]
    base = torch.rand(sum(sizes), 3, generator=gen, dtype=torch.float64).to(dtype).double()
    p = (base * 2.0**exponent).to(dtype)
    off = torch.tensor(sizes).cumsum(0)
    idx, d2 = ball_query(p, p, 0.2 * 2.0**exponent, 16, off, off, return_dist2=True)
    ref = ball_query_reference(base, base, 0.2, 16, off, off)
    _, rd2 = knn_reference(base, base, 16, off, off)
    assert torch.equal(idx < 0, ref < 0) and bool((idx[:, 0] >= 0).all())
    ok = idx >= 0
    diff = base[:, None, :] - base[idx.clamp(min=0)]
    exact = (diff * diff).sum(-1)
    torch.testing.assert_close(exact[ok], rd2[ok], rtol=1e-12, atol=0)
    want = (exact * 2.0**exponent * 2.0**exponent).to(dtype)  # inf where dist2 overflows the dtype
    torch.testing.assert_close(d2[ok], want[ok], rtol=_ULPS[dtype], atol=0)


# --- order="index": the first max_neighbors support rows inside the ball (official PointNet++ rule) ---------


def check_index_order(q, s, radius, max_neighbors, qo=None, so=None):
    """Exactly the reference's rows (index order has no ties), ascending, inside, padded only at the tail."""
    idx, d2 = ball_query(q, s, radius, max_neighbors, qo, so, order="index", return_dist2=True)
    ref = ball_query_reference(q, s, radius, max_neighbors, qo, so, order="index")
    assert idx.shape == (q.shape[0], max_neighbors) and idx.dtype == torch.long
    assert torch.equal(idx, ref)
    ok = idx >= 0
    assert not bool((~ok[:, :-1] & ok[:, 1:]).any())
    assert bool((idx[:, 1:] > idx[:, :-1]).logical_or(~ok[:, 1:]).all())
    diff = q.double()[:, None, :] - s.double()[idx.clamp(min=0)]
    exact = (diff * diff).sum(-1)
    torch.testing.assert_close(d2[ok], exact.to(q.dtype)[ok], rtol=_ULPS[q.dtype], atol=0)
    assert bool(torch.isinf(d2[~ok]).all())
    # the same ball as order="distance": a capped ball keeps the same number of points either way
    by_distance = ball_query(q, s, radius, max_neighbors, qo, so)
    assert torch.equal(ok.sum(1), (by_distance >= 0).sum(1))
    return idx


def _official_kernel(q, s, radius, nsample):
    """The rule of charlesq34/pointnet2 query_ball_point_gpu, one cloud, written as a plain loop: scan the
    support in order, keep a point while d = max(sqrt(|q - s|^2), 1e-20) < radius (float32), stop at nsample,
    and fill the unused slots with the first index found (0 when nothing is found)."""
    qf, sf = q.float().numpy(), s.float().numpy()
    out = np.zeros((len(qf), nsample), dtype=np.int64)
    for j, c in enumerate(qf):
        cnt = 0
        for k, p in enumerate(sf):
            if cnt == nsample:
                break
            d = max(np.sqrt(np.float32(((c - p) ** 2).sum(dtype=np.float32))), np.float32(1e-20))
            if d < np.float32(radius):
                if cnt == 0:
                    out[j, :] = k
                out[j, cnt] = k
                cnt += 1
    return torch.from_numpy(out)


@pytest.mark.parametrize("radius", [0.02, 0.15, 0.4, 3.0])
@pytest.mark.parametrize("max_neighbors", [1, 8, 40])
def test_index_order_ragged_batch_with_empty_and_single_point_clouds(radius, max_neighbors, gen):
    q, qo = _ragged([150, 0, 30, 1, 200, 4], gen)
    s, so = _ragged([180, 5, 0, 1, 220, 0], gen)
    idx = check_index_order(q, s, radius, max_neighbors, qo, so)
    # queries of clouds without support (cloud 2 and 5) find nothing; every row stays in its own cloud
    assert bool((idx[150:180] == -1).all()) and bool((idx[-4:] == -1).all())
    cloud_of = torch.repeat_interleave(torch.arange(6), torch.tensor([180, 5, 0, 1, 220, 0]))
    qcloud = torch.repeat_interleave(torch.arange(6), torch.tensor([150, 0, 30, 1, 200, 4]))
    ok = idx >= 0
    assert torch.equal(cloud_of[idx[ok]], qcloud[:, None].expand_as(idx)[ok])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_index_order_dtypes_and_scales(dtype, gen):
    q, qo = _ragged([300, 100], gen, dtype=dtype)
    s, so = _ragged([400, 50], gen, dtype=dtype)
    check_index_order(q, s, 0.2, 16, qo, so)
    for scale in (1e-4, 1e4):
        base = (torch.rand(2000, 3, generator=gen, dtype=torch.float64) * scale + 5.0 * scale).to(dtype)
        if dtype != torch.float16:
            check_index_order(base[:700], base[300:], 0.1 * scale, 24)


def test_index_order_duplicates_ties_and_the_strict_boundary():
    g = torch.arange(5, dtype=torch.float32)
    lattice = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    s = torch.cat([torch.full((30, 3), 1.0), lattice, torch.full((10, 3), 2.0)])
    # radius 1.0: neighbours at distance exactly 1 are out (strict), only the duplicates of the centre count
    idx = check_index_order(lattice, s, 1.0, 64)
    centre = (lattice == 1.0).all(1).nonzero().item()
    assert idx[centre, :31].tolist() == [*range(30), 30 + centre] and bool((idx[centre, 31:] == -1).all())
    # radius 1.5: the six unit neighbours and twelve at sqrt(2) in; duplicates fill the cap first
    idx = check_index_order(lattice, s, 1.5, 40)
    assert idx[centre, :30].tolist() == list(range(30))


def test_index_order_fewer_than_max_neighbors_and_queries_outside_every_ball(gen):
    s = torch.rand(50, 3, generator=gen)
    q = torch.cat([s[:10], torch.full((3, 3), 10.0)])  # the last three see nothing
    idx = check_index_order(q, s, 0.3, 200)
    assert bool((idx[-3:] == -1).all()) and int((idx[:10] >= 0).sum(1).max()) < 50


def test_index_order_matches_the_official_kernel_after_its_padding(gen):
    # Centres drawn from the cloud (as FPS does) always find themselves, so the kernel's fill value is defined.
    coord, offset = object_batch(3, 700, seed=5)
    centres = coord[torch.randperm(700, generator=gen)[:64]]
    idx = ball_query(centres, coord[:700], 0.2, 32, order="index")
    padded = torch.where(idx < 0, idx[:, :1], idx)
    assert torch.equal(padded, _official_kernel(centres, coord[:700], 0.2, 32))
    # ... and per cloud of a packed batch, with rows shifted by the cloud start
    cidx = torch.cat([torch.arange(b * 700, b * 700 + 40) for b in range(3)])
    got = ball_query(coord[cidx], coord, 0.3, 16, torch.tensor([40, 80, 120]), offset, order="index")
    got = torch.where(got < 0, got[:, :1], got)
    for b in range(3):
        ref = _official_kernel(coord[cidx[b * 40:(b + 1) * 40]], coord[b * 700:(b + 1) * 700], 0.3, 16)
        assert torch.equal(got[b * 40:(b + 1) * 40], ref + b * 700)


def test_index_order_real_scannet_scene(shared_data):
    coord, _ = load_scannet_scene(shared_data / "scannet/scans/scene0000_00/scene0000_00_vh_clean_2.ply")
    check_index_order(coord[::400], coord, 0.1, 32)


def test_index_order_scan_like_scene():
    pts = scan_like_scene(20000, seed=2)
    check_index_order(pts[::97], pts, 0.1, 32)


def test_bad_order_raises():
    with pytest.raises(ValueError, match="order must be one of"):
        ball_query(torch.rand(5, 3), torch.rand(5, 3), 0.5, 4, order="nearest")
