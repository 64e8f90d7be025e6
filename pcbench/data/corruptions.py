"""The seven ModelNet-C corruptions (Ren et al., "Benchmarking and Analyzing Point Cloud Classification under
Corruptions", ICML 2022, arXiv:2202.03377) and the mean corruption error relative to DGCNN.

pcbench regenerates the corruptions from the prepared test split; it does not read the released ModelNet-C h5
files (whose seed the official generator does not reproduce either: the readme of build_modelnetc in
github:jiawei-ren/ModelNet-C warns that its script uses a different random seed from the released data).
The definitions and parameters follow that repository's build_modelnetc/corrupt_utils.py (commit 0c82ce0c);
severities 1-5 here are its levels 0-4. Each kind, for a cloud ``points`` [N, 3]:

===========  ==========================================================================================
jitter       every coordinate + N(0, sigma^2), sigma = 0.01 * severity
drop_global  keep ``int(N * (1 - rate))`` uniformly chosen points, rate = 0.25, 0.375, 0.5, 0.625, 0.75
drop_local   drop 100 * severity points in C ~ U{1..7} clusters with multinomial sizes: per cluster pick a
             remaining point at random and drop its size-nearest remaining points (itself included)
add_global   append 10 * severity points uniform in the unit ball
add_local    append 100 * severity points in C ~ U{1..7} clusters with multinomial sizes around C distinct
             points of the cloud, each N(centre, sigma_i^2 I) with sigma_i ~ U(0.075, 0.125); an added point
             p with |p| > 1 becomes p / |p|^2 (inside the unit ball, as the official code does)
scale        multiply x, y, z by independent s ~ U(1/S, S), S = 1.6 + 0.1 * (severity - 1); then centre at
             the centroid and scale so that the farthest point has norm 1
rotate       points @ R with R = Rz(g) Ry(b) Rx(a), angles ~ U(-t, t), t = (pi / 6) * severity / 5
===========  ==========================================================================================

The point counts are absolute, as in the official code, and ModelNet-C applies them to 1024-point clouds
(:data:`MODELNET_C_POINTS`: the first 1024 points of each modelnet40_ply_hdf5_2048 test cloud); on clouds of
another size the same severity is a different fraction of the points. The official script also permutes the
points it keeps; here surviving points keep their input order and added points follow them (the cloud as a
set is the same; an order-dependent model would see a different order).

Mean corruption error: ``CE_k = (1 - OA_k) / (1 - OA_k(DGCNN))`` with OA_k the OA on corruption k averaged
over the five severities, and ``mCE`` its mean over the seven kinds (modelnetc_utils/modelnetc_utils/eval.py
of the same repository; DGCNN's mCE is 1 by construction).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from .transforms import NormalizeUnitSphere, rotation_matrix

__all__ = [
    "CORRUPTIONS", "DGCNN_MODELNET_C_CLEAN_OA", "DGCNN_MODELNET_C_ERROR", "DGCNN_MODELNET_C_OA",
    "MODELNET_C_POINTS", "OFFICIAL_NAMES", "SEVERITIES", "corrupt", "corruption_errors", "mce",
    "mean_corruption_error", "relative_mce",
]

#: pcbench's names of the seven corruptions, in the order of the paper's tables.
CORRUPTIONS = ("jitter", "drop_global", "drop_local", "add_global", "add_local", "scale", "rotate")
SEVERITIES = (1, 2, 3, 4, 5)
MODELNET_C_POINTS = 1024
#: file stem of each kind in the released ModelNet-C (``<stem>_<severity - 1>.h5``), for a preparer reading it.
OFFICIAL_NAMES = {"jitter": "jitter", "drop_global": "dropout_global", "drop_local": "dropout_local",
                  "add_global": "add_global", "add_local": "add_local", "scale": "scale", "rotate": "rotate"}

#: DGCNN's ModelNet-C OA per corruption (mean over the five severities), the reference of mCE: the DGCNN row
#: (mCE 1.000, clean OA 0.926) of the paper's benchmark table (Ren et al. 2022, arXiv:2202.03377), given
#: per corruption as ``DGCNN_OA`` in modelnetc_utils/modelnetc_utils/eval.py of github:jiawei-ren/ModelNet-C.
DGCNN_MODELNET_C_OA: dict[str, float] = {
    "jitter": 0.684, "drop_global": 0.752, "drop_local": 0.793, "add_global": 0.705, "add_local": 0.725,
    "scale": 0.906, "rotate": 0.785,
}
DGCNN_MODELNET_C_CLEAN_OA = 0.926
#: DGCNN's error rate (1 - OA) per corruption: the denominators of CE.
DGCNN_MODELNET_C_ERROR: dict[str, float] = {k: 1.0 - v for k, v in DGCNN_MODELNET_C_OA.items()}

# As corrupt_utils.py, which made the released data; the PointCloud-C details page prints 0.675 for level 4.
_DROP_GLOBAL_RATE = (0.25, 0.375, 0.5, 0.625, 0.75)
_SCALE_MAX = (1.6, 1.7, 1.8, 1.9, 2.0)
_MAX_CLUSTERS = 7  # np.random.randint(1, 8) in corrupt_utils.py
_SIGMA_LOCAL = (0.075, 0.125)


def _check(points: np.ndarray, kind: str, severity: int) -> np.ndarray:
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption kind {kind!r}; choose one of {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or severity not in SEVERITIES:
        raise ValueError(f"severity must be an integer 1-5 (ModelNet-C's levels), got {severity!r}")
    pts = np.asarray(points)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"points must have shape [N, 3] (xyz only: ModelNet-C corrupts coordinates), got "
                         f"{list(pts.shape)}; pass sample['coord']")
    if not np.issubdtype(pts.dtype, np.floating) and not np.issubdtype(pts.dtype, np.integer):
        raise ValueError(f"points must be numeric, got dtype {pts.dtype}")
    if not np.isfinite(pts).all():
        raise ValueError("points hold NaN or inf coordinates; corrupt a finite cloud")
    need = {"drop_local": 100 * severity + 1, "add_local": _MAX_CLUSTERS, "drop_global": 4}.get(kind, 1)
    if len(pts) < need:
        raise ValueError(f"{kind} at severity {severity} needs a cloud of at least {need} points, got {len(pts)} "
                         f"(ModelNet-C uses {MODELNET_C_POINTS})")
    return pts


def _rng(seed: int | Sequence[int], kind: str, severity: int) -> np.random.Generator:
    seq = [seed] if np.ndim(seed) == 0 else list(seed)
    if not seq or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in seq):
        raise ValueError(f"seed must be a non-negative integer or a sequence of them, got {seed!r}")
    # kind and severity join the entropy so every (kind, severity) of one sample draws an independent stream.
    return np.random.default_rng([*(int(s) for s in seq), CORRUPTIONS.index(kind), int(severity)])


def _cluster_sizes(total: int, rng: np.random.Generator) -> np.ndarray:
    """Sizes of 1-7 clusters summing to ``total``: each point joins a uniformly chosen cluster."""
    k = int(rng.integers(1, _MAX_CLUSTERS + 1))
    return rng.multinomial(total, np.full(k, 1.0 / k))


def _drop_local(points: np.ndarray, total: int, rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """Keep mask [N] and, per cluster, the indices it dropped (the centre first)."""
    keep = np.ones(len(points), dtype=bool)
    clusters = []
    for size in _cluster_sizes(total, rng):
        alive = np.flatnonzero(keep)
        centre = alive[rng.integers(len(alive))]
        d2 = ((points[alive] - points[centre]) ** 2).sum(1)
        gone = alive[np.argsort(d2, kind="stable")[:size]]  # the centre (distance 0) comes first
        keep[gone] = False
        clusters.append(gone)
    return keep, clusters


def _add_local(points: np.ndarray, total: int,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The added points [total, 3], the cluster of each and the clusters' centres (indices into points)."""
    sizes = _cluster_sizes(total, rng)
    centres = rng.choice(len(points), size=len(sizes), replace=False)
    sigma = rng.uniform(*_SIGMA_LOCAL, size=len(sizes))
    which = np.repeat(np.arange(len(sizes)), sizes)
    added = points[centres][which] + sigma[which, None] * rng.standard_normal((total, 3))
    r2 = (added ** 2).sum(1, keepdims=True)
    added = np.where(r2 > 1.0, added / np.maximum(r2, 1.0), added)  # corrupt_utils.py divides by |p|^2
    return added, which, centres


