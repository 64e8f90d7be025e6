"""Voxelization against the dict reference, numpy unique and open3d; voxel pooling against loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pcbench.ops._reference import voxelize_reference
from pcbench.ops.voxel import voxel_pool, voxelize
from pcbench.testing.clouds import load_scannet_scene, scan_like_scene, uniform_cloud


def _numpy_voxelize(coord: np.ndarray, size: float, lengths: list[int]):
    cloud = np.repeat(np.arange(len(lengths)), lengths)
    rows = np.concatenate([cloud[:, None], np.floor(coord.astype(np.float64) / size).astype(np.int64)], 1)
    return np.unique(rows, axis=0, return_inverse=True, return_counts=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_ragged_batch_matches_reference(dtype):
    lengths = [500, 0, 1, 300, 0]
    coord = torch.cat([scan_like_scene(n, seed=i, dtype=torch.float64) - 4.0 for i, n in enumerate(lengths)])
    coord = coord.to(dtype)  # negative coordinates too: floor, not truncation
    off = torch.cumsum(torch.tensor(lengths), 0)
    got = voxelize(coord, 0.25, off)
    want = voxelize_reference(coord, 0.25, off)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.int64
        assert torch.equal(g, w)
    voxels, inverse, counts = got
    assert torch.equal(voxels[inverse, 0], torch.repeat_interleave(torch.arange(5), torch.tensor(lengths)))


@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e4])
def test_matches_numpy_unique_across_scales(scale):
    coord = uniform_cloud(4000, seed=1, scale=scale) - scale / 2
    lengths = [1000, 3000]
    uniq, inv, cnt = _numpy_voxelize(coord.numpy(), scale / 37.0, lengths)
    voxels, inverse, counts = voxelize(coord, scale / 37.0, torch.tensor([1000, 4000]))
    np.testing.assert_array_equal(voxels.numpy(), uniq)
    np.testing.assert_array_equal(inverse.numpy(), inv.reshape(-1))
    np.testing.assert_array_equal(counts.numpy(), cnt)


def test_wide_coordinate_range_uses_the_row_fallback():
    # span product of ~1e12 ** 3 overflows one int64 key: the row-wise path must give the same result
    coord = torch.tensor([[0.0, 0.0, 0.0], [1e12, -1e12, 5e11], [0.05, 0.0, 0.0], [1e12, -1e12, 5e11]],
                         dtype=torch.float64)
    voxels, inverse, counts = voxelize(coord, 0.1, torch.tensor([3, 4]))
    uniq, inv, cnt = _numpy_voxelize(coord.numpy(), 0.1, [3, 1])
    np.testing.assert_array_equal(voxels.numpy(), uniq)
    np.testing.assert_array_equal(inverse.numpy(), inv.reshape(-1))
    np.testing.assert_array_equal(counts.numpy(), cnt)


def test_voxel_counts_match_open3d():
    o3d = pytest.importorskip("open3d")
    # open3d's grid starts half a voxel below the minimum: one point sits exactly on the centre of the
    # lowest lattice cell, all others in the upper part of their cell, so both grids coincide and every
    # point keeps >= 0.1 voxel from any boundary (no rounding ambiguity)
    g = torch.Generator().manual_seed(0)
    cells = torch.randint(-50, 50, (6000, 3), generator=g).double()
    cells[0] = -50.0
    jitter = torch.rand(6000, 3, generator=g, dtype=torch.float64) * 0.4
    jitter[0] = 0.0
    coord = (cells + 0.5 + jitter) * 0.02
    voxels, _, counts = voxelize(coord, 0.02)
    pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(coord.numpy()))
    down = pc.voxel_down_sample(0.02)
    assert len(down.points) == voxels.shape[0] == torch.unique(cells, dim=0).shape[0]
    # open3d returns voxel means: every mean lies in exactly one pcbench voxel
    means = torch.from_numpy(np.asarray(down.points))
    mine = {tuple(r) for r in voxels[:, 1:].tolist()}
    assert {tuple(r) for r in torch.floor(means / 0.02).long().tolist()} == mine
    assert int(counts.sum()) == 6000


def test_scannet_scene_matches_numpy(shared_data):
    coord, _ = load_scannet_scene(shared_data / "scannet/scans/scene0000_00/scene0000_00_vh_clean_2.ply")
    half = coord.shape[0] // 2
    voxels, inverse, counts = voxelize(coord, 0.02, torch.tensor([half, coord.shape[0]]))
    uniq, inv, cnt = _numpy_voxelize(coord.numpy(), 0.02, [half, coord.shape[0] - half])
    np.testing.assert_array_equal(voxels.numpy(), uniq)
    np.testing.assert_array_equal(inverse.numpy(), inv.reshape(-1))
    np.testing.assert_array_equal(counts.numpy(), cnt)


def test_empty_input():
    voxels, inverse, counts = voxelize(torch.zeros(0, 3), 0.1, torch.tensor([0, 0]))
    assert voxels.shape == (0, 4) and inverse.numel() == 0 and counts.numel() == 0


@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_voxel_pool_matches_loop_and_has_gradients(reduce):
    coord = scan_like_scene(600, seed=3)
    voxels, inverse, counts = voxelize(coord, 0.5)
    feat = torch.randn(600, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    out = voxel_pool(feat, inverse, voxels.shape[0], reduce)
    for v in range(voxels.shape[0]):
        rows = feat[inverse == v]
        want = rows.mean(0) if reduce == "mean" else rows.amax(0)
        torch.testing.assert_close(out[v], want)
    small = feat[:40].clone().requires_grad_(True)
    inv = inverse[:40]
    uniq, inv = torch.unique(inv, return_inverse=True)
    assert torch.autograd.gradcheck(lambda f: voxel_pool(f, inv, uniq.numel() + 1, reduce), (small,))


def test_voxel_pool_empty_voxel_is_zero():
    out = voxel_pool(torch.ones(2, 3), torch.tensor([0, 2]), 3, "max")
    assert torch.equal(out[1], torch.zeros(3))


def test_bad_arguments_are_named():
    coord = uniform_cloud(10)
    with pytest.raises(ValueError, match=r"voxel_size must be a positive finite number .* got 0"):
        voxelize(coord, 0)
    with pytest.raises(ValueError, match=r"voxel_size must be a positive finite number .* got nan"):
        voxelize(coord, float("nan"))
    with pytest.raises(ValueError, match=r"coord / voxel_size reaches 1e\+20, beyond the exact int64 grid range"):
        voxelize(torch.tensor([[1e15, 0.0, 0.0]], dtype=torch.float64), 1e-5)
    with pytest.raises(ValueError, match=r"offset\[-1\] must equal the number of points 10"):
        voxelize(coord, 0.1, torch.tensor([4, 8]))
    with pytest.raises(ValueError, match=r"coord must have shape \[N, 3\]"):
        voxelize(coord[:, :2], 0.1)
    feat, inv = torch.rand(10, 2), torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError, match=r"reduce must be 'mean' or 'max', got 'sum'"):
        voxel_pool(feat, inv, 1, "sum")
    with pytest.raises(ValueError, match=r"inverse values must be in \[0, 0\] \(num_voxels=1\), got \[0, 3\]"):
        voxel_pool(feat, inv + torch.arange(10) % 4, 1)
    with pytest.raises(ValueError, match=r"inverse has 9 entries but feat has 10 rows"):
        voxel_pool(feat, inv[:9], 1)
    with pytest.raises(ValueError, match=r"inverse must be an integer \[N\] tensor"):
        voxel_pool(feat, inv.float(), 1)
    with pytest.raises(ValueError, match=r"num_voxels must be a non-negative int"):
        voxel_pool(feat, inv, -1)
    with pytest.raises(ValueError, match=r"feat must be a floating \[N, C\] tensor"):
        voxel_pool(feat.long(), inv, 1)
