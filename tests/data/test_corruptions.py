"""pcbench.data.corruptions against the ModelNet-C definitions (github:jiawei-ren/ModelNet-C,
build_modelnetc/corrupt_utils.py): counts of dropped / added points, ranges, norms, recovered transforms."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from pcbench.data import corruptions as C
from pcbench.data.corruptions import (
    CORRUPTIONS,
    DGCNN_MODELNET_C_CLEAN_OA,
    DGCNN_MODELNET_C_ERROR,
    DGCNN_MODELNET_C_OA,
    OFFICIAL_NAMES,
    corrupt,
    corruption_errors,
    mce,
    mean_corruption_error,
    relative_mce,
)


def _cloud(n: int = 1024, seed: int = 0, radius: float = 1.0) -> np.ndarray:
    """A fixed object-like cloud: centred, farthest point at ``radius`` (ModelNet clouds sit in the unit ball)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3)) * [1.0, 0.6, 0.3]
    x -= x.mean(0)
    return (x / np.linalg.norm(x, axis=1).max() * radius).astype(np.float32)


def _rows_of(sub: np.ndarray, full: np.ndarray) -> np.ndarray:
    """Index in ``full`` of every row of ``sub`` (each must be present exactly)."""
    lookup = {row.tobytes(): i for i, row in enumerate(full)}
    idx = np.array([lookup.get(row.tobytes(), -1) for row in sub])
    assert (idx >= 0).all(), "a kept point is not one of the input points"
    return idx


@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
def test_jitter_adds_gaussian_noise_of_sigma_one_hundredth_per_severity(severity: int) -> None:
    x = _cloud()
    noise = corrupt(x, "jitter", severity, seed=1).astype(np.float64) - x
    sigma = 0.01 * severity
    assert noise.shape == x.shape
    assert noise.std() == pytest.approx(sigma, rel=0.05)
    assert abs(noise.mean()) < 4 * sigma / math.sqrt(noise.size)
    assert sps.kstest(noise.ravel() / sigma, "norm").pvalue > 1e-3


@pytest.mark.parametrize(("severity", "kept"), [(1, 768), (2, 640), (3, 512), (4, 384), (5, 256)])
def test_drop_global_keeps_the_official_count_of_distinct_input_points(severity: int, kept: int) -> None:
    x = _cloud()
    out = corrupt(x, "drop_global", severity, seed=2)
    idx = _rows_of(out, x)
    assert len(out) == kept and len(np.unique(idx)) == kept
    assert (np.diff(idx) > 0).all()  # survivors keep their input order
    # uniform choice: the survivors are not a block of the input
    assert idx.min() < 50 and idx.max() > 1024 - 50


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_drop_local_removes_nearest_neighbour_clusters(severity: int) -> None:
    x = _cloud().astype(np.float64)
    out = corrupt(x, "drop_local", severity, seed=3)
    assert len(out) == 1024 - 100 * severity
    kept_idx = _rows_of(out, x)
    assert (np.diff(kept_idx) > 0).all()
    counts = set()
    for seed in range(40):
        keep, clusters = C._drop_local(x, 100 * severity, np.random.default_rng(seed))
        counts.add(len(clusters))
        dropped = np.concatenate(clusters)
        assert 1 <= len(clusters) <= 7 and len(dropped) == 100 * severity == (~keep).sum()
        assert len(np.unique(dropped)) == len(dropped) and not keep[dropped].any()
        survivors = x[keep]
        for members in clusters:
            if len(members) == 0:
                continue
            centre = x[members[0]]
            inside = np.linalg.norm(x[members] - centre, axis=1).max()
            # the cluster is the ball of its centre: no point that survives is strictly nearer than a member
            assert inside <= np.linalg.norm(survivors - centre, axis=1).min() + 1e-12
    assert counts == set(range(1, 8))  # the number of clusters is uniform on 1..7


