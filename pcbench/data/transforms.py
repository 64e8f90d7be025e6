"""Point-cloud transforms: small typed callables on sample dicts, composed from config.

A sample is a dict of arrays (numpy, or CPU torch tensors: they are read with ``np.asarray`` and
come back as numpy). Per-point arrays (first axis = the n points) use the keys in :data:`POINT_KEYS`
(plus any listed in ``sample["point_keys"]``): ``coord`` [n,3] float32, ``normal`` [n,3], ``color``
[n,3] float32 in [0, 1], ``label`` [n] (segmentation; a 0-d ``label`` is a per-object class and is left
alone), ``instance`` [n], ``mask`` [n], ``feat`` [n,C], ``grid_coord`` [n,3]. Other keys (``name``, ...)
are left alone. ``inverse`` [m] (added by :class:`GridSample`) maps every full-resolution point to its
representative among the current points.

Every transform is called as ``t(sample, rng) -> sample`` with a ``numpy.random.Generator``: the
Dataset derives ``rng`` from (seed, epoch, index), so results are identical for a seed whatever the
number or order of DataLoader workers. ``rng`` may be omitted (``t(sample)``): a fresh, unseeded
generator is used then, so the result is not reproducible. Build pipelines in Hydra with ``_target_`` entries inside a
:class:`Compose`. Transforms that change the set of points (crop, dropout, fixed-N) refuse to run after
:class:`GridSample` made an ``inverse`` map (it would no longer reach every full-resolution point).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "POINT_KEYS",
    "BuildFeat",
    "CenterShift",
    "ChromaticAutoContrast",
    "ChromaticJitter",
    "Compose",
    "ElasticDistortion",
    "FixedPoints",
    "GridSample",
    "NormalizeUnitSphere",
    "RandomDropout",
    "RandomJitter",
    "RandomRotate",
    "RandomRotatePerturbation",
    "RandomScale",
    "RandomTranslate",
    "ShufflePoints",
    "SphereCrop",
    "point_keys",
    "rotation_matrix",
    "take_points",
]

Sample = dict[str, Any]
Transform = Callable[[Sample, np.random.Generator], Sample]

#: keys whose arrays hold one row per point
POINT_KEYS = ("coord", "normal", "color", "label", "segment", "instance", "mask", "feat", "strength", "grid_coord")


def point_keys(sample: Sample) -> list[str]:
    """Per-point keys present in ``sample`` (the fixed ones plus ``sample['point_keys']``; a 0-d label is not)."""
    extra = tuple(sample.get("point_keys", ()))
    return [k for k in (*POINT_KEYS, *extra) if k in sample and np.ndim(sample[k]) >= 1]


def _rng(rng: np.random.Generator | None) -> np.random.Generator:
    return np.random.default_rng() if rng is None else rng


def _num_points(sample: Sample) -> int:
    if "coord" not in sample:
        raise ValueError(f"sample has no 'coord' (keys: {sorted(sample)}); every sample needs coord [n, 3]")
    return int(np.asarray(sample["coord"]).shape[0])


def take_points(sample: Sample, idx: np.ndarray, who: str = "transform") -> Sample:
    """Keep rows ``idx`` of every per-point array (a copy of the dict; other keys untouched)."""
    if "inverse" in sample:
        raise ValueError(f"{who} would change the points after GridSample built 'inverse'; "
                         "apply GridSample last (after cropping, dropout and resampling)")
    out = dict(sample)
    for k in point_keys(sample):
        out[k] = np.asarray(sample[k])[idx]
    return out


def rotation_matrix(axis: np.ndarray | Sequence[float], angle: float) -> np.ndarray:
    """3x3 rotation by ``angle`` (radians, right-handed) about unit ``axis`` (Rodrigues' formula)."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


class Compose:
    """Apply transforms in order; ``transforms`` is a list (Hydra builds it from ``_target_`` entries)."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        for i, t in enumerate(transforms):
            if not callable(t):
                raise ValueError(f"transforms[{i}] is {type(t).__name__}, not callable; give transform objects")
        self.transforms = list(transforms)

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        rng = _rng(rng)
        for t in self.transforms:
            sample = t(sample, rng)
        return sample

    def __repr__(self) -> str:
        return "Compose([" + ", ".join(repr(t) for t in self.transforms) + "])"


class _Repr:
    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


def _check_range(name: str, lo: float, hi: float) -> None:
    if not lo <= hi:
        raise ValueError(f"{name} must be (low, high) with low <= high, got ({lo}, {hi}); swap the bounds")


# ------------------------------------------------------------------------------------------ geometry
class RandomRotate(_Repr):
    """Rotate coord (and normal) by a random angle about z (``axis="z"``, also "x"/"y") or uniformly in SO(3).

    ``angle`` is the (low, high) range in radians for the axis modes; "so3" draws a uniform random
    rotation (Shoemake's quaternion method) and ignores ``angle``. Rotation is about the origin.
    """

    def __init__(self, axis: str = "z", angle: tuple[float, float] = (-math.pi, math.pi), p: float = 1.0) -> None:
        if axis not in ("x", "y", "z", "so3"):
            raise ValueError(f"axis must be 'x', 'y', 'z' or 'so3', got {axis!r}")
        _check_range("angle", *angle)
        self.axis, self.angle, self.p = axis, tuple(angle), p

    def matrix(self, rng: np.random.Generator) -> np.ndarray:
        """The rotation this transform would apply for ``rng``."""
        if self.axis == "so3":
            u1, u2, u3 = rng.random(3)
            q = np.array([math.sqrt(1 - u1) * math.sin(2 * math.pi * u2), math.sqrt(1 - u1) * math.cos(2 * math.pi * u2),
                          math.sqrt(u1) * math.sin(2 * math.pi * u3), math.sqrt(u1) * math.cos(2 * math.pi * u3)])
            x, y, z, w = q
            return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                             [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                             [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
        axis = {"x": (1, 0, 0), "y": (0, 1, 0), "z": (0, 0, 1)}[self.axis]
        return rotation_matrix(axis, rng.uniform(*self.angle))

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        rng = _rng(rng)
        if rng.random() >= self.p:
            return sample
        r = self.matrix(rng)
        out = dict(sample)
        for k in ("coord", "normal"):
            if k in sample:
                a = np.asarray(sample[k])
                out[k] = a @ r.T.astype(a.dtype) if a.dtype in (np.float32, np.float64) else (a @ r.T).astype(a.dtype)
        return out


class RandomRotatePerturbation(_Repr):
    """Small rotation about x, y and z: angles ~ N(0, sigma) clipped to [-clip, clip] (radians), applied as
    R_z R_y R_x to coord and normal (PointNet++ ``provider.rotate_perturbation_point_cloud``)."""

    def __init__(self, sigma: float = 0.06, clip: float = 0.18) -> None:
        if sigma < 0 or clip <= 0:
            raise ValueError(f"sigma must be >= 0 and clip > 0, got sigma={sigma}, clip={clip}")
        self.sigma, self.clip = sigma, clip

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        rng = _rng(rng)
        ax, ay, az = np.clip(self.sigma * rng.standard_normal(3), -self.clip, self.clip)
        r = rotation_matrix((0, 0, 1), az) @ rotation_matrix((0, 1, 0), ay) @ rotation_matrix((1, 0, 0), ax)
        out = dict(sample)
        for k in ("coord", "normal"):
            if k in sample:
                a = np.asarray(sample[k])
                out[k] = (a @ r.T).astype(a.dtype)
        return out


class RandomScale(_Repr):
    """Multiply coord by a factor uniform in ``scale`` (one per axis when ``anisotropic``); normals follow."""

    def __init__(self, scale: tuple[float, float] = (0.9, 1.1), anisotropic: bool = False, p: float = 1.0) -> None:
        _check_range("scale", *scale)
        if scale[0] <= 0:
            raise ValueError(f"scale must be positive, got {scale}; use (0.8, 1.2) for example")
        self.scale, self.anisotropic, self.p = tuple(scale), anisotropic, p

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        rng = _rng(rng)
        if rng.random() >= self.p:
            return sample
        s = rng.uniform(*self.scale, size=3 if self.anisotropic else 1)
        out = dict(sample)
        c = np.asarray(sample["coord"])
        out["coord"] = (c * s).astype(c.dtype)
        if "normal" in sample and self.anisotropic:  # normals transform with the inverse transpose
            n = np.asarray(sample["normal"]) / s
            out["normal"] = (n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)).astype(c.dtype)
        return out


class RandomTranslate(_Repr):
    """Add one random offset uniform in [-shift, shift] per axis to every point."""

    def __init__(self, shift: float | tuple[float, float, float] = 0.2, p: float = 1.0) -> None:
        self.shift, self.p = shift, p

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        rng = _rng(rng)
        if rng.random() >= self.p:
            return sample
        sh = np.broadcast_to(np.asarray(self.shift, dtype=np.float64), (3,))
        c = np.asarray(sample["coord"])
        return {**sample, "coord": (c + rng.uniform(-sh, sh)).astype(c.dtype)}


class RandomJitter(_Repr):
    """Add per-point Gaussian noise (``sigma``) clipped to [-clip, clip] to coord."""

    def __init__(self, sigma: float = 0.01, clip: float = 0.05) -> None:
        if sigma < 0 or clip <= 0:
            raise ValueError(f"sigma must be >= 0 and clip > 0, got sigma={sigma}, clip={clip}")
        self.sigma, self.clip = sigma, clip

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        rng = _rng(rng)
        c = np.asarray(sample["coord"])
        noise = rng.standard_normal(size=c.shape, dtype=np.float32 if c.dtype == np.float32 else np.float64)
        noise *= self.sigma
        np.clip(noise, -self.clip, self.clip, out=noise)
        return {**sample, "coord": (c + noise).astype(c.dtype, copy=False)}


class CenterShift(_Repr):
    """Move the bounding-box centre to the origin (``apply_z=False``: put the minimum z at 0 instead)."""

    def __init__(self, apply_z: bool = True) -> None:
        self.apply_z = apply_z

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        rng = _rng(rng)
        c = np.asarray(sample["coord"])
        if len(c) == 0:
            return sample
        lo, hi = c.min(0), c.max(0)
        shift = (lo + hi) / 2
        if not self.apply_z:
            shift[2] = lo[2]
        return {**sample, "coord": (c - shift).astype(c.dtype)}


class NormalizeUnitSphere(_Repr):
    """Centre coord at its centroid and scale it so that the farthest point has norm 1."""

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        rng = _rng(rng)
        c = np.asarray(sample["coord"], dtype=np.float64)
        if len(c) == 0:
            return sample
        c = c - c.mean(0)
        r = np.sqrt((c ** 2).sum(1).max())
        return {**sample, "coord": (c / r if r > 0 else c).astype(np.asarray(sample["coord"]).dtype)}


class ElasticDistortion(_Repr):
    """Smooth random warp of coord (as in the MinkowskiEngine / Pointcept scene augmentation).

    For every (granularity, magnitude) pair: Gaussian noise on a grid of spacing ``granularity``
    covering the cloud (node j at min + (j - 1) * granularity) is smoothed by three passes of a 3-wide
    box blur per axis (zero padding), trilinearly interpolated at each point and added times
    ``magnitude``. Plain numpy (no scipy needed).
    """

    def __init__(self, distortion_params: Sequence[tuple[float, float]] = ((0.2, 0.4), (0.8, 1.6)),
                 p: float = 0.95) -> None:
        for g, _ in distortion_params:
            if g <= 0:
                raise ValueError(f"granularity must be > 0, got {g} in distortion_params={distortion_params}")
        self.distortion_params, self.p = [tuple(x) for x in distortion_params], p

    @staticmethod
    def _blur(x: np.ndarray, axis: int) -> np.ndarray:
        pad = [(0, 0)] * x.ndim
        pad[axis] = (1, 1)
        xp = np.pad(x, pad, mode="constant")  # zero padding, as scipy.ndimage.convolve(mode="constant")
        sl = [slice(None)] * x.ndim
        parts = []
        for s in range(3):
            sl[axis] = slice(s, s + x.shape[axis])
            parts.append(xp[tuple(sl)])
        return (parts[0] + parts[1] + parts[2]) / 3

    def _warp(self, coord: np.ndarray, granularity: float, magnitude: float, rng: np.random.Generator) -> np.ndarray:
        lo = coord.min(0)
        dims = ((coord - lo).max(0) // granularity).astype(int) + 3
        noise = rng.standard_normal((*dims, 3))
        for _ in range(3):
            for ax in range(3):
                noise = self._blur(noise, ax)
        # grid node j sits at lo + (j - 1) * granularity, so every point has nodes on both sides
        t = (coord - lo) / granularity + 1
        i0 = np.clip(np.floor(t).astype(int), 0, dims - 2)
        f = t - i0
        out = np.zeros_like(coord)
        for dx in (0, 1):
            for dy in (0, 1):
                for dz in (0, 1):
                    w = ((f[:, 0] if dx else 1 - f[:, 0]) * (f[:, 1] if dy else 1 - f[:, 1])
                         * (f[:, 2] if dz else 1 - f[:, 2]))
                    out += w[:, None] * noise[i0[:, 0] + dx, i0[:, 1] + dy, i0[:, 2] + dz]
        return coord + out * magnitude

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        rng = _rng(rng)
        c = np.asarray(sample["coord"])
        if rng.random() >= self.p or len(c) == 0:
            return sample
        x = c.astype(np.float64)
        for g, m in self.distortion_params:
            x = self._warp(x, g, m, rng)
        return {**sample, "coord": x.astype(c.dtype)}


# -------------------------------------------------------------------------------------------- colour
class ChromaticAutoContrast(_Repr):
    """Stretch each colour channel to the full [0, 1] range, blended with the original.

    ``blend_factor=None`` draws the blend weight uniformly in [0, 1) per call. Colours are floats in [0, 1].
    """

    def __init__(self, p: float = 0.2, blend_factor: float | None = None) -> None:
        self.p, self.blend_factor = p, blend_factor

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        rng = _rng(rng)
        if "color" not in sample or rng.random() >= self.p or len(sample["color"]) == 0:
            return sample
        col = np.asarray(sample["color"], dtype=np.float64)
        lo, hi = col.min(0, keepdims=True), col.max(0, keepdims=True)
        scale = 1.0 / np.maximum(hi - lo, 1e-6)
        contrast = (col - lo) * scale
        b = rng.random() if self.blend_factor is None else self.blend_factor
        return {**sample, "color": ((1 - b) * col + b * contrast).astype(np.float32)}


class ChromaticJitter(_Repr):
    """Add per-point Gaussian noise of standard deviation ``std`` to colour and clip to [0, 1]."""

    def __init__(self, p: float = 0.95, std: float = 0.005) -> None:
        self.p, self.std = p, std

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        rng = _rng(rng)
        if "color" not in sample or rng.random() >= self.p:
            return sample
        col = np.asarray(sample["color"], dtype=np.float64)
        noise = rng.standard_normal(col.shape) * self.std
        return {**sample, "color": np.clip(col + noise, 0, 1).astype(np.float32)}


# ------------------------------------------------------------------------------------ point subsets
class RandomDropout(_Repr):
    """Drop a random fraction of points, the fraction uniform in [0, max_ratio] (PointNet++ input dropout).

    ``keep_size=True`` keeps the count by overwriting dropped rows with the first point (as PointNet++
    does for fixed-size batches); otherwise the dropped points are removed.
    """

    def __init__(self, max_ratio: float = 0.875, keep_size: bool = False, p: float = 1.0) -> None:
        if not 0 <= max_ratio < 1:
            raise ValueError(f"max_ratio must be in [0, 1), got {max_ratio}")
        self.max_ratio, self.keep_size, self.p = max_ratio, keep_size, p

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        rng = _rng(rng)
        n = _num_points(sample)
        if n == 0 or rng.random() >= self.p:
            return sample
        drop = rng.random(n) < rng.uniform(0, self.max_ratio)
        if self.keep_size:
            idx = np.arange(n)
            idx[drop] = 0
        else:
            idx = np.flatnonzero(~drop)
        return take_points(sample, idx, "RandomDropout")


class ShufflePoints(_Repr):
    """Randomly permute the points."""

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        rng = _rng(rng)
        return take_points(sample, rng.permutation(_num_points(sample)), "ShufflePoints")


class FixedPoints(_Repr):
    """Resample an object to exactly ``n`` points: farthest point sampling, random or the first n.

    With fewer than ``n`` points every point is kept once and the rest are random repeats.
    FPS uses ``pcbench.ops.farthest_point_sample`` with a random start point.
    """

    def __init__(self, n: int = 1024, mode: str = "fps") -> None:
        if n <= 0:
            raise ValueError(f"n must be a positive number of points, got {n}")
        if mode not in ("fps", "random", "first"):
            raise ValueError(f"mode must be 'fps', 'random' or 'first', got {mode!r}")
        self.n, self.mode = n, mode

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        rng = _rng(rng)
        m = _num_points(sample)
        if m == 0:
            raise ValueError("FixedPoints got a sample with 0 points; drop empty samples when preparing")
        if m <= self.n:
            idx = np.concatenate([np.arange(m), rng.integers(0, m, self.n - m)])
        elif self.mode == "first":
            idx = np.arange(self.n)
        elif self.mode == "random":
            idx = np.sort(rng.permutation(m)[: self.n])
        else:
            import torch  # noqa: PLC0415

            from pcbench.ops import farthest_point_sample  # noqa: PLC0415

            xyz = torch.from_numpy(np.ascontiguousarray(sample["coord"], dtype=np.float32))
            idx = farthest_point_sample(xyz, n=self.n, start=int(rng.integers(m))).numpy()
        return take_points(sample, idx, "FixedPoints")


class SphereCrop(_Repr):
    """Keep at most ``max_points`` points nearest to a centre: a random point (``mode="random"``) or the
    bounding-box centre (``"center"``). Scenes larger than the budget become a ball-shaped crop."""

    def __init__(self, max_points: int = 80000, mode: str = "random") -> None:
        if max_points <= 0:
            raise ValueError(f"max_points must be positive, got {max_points}")
        if mode not in ("random", "center"):
            raise ValueError(f"mode must be 'random' or 'center', got {mode!r}")
        self.max_points, self.mode = max_points, mode

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        rng = _rng(rng)
        n = _num_points(sample)
        if n <= self.max_points:
            return sample
        c = np.asarray(sample["coord"], dtype=np.float64)
        centre = c[rng.integers(n)] if self.mode == "random" else (c.min(0) + c.max(0)) / 2
        d2 = ((c - centre) ** 2).sum(1)
        idx = np.sort(np.argpartition(d2, self.max_points - 1)[: self.max_points])
        return take_points(sample, idx, "SphereCrop")


class GridSample(_Repr):
    """Keep one point per voxel of size ``grid_size`` (``pcbench.ops.voxelize``) and record ``inverse``.

    ``mode="train"`` keeps a random point of each voxel, ``"test"`` the first one (deterministic). The
    kept points are ordered by voxel (lexicographic (i, j, k)), and ``inverse`` [n_full] gives for every
    input point the row of its voxel's kept point, so ``pred_full = pred[inverse]`` maps predictions
    back to full resolution. ``grid_coord`` [n,3] int64 holds the voxel indices of the kept points.
    """

    def __init__(self, grid_size: float = 0.02, mode: str = "train", return_inverse: bool = True) -> None:
        if not grid_size > 0:
            raise ValueError(f"grid_size must be > 0 (metres per voxel edge), got {grid_size}")
        if mode not in ("train", "test"):
            raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")
        self.grid_size, self.mode, self.return_inverse = grid_size, mode, return_inverse

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        rng = _rng(rng)
        import torch  # noqa: PLC0415

        from pcbench.ops import voxelize  # noqa: PLC0415

        n = _num_points(sample)
        coord = np.asarray(sample["coord"])
        voxels, inverse, counts = voxelize(torch.from_numpy(np.ascontiguousarray(coord)), self.grid_size)
        inv = inverse.numpy()
        starts = np.concatenate([[0], np.cumsum(counts.numpy())[:-1]]).astype(np.int64)
        # order points by voxel; a random permutation first makes the kept point of each voxel random
        pre = rng.permutation(n) if self.mode == "train" else np.arange(n)
        order = pre[np.argsort(inv[pre], kind="stable")]
        keep = order[starts] if n else np.zeros(0, np.int64)
        prev_inverse = sample.get("inverse")
        out = take_points({k: v for k, v in sample.items() if k != "inverse"}, keep, "GridSample")
        out["grid_coord"] = voxels[:, 1:].numpy()
        if self.return_inverse:
            # compose with an earlier map so that inverse always starts from the original points
            out["inverse"] = inv if prev_inverse is None else inv[np.asarray(prev_inverse)]
        return out


# --------------------------------------------------------------------------------------------- features
class BuildFeat(_Repr):
    """Concatenate per-point arrays (e.g. coord, normal, color) into ``feat`` [n, C] float32."""

    def __init__(self, keys: Sequence[str] = ("coord",)) -> None:
        if not keys:
            raise ValueError("keys must name at least one per-point array, e.g. ('coord', 'normal')")
        self.keys = tuple(keys)

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        rng = _rng(rng)
        parts = []
        n = _num_points(sample)
        for k in self.keys:
            if k not in sample:
                raise ValueError(f"BuildFeat key {k!r} not in sample (keys: {sorted(sample)}); "
                                 "drop it from feat_keys or prepare the dataset with it")
            a = np.asarray(sample[k], dtype=np.float32)
            parts.append(a.reshape(n, -1))
        return {**sample, "feat": np.concatenate(parts, axis=1) if parts else np.zeros((n, 0), np.float32)}
