"""The host-sync counter of benchmarks/bm_syncs.py, the sync budget of issue 18, and the pieces that keep it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks import bm_syncs
from pcbench.models.layers.serialized_attention import build_patches
from pcbench.ops import (
    PointBatch,
    dispatch_as,
    farthest_point_sample,
    kernel_map,
    kernel_maps,
    sample_offset,
    voxel_levels,
    voxelize,
)
from pcbench.ops._reference import fps_reference
from pcbench.ops.batch import length_bounds, offset2batch
from pcbench.testing.clouds import object_batch, scan_like_scene


def test_counter_sees_each_kind_of_host_sync_and_nothing_else() -> None:
    x = torch.arange(6)
    mask = x > 2
    with bm_syncs.counting() as c:
        y = x * 2 + 1  # two plain ops, no sync
        int(x[0])  # item
        x[mask]  # boolean-mask gather
        torch.nonzero(x)
        torch.repeat_interleave(x, x)  # output size from the data
        torch.repeat_interleave(x, x, output_size=15)  # sized by the caller: no sync
        torch.unique(x)
        x.tolist()
    assert c.syncs == {"_local_scalar_dense": 1, "index (bool mask)": 1, "nonzero": 1,
                       "repeat_interleave (no output_size)": 1, "_unique2": 1, "tolist": 1}
    assert c.ops >= 8 and y.shape == x.shape
    assert x.tolist() == list(range(6))  # Tensor.tolist is restored after the block


def test_offset2batch_with_the_point_count_needs_no_host_read() -> None:
    offset = torch.tensor([3, 3, 7])
    with bm_syncs.counting() as c:
        got = offset2batch(offset, 7)
    assert c.total_syncs == 0
    assert got.tolist() == [0, 0, 0, 2, 2, 2, 2]
    assert torch.equal(got, offset2batch(offset))


def test_length_bounds_are_read_once_and_again_after_an_in_place_change() -> None:
    offset = torch.tensor([4, 10, 12])
    with bm_syncs.counting() as c:
        assert length_bounds(offset) == [(2, 6)]
        assert length_bounds(offset, offset) == [(2, 6), (2, 6)]
    assert c.total_syncs == 1
    offset[2] = 20  # bumps the version counter: the remembered bounds must not be used
    assert length_bounds(offset) == [(4, 10)]


def test_sample_offset_carries_the_bounds_so_fps_on_equal_clouds_reads_nothing() -> None:
    coord, offset = object_batch(4, 300, seed=2)
    length_bounds(offset)  # the level's one read (a model's first search does it)
    with dispatch_as("cuda"), bm_syncs.counting() as c:
        sel = farthest_point_sample(coord, offset, n=64, validate=False)
        new = sample_offset(offset, n=64, validate=False)
    assert c.total_syncs == 0
    assert torch.equal(sel, fps_reference(coord, offset, n=64))
    assert new.tolist() == [64, 128, 192, 256] and length_bounds(new) == [(64, 64)]


def test_fps_on_ragged_clouds_packs_without_a_boolean_mask() -> None:
    coord = scan_like_scene(900, seed=3)
    offset = torch.tensor([100, 100, 450, 900])  # an empty cloud and clouds below / above n
    with dispatch_as("cuda"), bm_syncs.counting() as c:
        sel = farthest_point_sample(coord, offset, n=200, validate=False)
    assert "index (bool mask)" not in c.syncs and c.total_syncs <= 2
    assert torch.equal(sel, fps_reference(coord, offset, n=200))


def test_kernel_map_reads_the_device_a_fixed_number_of_times() -> None:
    vox, _, _ = voxelize(scan_like_scene(3000, seed=1), 0.1, torch.tensor([1500, 3000]))
    with dispatch_as("cuda"), bm_syncs.counting() as c:
        km = kernel_map(vox, vox, 3, validate=False)
    assert len(km) == 27 and c.total_syncs <= 2  # was one nonzero per offset (27) plus the checks
    for (i, j), (ci, cj) in zip(km, kernel_map(vox, vox, 3), strict=True):  # the CPU path's pairs
        assert torch.equal(i, ci) and torch.equal(j, cj)


@pytest.mark.parametrize(("config", "task"), [("pointnet2_ssg_cls", "cls"), ("pct_cls", "cls"),
                                              pytest.param("sparse_resnet_cls", "cls", marks=pytest.mark.slow),
                                              pytest.param("ptv2_cls", "cls", marks=pytest.mark.slow),
                                              pytest.param("ptv3_cls", "cls", marks=pytest.mark.slow),
                                              pytest.param("minkunet14a_seg", "seg", marks=pytest.mark.slow),
                                              pytest.param("pointnet2_ssg_seg", "seg", marks=pytest.mark.slow)])
def test_sync_budget_under_gpu_dispatch(config: str, task: str) -> None:
    # Issue 18: at most 8 host syncs per training step for object classifiers, 32 for scene models, on the
    # GPU code path (small inputs and quartered widths: the counts do not depend on widths).
    row = bm_syncs.measure(config, "cuda", tiny=True, objects=(4, 256), scenes=(2, 2048))
    assert row["task"] == task
    assert row["train_syncs"] <= bm_syncs.BUDGET[task], row["train_sync_sites"]
    assert row["infer_syncs"] <= row["train_syncs"]
    assert row["train_ops"] > 100 and row["infer_ops"] > 50


def test_main_writes_json_and_table(tmp_path) -> None:  # noqa: ANN001 - pytest fixture
    assert bm_syncs.main(["--only", "pointnet2_ssg_cls", "--dispatch", "cuda", "--tiny", "--objects", "2x128",
                          "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "syncs.json").read_text())
    assert record["objects"] == [2, 128] and record["rows"][0]["config"] == "pointnet2_ssg_cls"
    table = (tmp_path / "syncs.md").read_text()
    assert "| pointnet2_ssg_cls | cuda |" in table and "<= 8: ok" in table
    assert bm_syncs.main(["--only", "nope"]) == 2
    assert bm_syncs.main(["--dispatch", "tpu"]) == 2


def test_trusted_calls_inside_a_known_level_read_nothing_and_match_checked_calls() -> None:
    # What models do: ops on a PointBatch's (already checked) tensors with validate=False. On the GPU path,
    # once the level's sizes are known, a kNN / ball query / interpolation reads nothing from the device.
    from pcbench.ops import ball_query, interpolate, knn  # noqa: PLC0415

    coord, offset = object_batch(3, 200, seed=4)
    feat = torch.randn(coord.shape[0], 5, generator=torch.Generator().manual_seed(0))
    length_bounds(offset)
    with dispatch_as("cuda"):
        with bm_syncs.counting() as c:
            idx, d2 = knn(coord, coord, 8, offset, offset, validate=False)
            bq = ball_query(coord, coord, 0.3, 16, offset, offset, validate=False)
            up = interpolate(coord, coord, feat, 3, offset, offset, validate=False)
        assert c.total_syncs <= 1, dict(c.sites)  # interpolate's one finiteness read of its weights
        checked = (knn(coord, coord, 8, offset, offset), ball_query(coord, coord, 0.3, 16, offset, offset),
                   interpolate(coord, coord, feat, 3, offset, offset))
    assert torch.equal(idx, checked[0][0]) and torch.equal(d2, checked[0][1])
    assert torch.equal(bq, checked[1]) and torch.equal(up, checked[2])
    with pytest.raises(ValueError, match="offset"):  # the checked call still refuses a bad offset
        knn(coord, coord, 8, torch.tensor([300, 200, 600]), offset)


@pytest.mark.parametrize("anchor", [False, True])
def test_voxel_levels_read_once_and_match_numpy_unique_per_level(anchor: bool) -> None:
    # The pyramid of a voxel network (input voxels, then cells merged 2, 2 and 3 per axis) with ONE host read,
    # against numpy's row-wise unique of (cloud, floor(grid / prod(factors))) at every level.
    coord = torch.cat([scan_like_scene(1200, seed=5), scan_like_scene(800, seed=6) + 3.0])
    offset = torch.tensor([1200, 1200, 2000])  # an empty cloud in the middle
    factors = [2, 2, 3]
    with dispatch_as("cuda"), bm_syncs.counting() as c:
        levels = voxel_levels(coord, 0.1, offset, factors, anchor=anchor, validate=False)
    assert c.total_syncs == 1 and len(levels) == 4
    grid = torch.floor(coord.double() / 0.1).long()
    cloud = offset2batch(offset, coord.shape[0])
    if anchor:
        for a, e in [(0, 1200), (1200, 2000)]:
            grid[a:e] -= grid[a:e].min(0).values
    total, prev = 1, None
    for lvl, f in zip(levels, [1, *factors], strict=True):
        total *= f
        rows = np.concatenate([cloud.numpy()[:, None], np.floor_divide(grid.numpy(), total)], 1)
        uniq, inv, cnt = np.unique(rows, axis=0, return_inverse=True, return_counts=True)
        assert np.array_equal(lvl.cells.numpy(), uniq)
        assert lvl.lengths == [int((uniq[:, 0] == b).sum()) for b in range(3)]
        assert lvl.offset.tolist() == np.cumsum(lvl.lengths).tolist()
        assert length_bounds(lvl.offset) == [(min(lvl.lengths), max(lvl.lengths))]  # remembered, no read
        assert lvl.lo == uniq[:, 1:].min(0).tolist() and lvl.hi == uniq[:, 1:].max(0).tolist()
        if prev is None:  # points -> voxels, as voxelize
            assert np.array_equal(lvl.inverse.numpy(), inv.reshape(-1))
            assert np.array_equal(lvl.counts.numpy(), cnt)
            if not anchor:
                assert all(torch.equal(a, b) for a, b in zip(voxelize(coord, 0.1, offset),
                                                               (lvl.cells, lvl.inverse, lvl.counts), strict=True))
        else:  # cells of the previous level -> cells of this one
            want = torch.cat([prev.cells[:, :1], torch.div(prev.cells[:, 1:], f, rounding_mode="floor")], 1)
            assert torch.equal(lvl.cells[lvl.inverse], want)
            assert torch.equal(lvl.counts, torch.bincount(lvl.inverse, minlength=lvl.num_cells))
        prev = lvl


def test_kernel_maps_read_once_for_many_maps_and_equal_single_maps() -> None:
    levels = voxel_levels(scan_like_scene(3000, seed=1), 0.1, torch.tensor([1500, 3000]), [2])
    fine, coarse = levels[0].cells, levels[1].cells
    specs = [(fine, fine, 3, 1, 1), (fine, coarse, 2, 2, 1), (coarse, coarse, 3, 1, 2), (fine, fine[:0], 3, 1, 1)]
    with dispatch_as("cuda"), bm_syncs.counting() as c:
        maps = kernel_maps(specs, validate=False)
    assert c.total_syncs == 1
    for spec, km in zip(specs, maps, strict=True):
        single = kernel_map(*spec)  # the CPU path, one map at a time
        assert len(km) == len(single)
        for (i, j), (ci, cj) in zip(km, single, strict=True):
            assert torch.equal(i, ci) and torch.equal(j, cj)


def test_build_patches_from_host_lengths_reads_nothing_and_matches() -> None:
    lengths = [10, 0, 3, 7, 64]
    order = torch.randperm(sum(lengths), generator=torch.Generator().manual_seed(0))
    for k in (1, 4, 16, 100):
        with bm_syncs.counting() as c:
            got = build_patches(order, torch.tensor(lengths), k, lengths)
        assert c.total_syncs == 0
        want = build_patches(order, torch.tensor(lengths), k)
        assert torch.equal(got.gather, want.gather) and torch.equal(got.scatter, want.scatter)
        assert (got.key_mask is None) == (want.key_mask is None)
        assert got.key_mask is None or torch.equal(got.key_mask, want.key_mask)


def test_voxel_networks_read_the_device_a_fixed_number_of_times_whatever_their_depth() -> None:
    # A voxel ResNet and a sparse U-Net read the device twice per forward under the GPU dispatch (levels with
    # the voxels, then every kernel map), independent of the number of blocks per level.
    from pcbench.models.minkunet import MinkUNet  # noqa: PLC0415
    from pcbench.models.sparse_resnet import SparseResNet  # noqa: PLC0415

    coord, offset = object_batch(2, 128, seed=7)
    batch = PointBatch(coord, coord.clone(), offset)
    for layers in ((1, 1, 1, 1), (2, 3, 1, 2)):
        torch.manual_seed(0)
        net = SparseResNet(3, 5, voxel_size=0.05, layers=layers, planes=(8, 8, 8, 8), init_dim=8).eval()
        with dispatch_as("cuda"), bm_syncs.counting() as c, torch.no_grad():
            out = net(batch)
        assert c.total_syncs == 2, dict(c.sites)
        with dispatch_as("cpu"), torch.no_grad():
            torch.testing.assert_close(out, net(batch))  # the CPU path: the same logits
    torch.manual_seed(0)
    unet = MinkUNet(3, 5, voxel_size=0.05, layers=(1,) * 8, planes=(8,) * 8, init_dim=8).eval()
    with dispatch_as("cuda"), bm_syncs.counting() as c, torch.no_grad():
        unet(batch)
    assert c.total_syncs == 2, dict(c.sites)


def test_interpolate_on_the_gpu_path_reads_nothing_even_where_distances_saturate() -> None:
    from pcbench.ops import interpolate
    from pcbench.ops._reference import interpolate_reference

    support = scan_like_scene(500, seed=1)
    query = scan_like_scene(200, seed=2)
    feat = torch.randn(500, 4, generator=torch.Generator().manual_seed(0))
    offsets = torch.tensor([200, 400]), torch.tensor([500, 1000])
    length_bounds(*offsets)  # the levels' reads, done once by a model's earlier layers
    far = 2.0**80  # float32 squared distances overflow: the second cloud's rows need float64 distances
    q, s = torch.cat([query, query * far]), torch.cat([support, support * far])
    with dispatch_as("cuda"), bm_syncs.counting() as c:
        got = interpolate(q, s, torch.cat([feat, feat]), 3, *offsets, validate=False)
    assert c.total_syncs == 0
    want = interpolate_reference(query.double(), support.double(), feat.double(), 3).float()
    torch.testing.assert_close(got, torch.cat([want, want]), rtol=1e-4, atol=1e-5)
