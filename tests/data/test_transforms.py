"""Transforms: determinism for a seed, geometric invariants, subset consistency, grid sampling vs numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pcbench.data import transforms as T


def cloud(n=500, seed=0, with_extra=True):
    rng = np.random.default_rng(seed)
    s = {"coord": rng.normal(size=(n, 3)).astype(np.float32), "name": "x", "label": np.array(3)}
    if with_extra:
        nrm = rng.normal(size=(n, 3))
        s["normal"] = (nrm / np.linalg.norm(nrm, axis=1, keepdims=True)).astype(np.float32)
        s["color"] = rng.random((n, 3)).astype(np.float32)
        s["instance"] = rng.integers(-1, 5, n)
    return s


RANDOM_TRANSFORMS = [
    T.RandomRotate("z"), T.RandomRotate("so3"), T.RandomScale((0.5, 2.0), anisotropic=True), T.RandomTranslate(0.3),
    T.RandomJitter(0.02, 0.05), T.RandomDropout(0.5), T.ShufflePoints(), T.FixedPoints(100, "random"),
    T.FixedPoints(64, "fps"), T.SphereCrop(200, "random"), T.GridSample(0.4, "train"),
    T.ElasticDistortion(p=1.0), T.ChromaticAutoContrast(p=1.0), T.ChromaticJitter(p=1.0, std=0.05),
    T.RandomFlip(0.5), T.ChromaticTranslation(p=1.0), T.RandomDropout(0.2, fixed_ratio=True),
    T.RandomRotate("x", (-0.5, 0.5), center="bbox"), T.FixedPoints(100, "random", keep_order=False),
    T.GridSample(0.4, "fragments"),
]


@pytest.mark.parametrize("t", RANDOM_TRANSFORMS, ids=lambda t: repr(t)[:40])
def test_same_seed_same_result_other_seed_differs(t):
    s = cloud()
    a = t(dict(s), np.random.default_rng(5))
    b = t(dict(s), np.random.default_rng(5))
    c = t(dict(s), np.random.default_rng(6))
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            np.testing.assert_array_equal(a[k], b[k])
    changed = [k for k in ("coord", "color") if not np.array_equal(np.asarray(a[k]), np.asarray(c[k]))
               or np.shape(a[k]) != np.shape(c[k])]
    assert changed, f"{t!r} gave the same output for two seeds"
    # the input dict is never modified in place
    np.testing.assert_array_equal(s["coord"], cloud()["coord"])


def test_rotation_preserves_norms_distances_and_normal_geometry():
    s = cloud(300)
    for axis in ("x", "y", "z", "so3"):
        r = T.RandomRotate(axis)(s, np.random.default_rng(1))
        np.testing.assert_allclose(np.linalg.norm(r["coord"], axis=1), np.linalg.norm(s["coord"], axis=1), rtol=1e-5)
        d0 = ((s["coord"][:50, None] - s["coord"][None, :50]) ** 2).sum(-1)
        d1 = ((r["coord"][:50, None] - r["coord"][None, :50]) ** 2).sum(-1)
        np.testing.assert_allclose(d1, d0, rtol=1e-4, atol=1e-5)
        # normals rotate with the points: the angle between coord and normal is unchanged
        np.testing.assert_allclose((r["coord"] * r["normal"]).sum(1), (s["coord"] * s["normal"]).sum(1), atol=1e-5)
        if axis != "so3":
            i = "xyz".index(axis)
            np.testing.assert_allclose(r["coord"][:, i], s["coord"][:, i], atol=1e-6)


def test_so3_rotations_are_proper_and_uniform():
    t = T.RandomRotate("so3")
    rng = np.random.default_rng(0)
    mats = np.stack([t.matrix(rng) for _ in range(4000)])
    np.testing.assert_allclose(mats @ mats.transpose(0, 2, 1), np.broadcast_to(np.eye(3), mats.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(mats), 1.0, atol=1e-12)
    # Haar measure: E[R] = 0 and the rotation angle has density (1 - cos a) / pi, mean pi/2 + 2/pi
    np.testing.assert_allclose(mats.mean(0), 0, atol=0.05)
    angle = np.arccos(np.clip((np.trace(mats, axis1=1, axis2=2) - 1) / 2, -1, 1))
    assert angle.mean() == pytest.approx(math.pi / 2 + 2 / math.pi, abs=0.03)


def test_rotation_matrix_matches_closed_form():
    a = 0.7
    np.testing.assert_allclose(T.rotation_matrix((0, 0, 1), a),
                               [[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]], atol=1e-12)


def test_anisotropic_scale_keeps_normals_perpendicular_to_the_surface():
    rng = np.random.default_rng(0)
    uv = rng.normal(size=(200, 2))
    e1, e2 = np.array([1.0, -1.0, 0]), np.array([1.0, 1.0, -2.0])  # spans the plane x + y + z = 0
    pts = uv[:, :1] * e1 + uv[:, 1:] * e2
    nrm = np.tile(np.array([1.0, 1.0, 1.0]) / math.sqrt(3), (200, 1))
    s = {"coord": pts.astype(np.float32), "normal": nrm.astype(np.float32)}
    out = T.RandomScale((0.3, 3.0), anisotropic=True)(s, np.random.default_rng(2))
    ratio = out["coord"] / np.where(np.abs(pts) > 1e-3, pts, np.nan)
    scales = np.nanmedian(ratio, axis=0)
    assert np.ptp(scales) > 0.1
    for e in (e1, e2):
        np.testing.assert_allclose(out["normal"] @ (e * scales), 0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out["normal"], axis=1), 1, atol=1e-6)


def test_jitter_translate_scale_bounds():
    s = cloud(20000, with_extra=False)
    j = T.RandomJitter(sigma=0.01, clip=0.02)(s, np.random.default_rng(0))
    d = j["coord"] - s["coord"]
    assert np.abs(d).max() <= 0.02 + 1e-6 and d.std() == pytest.approx(0.0096, abs=0.0008)  # clipped at 2 sigma
    t = T.RandomTranslate(0.3)(s, np.random.default_rng(0))
    shift = t["coord"] - s["coord"]
    np.testing.assert_allclose(shift, np.broadcast_to(shift[0], shift.shape), atol=1e-6)
    assert np.abs(shift[0]).max() <= 0.3
    sc = T.RandomScale((0.8, 1.2))(s, np.random.default_rng(0))
    f = np.linalg.norm(sc["coord"], axis=1) / np.linalg.norm(s["coord"], axis=1)
    assert np.ptp(f) < 1e-5 and 0.8 <= f[0] <= 1.2


def test_dropout_and_subsets_keep_per_point_keys_aligned():
    s = cloud(1000)
    s["coord"][:, 0] = np.arange(1000)  # row identity travels in coord.x
    s["label"] = np.arange(1000) % 7  # per-point label travels with the points
    out = T.RandomDropout(0.5)(s, np.random.default_rng(3))
    rows = out["coord"][:, 0].astype(int)
    assert 500 <= len(rows) < 1000 and np.all(np.diff(rows) > 0)
    for k in ("normal", "color", "instance"):
        np.testing.assert_array_equal(out[k], s[k][rows])
    np.testing.assert_array_equal(out["label"], rows % 7)
    kept = T.RandomDropout(0.5, keep_size=True)(s, np.random.default_rng(3))
    assert len(kept["coord"]) == 1000
    dropped = kept["coord"][:, 0] != np.arange(1000)
    assert dropped.sum() > 0 and np.all(kept["coord"][dropped] == s["coord"][0])
    sh = T.ShufflePoints()(s, np.random.default_rng(0))
    assert sorted(sh["coord"][:, 0].astype(int)) == list(range(1000))
    np.testing.assert_array_equal(sh["normal"], s["normal"][sh["coord"][:, 0].astype(int)])
    # a 0-d (object) label is not a per-point array
    assert T.point_keys({"coord": s["coord"], "label": np.array(2)}) == ["coord"]


def test_fixed_points_fps_random_and_padding():
    s = cloud(2000, with_extra=False)
    out = T.FixedPoints(50, "fps")(s, np.random.default_rng(4))
    sel = out["coord"].astype(np.float64)
    src = s["coord"].astype(np.float64)
    mind = ((src - sel[0]) ** 2).sum(1)
    for k in range(1, 50):  # FPS property against brute force
        assert ((sel[k] - sel[:k]) ** 2).sum(1).min() == pytest.approx(mind.max(), rel=1e-5)
        mind = np.minimum(mind, ((src - sel[k]) ** 2).sum(1))
    r = T.FixedPoints(300, "random")(s, np.random.default_rng(0))
    assert len({tuple(x) for x in r["coord"]}) == 300
    f = T.FixedPoints(10, "first")(s, np.random.default_rng(0))
    np.testing.assert_array_equal(f["coord"], s["coord"][:10])
    small = {"coord": s["coord"][:7]}
    p = T.FixedPoints(20)(small, np.random.default_rng(0))
    assert len(p["coord"]) == 20
    np.testing.assert_array_equal(p["coord"][:7], small["coord"])  # every point kept once, then repeats
    with pytest.raises(ValueError, match="0 points"):
        T.FixedPoints(5)({"coord": np.zeros((0, 3), np.float32)}, np.random.default_rng(0))


def _numpy_voxels(coord, g):
    keys = np.floor(coord.astype(np.float64) / g).astype(np.int64)
    uniq, inv = np.unique(keys, axis=0, return_inverse=True)
    return keys, uniq, inv.reshape(-1)


@pytest.mark.parametrize("mode", ["train", "test"])
def test_grid_sample_matches_numpy_voxels_and_inverse_maps_back(mode):
    rng = np.random.default_rng(0)
    coord = rng.uniform(-2, 3, size=(3000, 3)).astype(np.float32)
    coord[100:150] = coord[:50]  # duplicates
    s = {"coord": coord, "label": np.arange(3000), "color": rng.random((3000, 3)).astype(np.float32)}
    g = 0.5
    out = T.GridSample(g, mode)(s, np.random.default_rng(1))
    keys, uniq, inv_np = _numpy_voxels(coord, g)
    assert len(out["coord"]) == len(uniq)  # one point per occupied voxel
    src = out["label"]  # the original row of every kept point
    np.testing.assert_array_equal(out["coord"], coord[src])
    np.testing.assert_array_equal(out["grid_coord"], keys[src])
    np.testing.assert_array_equal(keys[src], uniq)  # kept points in lexicographic voxel order
    inv = out["inverse"]
    assert inv.shape == (3000,)
    np.testing.assert_array_equal(inv, inv_np)  # every point maps to the kept point of its own voxel
    # full-resolution evaluation: a per-kept-point prediction scattered back gives each point its voxel's value
    pred = out["grid_coord"]
    np.testing.assert_array_equal(pred[inv], keys)
    if mode == "test":  # deterministic: the first point of each voxel in input order
        first = np.full(len(uniq), -1)
        for i in range(2999, -1, -1):
            first[inv_np[i]] = i
        np.testing.assert_array_equal(src, first)


def test_grid_sample_composes_and_blocks_later_subsets():
    rng = np.random.default_rng(0)
    coord = rng.uniform(0, 4, size=(2000, 3)).astype(np.float32)
    s = {"coord": coord, "label": np.arange(2000)}
    a = T.GridSample(0.25, "train")(s, np.random.default_rng(0))
    b = T.GridSample(1.0, "train")(a, np.random.default_rng(0))
    keys = np.floor(coord / 1.0).astype(np.int64)
    np.testing.assert_array_equal(b["grid_coord"][b["inverse"]], keys)  # composite map still reaches all 2000
    with pytest.raises(ValueError, match="after GridSample built 'inverse'.*apply GridSample last"):
        T.FixedPoints(10, "random")(a, np.random.default_rng(0))
    with pytest.raises(ValueError, match="grid_size must be > 0"):
        T.GridSample(0)


def test_sphere_crop_keeps_nearest_points():
    s = cloud(5000, with_extra=False)
    out = T.SphereCrop(1000, "center")(s, np.random.default_rng(0))
    c = s["coord"].astype(np.float64)
    centre = (c.min(0) + c.max(0)) / 2
    d = ((c - centre) ** 2).sum(1)
    want = np.sort(np.argsort(d, kind="stable")[:1000])
    np.testing.assert_array_equal(out["coord"], s["coord"][want])
    assert T.SphereCrop(10000)(s, np.random.default_rng(0)) is s  # under budget: untouched


def test_elastic_distortion_is_smooth_and_bounded():
    rng = np.random.default_rng(0)
    c = rng.uniform(0, 4, size=(4000, 3)).astype(np.float32)
    s = {"coord": c}
    out = T.ElasticDistortion(((0.5, 0.2),), p=1.0)(s, np.random.default_rng(1))
    disp = out["coord"] - c
    assert 0 < np.abs(disp).max() < 0.2 * 3  # magnitude x (blurred, hence < 1) noise
    # smoothness: nearby points move alike, far ones independently
    i, j = rng.integers(0, 4000, (2, 20000))
    dist = np.linalg.norm(c[i] - c[j], axis=1)
    dd = np.linalg.norm(disp[i] - disp[j], axis=1)
    assert dd[dist < 0.05].mean() < 0.25 * dd[dist > 2].mean()
    assert T.ElasticDistortion(p=0.0)(s, np.random.default_rng(0)) is s


def test_colour_transforms():
    rng = np.random.default_rng(0)
    col = (0.2 + 0.3 * rng.random((500, 3))).astype(np.float32)
    s = {"coord": np.zeros((500, 3), np.float32), "color": col}
    full = T.ChromaticAutoContrast(p=1.0, blend_factor=1.0)(s, rng)
    np.testing.assert_allclose(full["color"].min(0), 0, atol=1e-6)
    np.testing.assert_allclose(full["color"].max(0), 1, atol=1e-5)
    half = T.ChromaticAutoContrast(p=1.0, blend_factor=0.5)(s, rng)
    np.testing.assert_allclose(half["color"], 0.5 * col + 0.5 * full["color"], atol=1e-6)
    j = T.ChromaticJitter(p=1.0, std=0.5)(s, rng)
    assert j["color"].min() >= 0 and j["color"].max() <= 1 and not np.array_equal(j["color"], col)
    no_color = {"coord": s["coord"]}
    assert T.ChromaticJitter(p=1.0)(no_color, rng) is no_color


def test_normalisation_and_center_shift():
    s = cloud(300, with_extra=False)
    s["coord"] = s["coord"] * 7 + 3
    n = T.NormalizeUnitSphere()(s, np.random.default_rng(0))
    np.testing.assert_allclose(n["coord"].mean(0), 0, atol=1e-5)
    assert np.linalg.norm(n["coord"], axis=1).max() == pytest.approx(1.0, abs=1e-6)
    # Pointcept's CenterShift: x, y centred on the bounding box; apply_z=True puts the lowest point at z = 0,
    # apply_z=False leaves z alone
    lo, hi = s["coord"].min(0), s["coord"].max(0)
    c = T.CenterShift(apply_z=True)(s, np.random.default_rng(0))
    np.testing.assert_allclose(c["coord"], s["coord"] - [(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, lo[2]], atol=1e-5)
    c = T.CenterShift(apply_z=False)(s, np.random.default_rng(0))
    np.testing.assert_allclose(c["coord"], s["coord"] - [(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, 0], atol=1e-5)


@pytest.mark.parametrize("apply_z", [True, False])
def test_snapped_center_shift_keeps_the_voxels(apply_z):
    rng = np.random.default_rng(2)
    coord = rng.uniform(-3.3, 7.1, size=(4000, 3))
    g = 0.05
    out = T.CenterShift(apply_z=apply_z, snap=g)({"coord": coord}, rng)["coord"]
    shift = coord - out
    assert np.allclose(shift, shift[0]) and np.allclose(shift[0] / g, np.round(shift[0] / g))  # whole voxels
    plain = T.CenterShift(apply_z=apply_z)({"coord": coord}, rng)["coord"]
    assert np.abs(out - plain).max() <= g / 2 + 1e-9  # within half a voxel of the unsnapped shift
    # the voxel partition is unchanged: floor(x / g) moves by a constant integer vector
    before = np.floor(coord / g).astype(np.int64)
    after = np.floor(out / g).astype(np.int64)
    d = after - before
    assert (d == d[0]).all()
    # so GridSample's kept points stay one per voxel of the models' own grid
    kept = T.GridSample(g, "train", return_inverse=False)({"coord": coord}, rng)
    moved = T.CenterShift(apply_z=apply_z, snap=g)(kept, rng)["coord"]
    assert len(np.unique(np.floor(moved / g).astype(np.int64), axis=0)) == len(moved)
    with pytest.raises(ValueError, match="snap must be a positive length"):
        T.CenterShift(snap=0.0)


def test_build_feat_and_compose_from_hydra_config():
    from hydra.utils import instantiate

    cfg = {"_target_": "pcbench.data.transforms.Compose", "transforms": [
        {"_target_": "pcbench.data.transforms.RandomRotate", "axis": "z"},
        {"_target_": "pcbench.data.transforms.RandomScale", "scale": [0.9, 1.1]},
        {"_target_": "pcbench.data.transforms.BuildFeat", "keys": ["coord", "normal", "color"]},
    ]}
    t = instantiate(cfg, _convert_="all")
    assert isinstance(t, T.Compose) and len(t.transforms) == 3
    s = cloud(100)
    out = t(s, np.random.default_rng(0))
    np.testing.assert_array_equal(out["feat"], np.concatenate([out["coord"], out["normal"], out["color"]], 1))
    assert out["feat"].dtype == np.float32
    with pytest.raises(ValueError, match="BuildFeat key 'rgb' not in sample"):
        T.BuildFeat(("coord", "rgb"))(s, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"transforms\[1\] is int, not callable"):
        T.Compose([T.ShufflePoints(), 3])


def test_torch_inputs_and_missing_rng_are_accepted():
    s = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in cloud(200).items()}
    out = T.Compose([T.RandomRotate("z"), T.GridSample(0.5), T.BuildFeat(("coord", "color"))])(s)
    assert isinstance(out["coord"], np.ndarray) and out["feat"].shape == (len(out["coord"]), 6)


@pytest.mark.parametrize("make,match", [
    (lambda: T.RandomRotate("w"), "axis must be"),
    (lambda: T.RandomRotate("z", angle=(1, 0)), "low <= high"),
    (lambda: T.RandomScale((0, 1)), "scale must be positive"),
    (lambda: T.RandomJitter(-1), "sigma must be >= 0"),
    (lambda: T.RandomDropout(1.0), r"max_ratio must be in \[0, 1\)"),
    (lambda: T.FixedPoints(0), "n must be a positive"),
    (lambda: T.FixedPoints(8, "grid"), "mode must be"),
    (lambda: T.SphereCrop(0), "max_points must be positive"),
    (lambda: T.GridSample(0.1, "eval"), "mode must be"),
    (lambda: T.ElasticDistortion(((0.0, 1.0),)), "granularity must be > 0"),
    (lambda: T.BuildFeat(()), "keys must name"),
    (lambda: T.GridSample(0.1, "vote"), "mode must be 'train', 'test' or 'fragments'"),
    (lambda: T.RandomFlip(1.5), r"p must be a probability in \[0, 1\]"),
    (lambda: T.NormalizeColor(1, -1), "needs low < high"),
    (lambda: T.ChromaticTranslation(ratio=-0.1), "ratio must be >= 0"),
    (lambda: T.RandomRotate("z", center="mean"), "center must be 'origin' or 'bbox'"),
    (lambda: T.SphereCrop(-5), r"max_points must be positive \(or null"),
    (lambda: T.ElasticDistortion(blur_passes=-1), "blur_passes must be >= 0"),
])
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("passes", [None, 3])
def test_elastic_distortion_matches_a_scipy_reference(passes):
    from scipy.interpolate import RegularGridInterpolator
    from scipy.ndimage import convolve

    rng = np.random.default_rng(3)
    c = rng.uniform(-1, 2, size=(3000, 3))
    g, mag = 0.4, 0.7
    t = T.ElasticDistortion(((g, mag),), p=1.0) if passes is None else T.ElasticDistortion(((g, mag),), 1.0, passes)
    out = t._warp(c, g, mag, np.random.default_rng(11))
    # reference: the same noise draw, blurred with scipy and interpolated with scipy
    lo = c.min(0)
    dims = ((c - lo).max(0) // g).astype(int) + 3
    noise = np.random.default_rng(11).standard_normal((*dims, 3))
    kernels = [np.ones((3, 1, 1, 1)) / 3, np.ones((1, 3, 1, 1)) / 3, np.ones((1, 1, 3, 1)) / 3]
    for _ in range(2 if passes is None else passes):  # Pointcept / MinkowskiEngine: two blur passes
        for k in kernels:
            noise = convolve(noise, k, mode="constant", cval=0)
    axes = [np.linspace(lo[d] - g, lo[d] + g * (dims[d] - 2), dims[d]) for d in range(3)]
    ref = c + RegularGridInterpolator(axes, noise)(c) * mag
    np.testing.assert_allclose(out, ref, atol=1e-10)


def test_random_flip_mirrors_x_and_y_independently():
    s = cloud(50)
    both = T.RandomFlip(p=1.0)(s, np.random.default_rng(0))
    np.testing.assert_array_equal(both["coord"], s["coord"] * [-1, -1, 1])
    np.testing.assert_array_equal(both["normal"], s["normal"] * [-1, -1, 1])
    assert T.RandomFlip(p=0.0)(s, np.random.default_rng(0)) is s
    # p = 0.5: each axis on its own coin, so the four sign patterns come up about equally often
    seen = {}
    for seed in range(400):
        out = T.RandomFlip(0.5)(s, np.random.default_rng(seed))
        key = tuple(np.sign(out["coord"][0, :2] * s["coord"][0, :2]).astype(int))
        seen[key] = seen.get(key, 0) + 1
    assert set(seen) == {(1, 1), (1, -1), (-1, 1), (-1, -1)} and min(seen.values()) > 60


def test_chromatic_translation_and_normalize_color():
    rng = np.random.default_rng(0)
    col = (0.1 + 0.8 * rng.random((300, 3))).astype(np.float32)
    s = {"coord": np.zeros((300, 3), np.float32), "color": col}
    out = T.ChromaticTranslation(p=1.0, ratio=0.05)(s, np.random.default_rng(3))["color"]
    tr = out - col  # no clipping here (colours in [0.1, 0.9]): one offset per channel within the ratio
    np.testing.assert_allclose(tr, np.broadcast_to(tr[0], tr.shape), atol=1e-6)
    assert (np.abs(tr[0]) <= 0.05 + 1e-7).all() and not np.allclose(tr[0], 0)
    # Pointcept draws (rand - 0.5) * 255 * 2 * ratio on 0-255 colours: the same offsets / 255 here
    g = np.random.default_rng(3)
    g.random()  # the p draw comes first, then the three offsets
    want = (g.random((1, 3)) - 0.5) * 255 * 2 * 0.05 / 255
    np.testing.assert_allclose(tr[0], want[0], atol=1e-6)
    edge = {"coord": np.zeros((2, 3), np.float32), "color": np.array([[0, 0, 0], [1, 1, 1]], np.float32)}
    clipped = T.ChromaticTranslation(p=1.0, ratio=0.5)(edge, np.random.default_rng(1))["color"]
    assert clipped.min() >= 0 and clipped.max() <= 1
    assert T.ChromaticTranslation(p=0.0)(s, rng) is s
    # NormalizeColor: [0, 1] -> [-1, 1] is Pointcept's color / 127.5 - 1 on 0-255 colours
    c255 = np.arange(256, dtype=np.float32)[:, None].repeat(3, 1)
    n = T.NormalizeColor()({"coord": np.zeros((256, 3)), "color": c255 / 255}, rng)["color"]
    np.testing.assert_allclose(n, c255 / 127.5 - 1, atol=1e-6)
    same = T.NormalizeColor(0.0, 1.0)({"coord": np.zeros((256, 3)), "color": c255 / 255}, rng)["color"]
    np.testing.assert_allclose(same, c255 / 255, atol=1e-7)
    no_color = {"coord": np.zeros((3, 3))}
    assert T.NormalizeColor()(no_color, rng) is no_color


def test_fixed_ratio_dropout_keeps_exactly_the_pointcept_count():
    s = cloud(1001)
    s["label"] = np.arange(1001)
    for seed in range(20):
        out = T.RandomDropout(0.2, p=1.0, fixed_ratio=True)(s, np.random.default_rng(seed))
        assert len(out["coord"]) == int(1001 * (1 - 0.2))  # np.random.choice(n, int(n * (1 - ratio)))
        np.testing.assert_array_equal(out["coord"], s["coord"][out["label"]])
    applied = sum(len(T.RandomDropout(0.2, p=0.2, fixed_ratio=True)(s, np.random.default_rng(k))["coord"]) < 1001
                  for k in range(500))
    assert 60 < applied < 140  # applied with probability 0.2


def test_rotation_about_the_bounding_box_centre():
    s = cloud(300)
    s["coord"] = s["coord"] + [5.0, -2.0, 1.0]
    t = T.RandomRotate("x", (0.3, 0.3), center="bbox")
    out = t(s, np.random.default_rng(0))
    c = s["coord"].astype(np.float64)
    centre = (c.min(0) + c.max(0)) / 2
    r = T.rotation_matrix((1, 0, 0), 0.3)
    np.testing.assert_allclose(out["coord"], (c - centre) @ r.T + centre, atol=1e-5)
    np.testing.assert_allclose(out["normal"], s["normal"] @ r.T, atol=1e-6)  # normals: rotation only
    origin = T.RandomRotate("x", (0.3, 0.3))(s, np.random.default_rng(0))
    np.testing.assert_allclose(origin["coord"], c @ r.T, atol=1e-5)


def test_random_subset_in_drawn_order():
    s = cloud(2048)
    s["label"] = np.arange(2048)
    out = T.FixedPoints(1024, "random", keep_order=False)(s, np.random.default_rng(7))
    idx = out["label"]
    assert len(np.unique(idx)) == 1024 and not (np.diff(idx) > 0).all()  # distinct, not sorted
    np.testing.assert_array_equal(idx, np.random.default_rng(7).permutation(2048)[:1024])
    np.testing.assert_array_equal(T.FixedPoints(1024, "random")(s, np.random.default_rng(7))["label"], np.sort(idx))


def test_sphere_crop_none_keeps_everything():
    s = cloud(500)
    assert T.SphereCrop(None)(s, np.random.default_rng(0)) is s


def test_grid_sample_fragments_match_pointcepts_construction():
    rng = np.random.default_rng(5)
    coord = rng.uniform(0, 1.5, size=(2500, 3)).astype(np.float32)
    coord[2000:] = coord[:500] + 1e-4  # dense voxels
    s = {"coord": coord, "label": np.arange(2500), "color": rng.random((2500, 3)).astype(np.float32)}
    g = 0.25
    out = T.GridSample(g, "fragments")(s, np.random.default_rng(9))
    keys = np.floor(coord.astype(np.float64) / g).astype(np.int64)
    uniq, inv, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    inv = inv.reshape(-1)
    nfrag, nvox = counts.max(), len(uniq)
    np.testing.assert_array_equal(out["fragment_offset"], nvox * np.arange(1, nfrag + 1))
    idx = out["index"]
    np.testing.assert_array_equal(out["label"], idx)  # every per-point array follows index
    np.testing.assert_array_equal(out["coord"], coord[idx])
    np.testing.assert_array_equal(out["grid_coord"], keys[idx])
    frags = idx.reshape(nfrag, nvox)
    for f in range(nfrag):  # one point of every voxel, in voxel order
        np.testing.assert_array_equal(inv[frags[f]], np.arange(nvox))
    for v in range(nvox):  # voxel v: fragment f holds its (f mod count)-th point of one fixed order
        members = frags[:, v]
        k = counts[v]
        assert sorted(members[:k].tolist()) == sorted(np.flatnonzero(inv == v).tolist())
        np.testing.assert_array_equal(members, members[np.arange(nfrag) % k])
    assert set(idx.tolist()) == set(range(2500))  # together the fragments hold every point
    with pytest.raises(ValueError, match="after GridSample built fragments"):
        T.SphereCrop(10)(out, np.random.default_rng(0))
    with pytest.raises(ValueError, match="needs the full-resolution points"):
        T.GridSample(g, "fragments")(T.GridSample(g, "test")(s, np.random.default_rng(0)), np.random.default_rng(0))
