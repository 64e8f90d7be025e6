"""Exact FPS: identical indices to the sequential reference, fpsample and open3d; both engines; bad input."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from pcbench.ops import fps as fps_mod
from pcbench.ops._fps_cells import fps_cells, fps_cells_speculative
from pcbench.ops._reference import fps_reference
from pcbench.ops.batch import offset2lengths
from pcbench.ops.fps import farthest_point_sample, sample_counts, sample_offset
from pcbench.testing.clouds import (
    load_modelnet_txt,
    load_scannet_scene,
    object_batch,
    scan_like_scene,
    uniform_cloud,
)

ENGINES = ("dense", "cells", "cells-k3", "plain-cells")


@pytest.fixture
def engine(request, monkeypatch):
    """Force one engine for every size: dense; the speculative leaf engine (defaults, or 3 candidates per
    iteration on leaves of 16 points; float64 always takes the one-at-a-time leaf engine); or the
    one-at-a-time leaf engine."""
    monkeypatch.setattr(fps_mod, "DENSE_MAX_POINTS", 1 << 40 if request.param == "dense" else 0)
    if request.param == "cells-k3":
        monkeypatch.setattr(fps_mod, "fps_cells_speculative",
                            functools.partial(fps_cells_speculative, speculate=3, leaf_size=16))
    if request.param == "plain-cells":
        monkeypatch.setattr(fps_mod, "fps_cells_speculative", fps_cells)
    return request.param


def _ragged(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Clouds of 300, 0, 1, 7, 2500 points (one empty, one single point, one larger than a leaf tree)."""
    lengths = [300, 0, 1, 7, 2500]
    parts = [scan_like_scene(n, seed=seed + i, dtype=torch.float64) for i, n in enumerate(lengths)]
    coord = torch.cat(parts).to(dtype)
    return coord, torch.cumsum(torch.tensor(lengths), 0)


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 5, 64, 400])
def test_matches_reference_on_ragged_batches(engine, dtype, n):
    coord, off = _ragged(dtype)
    got = farthest_point_sample(coord, off, n=n)
    ref = fps_reference(coord, off, n=n)
    assert got.dtype == torch.int64
    assert torch.equal(got, ref)
    assert got.numel() == int(sample_offset(off, n=n)[-1])


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
@pytest.mark.parametrize("ratio", [0.01, 0.25, 1.0])
def test_ratio_and_start(engine, ratio):
    coord, off = _ragged(torch.float32, seed=3)
    coord, off = coord[:308], off[:4]  # ratio 1.0 of the 2500-point cloud would make the reference slow
    assert torch.equal(farthest_point_sample(coord, off, ratio=ratio), fps_reference(coord, off, ratio=ratio))
    big = scan_like_scene(3000, seed=5)
    off2 = torch.tensor([1200, 3000])
    ratio = min(ratio, 0.3)
    assert torch.equal(farthest_point_sample(big, off2, ratio=ratio, start=1100),
                       fps_reference(big, off2, ratio=ratio, start=1100))


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_ties_on_an_integer_lattice_and_duplicates(engine):
    # A lattice makes many squared distances exactly equal; duplicates make whole groups tie at 0,
    # and n larger than the number of distinct points forces repeated picks of the lowest index.
    g = torch.arange(12, dtype=torch.float32)
    lattice = torch.cartesian_prod(g, g, g)  # 1728 points, all distances exact integers
    perm = torch.randperm(lattice.shape[0], generator=torch.Generator().manual_seed(0))
    lattice = lattice[perm]
    dup = torch.cat([lattice[:50]] * 4)  # 200 points, 50 distinct
    coord = torch.cat([lattice, dup])
    off = torch.tensor([lattice.shape[0], coord.shape[0]])
    got = farthest_point_sample(coord, off, n=120)
    assert torch.equal(got, fps_reference(coord, off, n=120))
    # the duplicate cloud: after its 50 distinct points it picks min-distance-0 rows, lowest index first
    second = got[120:] - lattice.shape[0]
    assert len({tuple(r) for r in dup[second[:50]].tolist()}) == 50


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
@pytest.mark.parametrize(
    ("scale", "dtype"),
    [(s, torch.float16) for s in (1e-4, 1e-2, 1.0, 1e2, 1e3)] + [(s, torch.float32) for s in (1e-4, 1.0, 1e4)],
)
def test_coordinate_scales(engine, scale, dtype):
    # float16 at 1e-4 underflows squares to 0 and at 1e3 overflows them to inf: still identical
    coord = (scan_like_scene(1500, seed=7, dtype=torch.float64) * scale).to(dtype)
    off = torch.tensor([500, 1500])
    assert torch.equal(farthest_point_sample(coord, off, n=200), fps_reference(coord, off, n=200))