@pytest.mark.parametrize("severity", [1, 5])
def test_add_global_appends_points_uniform_in_the_unit_ball(severity: int) -> None:
    x = _cloud()
    out = corrupt(x, "add_global", severity, seed=4)
    assert len(out) == 1024 + 10 * severity
    np.testing.assert_array_equal(out[:1024], x)
    assert (np.linalg.norm(out[1024:].astype(np.float64), axis=1) <= 1 + 1e-6).all()
    # pooled over seeds: r^3 is U(0, 1) and the direction is uniform for points uniform in the ball
    added = np.concatenate([corrupt(x, "add_global", 5, seed=s)[1024:] for s in range(60)]).astype(np.float64)
    r = np.linalg.norm(added, axis=1)
    assert sps.kstest(r ** 3, "uniform").pvalue > 1e-3
    assert np.abs((added / r[:, None]).mean(0)).max() < 4 / math.sqrt(3 * len(added))


@pytest.mark.parametrize("severity", [1, 5])
def test_add_local_appends_gaussian_clusters_around_cloud_points(severity: int) -> None:
    x = _cloud(radius=0.3).astype(np.float64)  # far enough inside the ball that no added point is folded back
    out = corrupt(x, "add_local", severity, seed=5)
    assert len(out) == 1024 + 100 * severity
    np.testing.assert_array_equal(out[:1024], x)
    counts = set()
    for seed in range(40):
        added, which, centres = C._add_local(x, 100 * severity, np.random.default_rng(seed))
        counts.add(len(centres))
        assert len(added) == 100 * severity and 1 <= len(centres) <= 7 and len(set(centres)) == len(centres)
        for k, c in enumerate(centres):
            dev = added[which == k] - x[c]
            if len(dev) >= 40:  # enough points to measure the cluster's sigma, drawn from U(0.075, 0.125)
                assert 0.075 * 0.75 < dev.std() < 0.125 * 1.25 and np.abs(dev.mean(0)).max() < 0.1
    assert counts == set(range(1, 8))
    tiny = x[:7]  # with as many points as the most clusters, distinct centres must use every point once
    for seed in range(20):
        _, _, centres = C._add_local(tiny, 100, np.random.default_rng(seed))
        assert len(set(centres.tolist())) == len(centres)


def test_add_local_folds_points_outside_the_unit_ball_back_inside() -> None:
    x = _cloud(radius=1.0).astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # every point on the unit sphere: half the noise points out
    added, _, _ = C._add_local(x, 500, np.random.default_rng(0))
    r = np.linalg.norm(added, axis=1)
    assert (r <= 1 + 1e-12).all()
    # p -> p / |p|^2 sends a point at radius 1 + e to 1 / (1 + e): they pile up just inside the sphere
    assert (r > 0.8).mean() > 0.6


@pytest.mark.parametrize("severity", [1, 5])
def test_scale_stretches_axes_within_range_then_renormalises(severity: int) -> None:
    x = _cloud().astype(np.float64)
    s_max = 1.6 + 0.1 * (severity - 1)
    ratios = []
    for seed in range(30):
        out = corrupt(x, "scale", severity, seed=seed)
        assert np.abs(out.mean(0)).max() < 1e-12
        assert np.linalg.norm(out, axis=1).max() == pytest.approx(1.0, abs=1e-12)
        # out[:, j] = a_j * x[:, j] + b_j with a_j = s_j / m: recover the slopes by least squares
        slopes = np.array([np.polyfit(x[:, j], out[:, j], 1)[0] for j in range(3)])
        np.testing.assert_allclose(out, x * slopes - (x * slopes).mean(0), atol=1e-12)
        r = slopes / slopes[:, None]
        assert (r >= 1 / s_max ** 2 - 1e-9).all() and (r <= s_max ** 2 + 1e-9).all()
        ratios.append(r.max())
    assert max(ratios) > s_max  # the range is used, not just near-1 factors