def _in_unit_ball(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` points uniform in the unit ball (radius U^(1/3), uniform direction)."""
    r = rng.uniform(0.0, 1.0, n) ** (1.0 / 3.0)
    cos_t = rng.uniform(-1.0, 1.0, n)
    phi = rng.uniform(0.0, 2.0 * math.pi, n)
    sin_t = np.sqrt(1.0 - cos_t ** 2)
    return np.stack([r * sin_t * np.cos(phi), r * sin_t * np.sin(phi), r * cos_t], axis=1)


def corrupt(points: np.ndarray, kind: str, severity: int, seed: int | Sequence[int]) -> np.ndarray:
    """Apply ModelNet-C corruption ``kind`` at ``severity`` (1-5) to ``points`` [N, 3]; returns [M, 3].

    M = N except for drop_* (fewer points: survivors in input order) and add_* (the added points follow the
    input points). The result is a function of (points, kind, severity, seed): pass e.g. ``seed=(base_seed,
    sample_index)`` to corrupt each sample of a split with its own reproducible draw. The output dtype is the
    input's floating dtype (float64 for integer input). See the module docstring for each definition.
    """
    pts = _check(points, kind, severity)
    rng = _rng(seed, kind, severity)
    x = pts.astype(np.float64)
    dtype = pts.dtype if np.issubdtype(pts.dtype, np.floating) else np.float64
    severity = int(severity)
    i = severity - 1
    if kind == "jitter":
        out = x + 0.01 * severity * rng.standard_normal(x.shape)
    elif kind == "drop_global":
        n_keep = int(len(x) * (1.0 - _DROP_GLOBAL_RATE[i]))
        out = x[np.sort(rng.permutation(len(x))[:n_keep])]
    elif kind == "drop_local":
        out = x[_drop_local(x, 100 * severity, rng)[0]]
    elif kind == "add_global":
        out = np.concatenate([x, _in_unit_ball(10 * severity, rng)])
    elif kind == "add_local":
        out = np.concatenate([x, _add_local(x, 100 * severity, rng)[0]])
    elif kind == "scale":
        s = _SCALE_MAX[i]
        out = NormalizeUnitSphere()({"coord": x * rng.uniform(1.0 / s, s, size=3)})["coord"]
    else:  # rotate
        a, b, g = rng.uniform(-math.pi / 6 * severity / 5, math.pi / 6 * severity / 5, size=3)
        r = rotation_matrix([0, 0, 1], g) @ rotation_matrix([0, 1, 0], b) @ rotation_matrix([1, 0, 0], a)
        out = x @ r
    return out.astype(dtype, copy=False)


def _mean_oa(oa: Mapping[str, float | Sequence[float]]) -> dict[str, float]:
    """OA per kind, averaging a per-severity list; every one of the seven kinds must be given."""
    missing = [k for k in CORRUPTIONS if k not in oa]
    extra = [k for k in oa if k not in CORRUPTIONS]
    if missing or extra:
        raise ValueError(f"corruption OA must give exactly the kinds {', '.join(CORRUPTIONS)}; missing "
                         f"{missing}, unknown {extra}")
    out = {}
    for k in CORRUPTIONS:
        v = np.asarray(oa[k], dtype=np.float64).reshape(-1)
        if v.size not in (1, len(SEVERITIES)):
            raise ValueError(f"OA of {k!r} must be one number or one per severity ({len(SEVERITIES)}), got "
                             f"{v.size} values")
        if not (np.isfinite(v).all() and (v >= 0).all() and (v <= 1).all()):
            raise ValueError(f"OA of {k!r} must be fractions in [0, 1], got {v.tolist()} (not percentages)")
        out[k] = float(v.mean())
    return out


def corruption_errors(oa: Mapping[str, float | Sequence[float]],
                      reference: Mapping[str, float] | None = None) -> dict[str, float]:
    """CE per kind: (1 - OA_k) / reference error of k (DGCNN's by default); OA_k may list the 5 severities."""
    ref = DGCNN_MODELNET_C_ERROR if reference is None else reference
    mean = _mean_oa(oa)
    bad = [k for k in CORRUPTIONS if not (k in ref and 0 < ref[k] <= 1)]
    if bad:
        raise ValueError(f"the reference must give an error rate in (0, 1] for every kind; missing or invalid: {bad}")
    return {k: (1.0 - mean[k]) / ref[k] for k in CORRUPTIONS}


def mce(oa: Mapping[str, float | Sequence[float]], reference: Mapping[str, float] | None = None) -> float:
    """Mean corruption error (mCE): the mean over the seven kinds of :func:`corruption_errors` (DGCNN = 1).

    Unlike the official eval.py, OA is not rounded to three decimals first (rounding is left to the display).
    """
    return float(np.mean(list(corruption_errors(oa, reference).values())))


def mean_corruption_error(oa: Mapping[str, float | Sequence[float]]) -> float:
    """Unnormalised mean error rate, 1 - OA, over the seven kinds (and their severities), no reference model."""
    return float(np.mean([1.0 - v for v in _mean_oa(oa).values()]))


def relative_mce(oa: Mapping[str, float | Sequence[float]], clean_oa: float) -> float:
    """Relative mCE (RmCE): mean over kinds of (clean OA - OA_k) / (DGCNN clean OA - DGCNN OA_k)."""
    if not 0 <= clean_oa <= 1:
        raise ValueError(f"clean_oa must be a fraction in [0, 1], got {clean_oa!r}")
    mean = _mean_oa(oa)
    return float(np.mean([(clean_oa - mean[k]) / (DGCNN_MODELNET_C_CLEAN_OA - DGCNN_MODELNET_C_OA[k])
                          for k in CORRUPTIONS]))