def test_engines_agree_on_a_scene_with_many_leaves():
    coord = scan_like_scene(20000, seed=11)
    got = farthest_point_sample(coord, n=1500)
    dense = fps_mod._fps_dense(coord, torch.tensor([0]), torch.tensor([20000]), torch.tensor([1500]), 0)[0]
    assert torch.equal(got, dense)
    assert torch.equal(got[:300], fps_reference(coord, n=300))


def test_object_batch_matches_reference():
    coord, off = object_batch(8, 1024, seed=2)
    assert torch.equal(farthest_point_sample(coord, off, n=256), fps_reference(coord, off, n=256))


def test_matches_fpsample_and_open3d_on_modelnet(shared_data):
    fpsample = pytest.importorskip("fpsample")
    o3d = pytest.importorskip("open3d")
    path = shared_data / "modelnet40/modelnet40_normal_resampled/chair/chair_0391.txt"
    coord, _ = load_modelnet_txt(path)
    ours = farthest_point_sample(coord, n=1024, start=17)
    theirs = np.asarray(fpsample.fps_sampling(coord.numpy(), 1024, start_idx=17)).astype(np.int64)
    np.testing.assert_array_equal(ours.numpy(), theirs)
    # open3d starts at index 0 and returns points (not indices): compare the sampled coordinates
    pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(coord.double().numpy()))
    down = np.asarray(pc.farthest_point_down_sample(256).points)
    ours0 = farthest_point_sample(coord.double(), n=256)
    np.testing.assert_array_equal(coord.double()[ours0].numpy(), down)


def test_scannet_vertices_match_fpsample_up_to_ties(shared_data):
    fpsample = pytest.importorskip("fpsample")
    coord, _ = load_scannet_scene(shared_data / "scannet/scans/scene0000_00/scene0000_00_vh_clean_2.ply")
    ours = farthest_point_sample(coord, n=2048)
    theirs = torch.from_numpy(np.asarray(fpsample.fps_sampling(coord.numpy(), 2048, start_idx=0)).astype(np.int64))
    differ = (ours != theirs).nonzero()
    if differ.numel():
        # fpsample breaks exact float32 ties differently; the first divergence must be such a tie, and
        # ours must hold the lower index (the reference rule)
        i = int(differ[0])
        assert i > 1000
        mind = torch.full((coord.shape[0],), float("inf"))
        for c in ours[:i].tolist():
            mind = torch.minimum(mind, ((coord - coord[c]) ** 2).sum(-1))
        assert mind[ours[i]] == mind[theirs[i]] == mind.max()
        assert ours[i] < theirs[i]


@pytest.mark.slow
def test_scannet_vertices_match_reference_long(shared_data):
    coord, _ = load_scannet_scene(shared_data / "scannet/scans/scene0000_00/scene0000_00_vh_clean_2.ply")
    off = torch.tensor([40000, coord.shape[0]])
    assert torch.equal(farthest_point_sample(coord, off, n=4000), fps_reference(coord, off, n=4000))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_random_ragged_sweep(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 6000, (5,), generator=g)
    lengths[seed % 5] = 0
    coord = uniform_cloud(int(lengths.sum()), seed=seed, scale=10.0 ** (seed - 2))
    off = torch.cumsum(lengths, 0)
    n = int(torch.randint(1, 1500, (1,), generator=g))
    assert torch.equal(farthest_point_sample(coord, off, n=n), fps_reference(coord, off, n=n))


def test_sample_offset_counts():
    off = torch.tensor([10, 10, 13, 100])
    assert sample_offset(off, n=5).tolist() == [5, 5, 8, 13]
    assert sample_offset(off, ratio=0.5).tolist() == [5, 5, 7, 51]
    assert torch.equal(offset2lengths(sample_offset(off, ratio=0.3)),
                       sample_counts(offset2lengths(off), ratio=0.3))