@pytest.mark.parametrize("severity", [1, 5])
def test_rotate_is_an_xyz_euler_rotation_within_the_angle_limit(severity: int) -> None:
    x = _cloud().astype(np.float64)
    limit = math.pi / 6 * severity / 5
    biggest = 0.0
    for seed in range(30):
        out = corrupt(x, "rotate", severity, seed=seed)
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), np.linalg.norm(x, axis=1), atol=1e-12)
        r = np.linalg.lstsq(x, out, rcond=None)[0]  # out = x @ r
        np.testing.assert_allclose(r.T @ r, np.eye(3), atol=1e-10)
        assert np.linalg.det(r) == pytest.approx(1.0)
        # r = Rz(g) Ry(b) Rx(a): read the three angles back
        b = -math.asin(r[2, 0])
        a, g = math.atan2(r[2, 1], r[2, 2]), math.atan2(r[1, 0], r[0, 0])
        assert max(abs(a), abs(b), abs(g)) <= limit + 1e-9
        biggest = max(biggest, abs(a), abs(b), abs(g))
    assert biggest > 0.8 * limit


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_each_corruption_is_deterministic_for_a_seed_and_differs_across_seeds(kind: str) -> None:
    x = _cloud()
    a = corrupt(x, kind, 3, seed=7)
    np.testing.assert_array_equal(a, corrupt(x.copy(), kind, 3, seed=7))
    assert a.dtype == np.float32
    assert not np.array_equal(a, corrupt(x, kind, 3, seed=8))
    assert not np.array_equal(corrupt(x, kind, 3, seed=(7, 0)), corrupt(x, kind, 3, seed=(7, 1)))
    assert not np.array_equal(a, x) if a.shape == x.shape else True
    np.testing.assert_array_equal(x, _cloud())  # the input is not modified


def test_bad_input_is_refused_with_the_fix() -> None:
    x = _cloud()
    with pytest.raises(ValueError, match=r"unknown corruption kind 'dropout_global'; choose one of jitter, "):
        corrupt(x, "dropout_global", 1, 0)
    for sev in (0, 6, 2.5, "3", True):
        with pytest.raises(ValueError, match=r"severity must be an integer 1-5"):
            corrupt(x, "jitter", sev, 0)
    with pytest.raises(ValueError, match=r"shape \[N, 3\].*got \[1024, 6\]; pass sample\['coord'\]"):
        corrupt(np.concatenate([x, x], 1), "jitter", 1, 0)
    with pytest.raises(ValueError, match=r"drop_local at severity 5 needs a cloud of at least 501 points, got 500"):
        corrupt(x[:500], "drop_local", 5, 0)
    with pytest.raises(ValueError, match=r"seed must be a non-negative integer"):
        corrupt(x, "rotate", 1, -1)
    with pytest.raises(ValueError, match=r"NaN or inf"):
        corrupt(np.full((10, 3), np.nan), "scale", 1, 0)


def test_dgcnn_mce_is_one_and_other_figures_follow_the_official_formulas() -> None:
    assert list(DGCNN_MODELNET_C_OA) == list(CORRUPTIONS) == list(OFFICIAL_NAMES)
    assert mce(DGCNN_MODELNET_C_OA) == pytest.approx(1.0, abs=1e-12)
    assert all(v == pytest.approx(1.0) for v in corruption_errors(DGCNN_MODELNET_C_OA).values())
    assert relative_mce(DGCNN_MODELNET_C_OA, DGCNN_MODELNET_C_CLEAN_OA) == pytest.approx(1.0, abs=1e-12)
    # DGCNN's errors from the paper: 0.316 0.248 0.207 0.295 0.275 0.094 0.215
    assert mean_corruption_error(DGCNN_MODELNET_C_OA) == pytest.approx(1.65 / 7, abs=1e-12)
    assert DGCNN_MODELNET_C_ERROR["jitter"] == pytest.approx(0.316)
    # per-severity lists are averaged first; a model at OA 0.9 everywhere has CE = 0.1 / DGCNN error
    flat = {k: [0.95, 0.92, 0.9, 0.88, 0.85] for k in CORRUPTIONS}
    expected = np.mean([0.1 / e for e in (0.316, 0.248, 0.207, 0.295, 0.275, 0.094, 0.215)])
    assert mce(flat) == pytest.approx(expected, abs=1e-12)
    assert mean_corruption_error(flat) == pytest.approx(0.1)
    with pytest.raises(ValueError, match=r"missing \['rotate'\], unknown \['rotation'\]"):
        mce({**{k: 0.9 for k in CORRUPTIONS[:-1]}, "rotation": 0.9})
    with pytest.raises(ValueError, match=r"OA of 'jitter' must be fractions in \[0, 1\], got \[68.4\]"):
        mce({**DGCNN_MODELNET_C_OA, "jitter": 68.4})
    with pytest.raises(ValueError, match=r"one number or one per severity \(5\), got 3 values"):
        mce({**DGCNN_MODELNET_C_OA, "scale": [0.9, 0.9, 0.9]})