def test_all_empty_and_empty_input():
    assert farthest_point_sample(torch.zeros(0, 3), torch.tensor([0, 0]), n=4).numel() == 0
    assert farthest_point_sample(torch.zeros(0, 3), n=4).numel() == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 0}, r"n must be a positive number of samples per cloud, got 0; pass n >= 1"),
        ({"n": -3}, r"n must be a positive .* got -3"),
        ({"n": 2.5}, r"n must be an int number of samples per cloud, got 2.5"),
        ({"ratio": 0.0}, r"ratio must be in \(0, 1\] .* got 0.0"),
        ({"ratio": 1.5}, r"ratio must be in \(0, 1\] .* got 1.5"),
        ({"ratio": float("nan")}, r"ratio must be a float in \(0, 1\], got nan"),
        ({"n": 4, "ratio": 0.5}, r"give exactly one of n .* got n=4, ratio=0.5"),
        ({}, r"give exactly one of n .* got n=None, ratio=None"),
        ({"n": 4, "start": 10}, r"start must be in \[0, 9\] .* got 10; use start=0"),
        ({"n": 4, "start": -1}, r"start must be in \[0, 9\] .* got -1"),
        ({"n": 4, "start": 1.0}, r"start must be an int index inside each cloud, got 1.0"),
        ({"n": 4, "offset": torch.tensor([12, 8, 30])}, r"offset must be non-decreasing"),
        ({"n": 4, "offset": torch.tensor([10, 20])}, r"offset\[-1\] must equal the number of points 30, got 20"),
        ({"n": 4, "offset": torch.tensor([10.0, 30.0])}, r"offset must be an integer tensor"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    coord = uniform_cloud(30)
    offset = kwargs.pop("offset", torch.tensor([10, 30]))
    with pytest.raises(ValueError, match=match):
        farthest_point_sample(coord, offset, **kwargs)


def test_bad_coordinates_are_named():
    coord = uniform_cloud(10)
    coord[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"xyz contains NaN or inf in 1 rows"):
        farthest_point_sample(coord, n=2)
    with pytest.raises(ValueError, match=r"xyz must have shape \[N, 3\], got \[10, 2\]"):
        farthest_point_sample(torch.rand(10, 2), n=2)
    with pytest.raises(ValueError, match=r"xyz must be a floating tensor"):
        farthest_point_sample(torch.ones(10, 3, dtype=torch.long), n=2)
    with pytest.raises(ValueError, match=r"n must be a positive"):
        sample_offset(torch.tensor([3, 5]), n=0)


def test_intraop_thread_setting_is_restored():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        coord, off = object_batch(2, 300, seed=4)
        farthest_point_sample(coord, off, n=20)
        farthest_point_sample(scan_like_scene(13000, seed=4), n=20)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_speculation_takes_several_samples_per_iteration_and_prunes_leaves():
    # behaviour the speed rests on (no timing): on a scene most of the 8 candidates are accepted, and an
    # iteration updates a few leaves, not all of them
    coord = scan_like_scene(30000, seed=8)
    stats: dict[str, int] = {}
    lengths, counts = torch.tensor([30000]), torch.tensor([3000])
    sel = fps_cells_speculative(coord, torch.tensor([0]), lengths, counts, 0, stats=stats)
    assert torch.equal(sel, fps_mod._fps_dense(coord, torch.tensor([0]), lengths, counts, 0))
    assert stats["iterations"] < 3000 / 4
    leaves = 30000 / 128
    assert stats["leaf_updates"] / stats["iterations"] < leaves / 4


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
@pytest.mark.parametrize("exponent", [70, 100, -70, -100])
def test_extreme_scales_sample_as_the_unscaled_cloud(engine, exponent):
    # float32 squares overflow beyond ~1.8e19 (every distance inf) and flush to zero below ~1e-19, which made
    # every choice a tie won by the lowest index. A power-of-two scale is exact, so the samples of the scaled
    # clouds must be those of the unscaled ones (the float32 reference at scale 1).
    base = scan_like_scene(1500, seed=3, dtype=torch.float64).float()
    off = torch.tensor([500, 500, 1500])  # one empty cloud
    coord = base * 2.0**exponent
    assert torch.isfinite(coord).all() and bool((coord != 0).any())
    assert torch.equal(farthest_point_sample(coord, off, n=64), fps_reference(base, off, n=64))
