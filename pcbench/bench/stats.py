"""Uncertainty of a leaderboard score: bootstrap confidence intervals and paired comparisons over test items.

A run keeps what a resampling needs in a small payload (``<run dir>/resample_test.npz``, :data:`PAYLOAD_FILE`;
the container and its reader / writer live in pcbench/train/resample.py, which the trainer writes with):

* classification: per test sample its true class and predicted class (correctness is ``pred == target``);
* segmentation: one confusion matrix per test scene (``confusion[i, t, p]`` = points of scene ``i`` with true
  class ``t`` predicted as ``p``).

The statistics resample *items* (samples or scenes) with replacement, never points: the points of one scene
are not independent draws. Metrics are those of :mod:`pcbench.train.metrics` (the same definitions, recomputed
here in numpy so that the report side never needs torch): ``oa`` = trace / total, ``macc`` / ``miou`` = mean recall /
IoU over all classes of the label set, a class absent from the targets counting 0.

A leaderboard row is one configuration identity whose seeds are its runs. Its interval pools them so:
every resample draws one multiset of item indices and applies it to every seed's payload (the seeds evaluated
the same split); the metric of each seed on that resample is averaged over the seeds, like the row's headline
mean. The percentile interval of that average is the row's confidence interval. It measures how much the
score depends on which test items happened to be in the split; the spread over seeds (training noise) is the
row's ``std`` and is reported beside it, not folded in.

A paired comparison of two rows uses the same draws for both, so the difference of the two averages per
resample is the paired bootstrap distribution of the difference: its percentile interval excluding 0 makes the
difference significant, and the share of resamples where the upper row wins is the probability that it is
better. All randomness comes from ``numpy.random.default_rng(seed)``: a result is reproducible from its seed,
and the draws are those of ``scipy.stats.bootstrap(..., paired=True, rng=default_rng(seed))`` (the tests check
the interval against it on the same resamples).

Public API: :class:`ResamplePayload`, :func:`save_payload`, :func:`load_payload`, :func:`bootstrap_ci` ->
:class:`BootstrapCI`, :func:`paired_bootstrap` -> :class:`PairedComparison`, :func:`shared_ranks`,
:func:`rank_labels`. numpy only (no torch, no scipy) so the store and the report import it cheaply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pcbench.train.resample import (  # the payload is written by the trainer; re-exported here
    PAYLOAD_FILE,
    PAYLOAD_FORMAT,
    TASKS,
    ResamplePayload,
    _metrics,
    load_payload,
    save_payload,
)

__all__ = [
    "DEFAULT_RESAMPLES", "METRICS", "PAYLOAD_FILE", "PAYLOAD_FORMAT", "TASKS", "BootstrapCI", "PairedComparison",
    "ResamplePayload", "bootstrap_ci", "load_payload", "paired_bootstrap", "rank_labels", "save_payload",
    "shared_ranks",
]

METRICS = ("oa", "macc", "miou")
DEFAULT_RESAMPLES = 1000
METHOD = "percentile bootstrap"
# Resamples are processed in chunks of about this many drawn indices, so memory stays bounded for large splits
# (the draws, and so the result, do not depend on the chunking: numpy's generator yields the same sequence).
_CHUNK_DRAWS = 2_000_000
_TIE = 1e-12  # metrics are fractions in [0, 1]; float error of their means is ~1e-16


# ---------------------------------------------------------------------------------------------------------------
# metrics over many resamples at once (_metrics: pcbench/train/resample.py, shared with ResamplePayload.metrics)

def _as_runs(runs: ResamplePayload | Sequence[ResamplePayload], what: str) -> list[ResamplePayload]:
    runs = [runs] if isinstance(runs, ResamplePayload) else list(runs)
    if not runs:
        raise ValueError(f"{what} has no runs; pass the payloads of the row's seeds")
    for r in runs:
        if not isinstance(r, ResamplePayload):
            raise TypeError(f"{what} holds a {type(r).__name__}; expected ResamplePayload (see load_payload)")
    return runs


def _check_same_split(rows: list[list[ResamplePayload]], names: list[str]) -> None:
    """Every payload must describe the same test items in the same order (else pairing is meaningless)."""
    ref, ref_name = rows[0][0], f"{names[0]} run 0"
    for row, name in zip(rows, names, strict=True):
        for j, p in enumerate(row):
            where = f"{name} run {j}"
            if (p.task, p.num_classes) != (ref.task, ref.num_classes):
                raise ValueError(f"{where} is a {p.task} payload with {p.num_classes} classes but {ref_name} is "
                                 f"{ref.task} with {ref.num_classes}; compare runs of one dataset and task only")
            if p.n_items != ref.n_items:
                raise ValueError(f"{where} has {p.n_items} test items but {ref_name} has {ref.n_items}; the runs "
                                 f"must be evaluated on the same split")
            if p.items is not None and ref.items is not None and not np.array_equal(p.items, ref.items):
                k = int(np.flatnonzero(p.items != ref.items)[0])
                raise ValueError(f"{where} names test item {k} {str(p.items[k])!r} but {ref_name} names it "
                                 f"{str(ref.items[k])!r}; the runs must list the same split in the same order")
            if p.task == "classification" and not np.array_equal(p.target, ref.target):
                k = int(np.flatnonzero(p.target != ref.target)[0])
                raise ValueError(f"{where} gives test sample {k} class {p.target[k]} but {ref_name} gives "
                                 f"{ref.target[k]}; the runs must be evaluated on the same split in the same order")


def _distribution(rows: list[list[ResamplePayload]], metric: str, n_resamples: int,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the seed-averaged metric on the full split [R] and on every resample [R, B] (same draws for all)."""
    n, c = rows[0][0].n_items, rows[0][0].num_classes
    flat = [p for row in rows for p in row]
    owner = np.repeat(np.arange(len(rows)), [len(row) for row in rows])  # which row each run belongs to
    size = np.bincount(owner).astype(np.float64)

    def row_mean(per_run: np.ndarray) -> np.ndarray:  # [runs, ...] -> [rows, ...]
        out = np.zeros((len(rows),) + per_run.shape[1:])
        np.add.at(out, owner, per_run)
        return out / size.reshape((-1,) + (1,) * (per_run.ndim - 1))

    full = np.array([p.metrics()[metric] for p in flat])
    if flat[0].task == "classification":
        cells = np.stack([p.target * c + p.pred for p in flat])  # [runs, n]: each sample's confusion cell
        dense = None
    else:
        cells = None
        parts = []
        for p in flat:
            cm = p.confusion.astype(np.float64)
            parts.append(np.concatenate([np.diagonal(cm, axis1=1, axis2=2), cm.sum(2), cm.sum(1)], axis=1))
        dense = np.concatenate(parts, axis=1)  # [n, runs * 3C]: tp | target counts | prediction counts per run

    rng = np.random.default_rng(seed)
    per_resample = len(flat) * max(n, c * c) if cells is not None else max(n, len(flat) * 3 * c)
    chunk = max(1, _CHUNK_DRAWS // per_resample)
    dist = np.empty((len(rows), n_resamples))
    for start in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - start)
        idx = rng.integers(0, n, (b, n))  # same call as scipy.stats.bootstrap, hence the same draws
        if cells is not None:
            # Resampled confusion matrices by one bincount: key = (resample, run, cell).
            k = len(flat)
            base = (np.arange(b)[:, None, None] * k + np.arange(k)[None, :, None]) * (c * c)
            keys = base + cells[:, idx].transpose(1, 0, 2)  # [b, runs, n]
            cm = np.bincount(keys.ravel(), minlength=b * k * c * c).reshape(b, k, c, c).astype(np.float64)
            tp, tgt, prd = np.diagonal(cm, axis1=2, axis2=3), cm.sum(3), cm.sum(2)
        else:
            # Multiplicity of each scene in each resample, then one matrix product sums the scenes' counts.
            w = np.bincount((np.arange(b)[:, None] * n + idx).ravel(), minlength=b * n).reshape(b, n)
            s = (w.astype(np.float64) @ dense).reshape(b, len(flat), 3, c)
            tp, tgt, prd = s[:, :, 0], s[:, :, 1], s[:, :, 2]
        per_run = _metrics(tp, tgt, prd)[metric]  # [b, runs]
        dist[:, start:start + b] = row_mean(per_run.T)
    return row_mean(full), dist


def _validate(metric: str, n_resamples: int, confidence: float, seed: int) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if int(n_resamples) != n_resamples or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples!r} (1000 is the default)")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r} (0.95 for a 95 % interval)")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _percentiles(dist: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2.0
    finite = dist[np.isfinite(dist)]
    if finite.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(finite, [alpha, 1.0 - alpha])  # linear interpolation, as scipy.stats.bootstrap
    return float(lo), float(hi)


def _describe(n_resamples: int, n_items: int, task: str, runs: str, paired: bool) -> str:
    unit = "samples" if task == "classification" else "scenes"
    both = " and for both rows" if paired else ""
    return (f"{METHOD}: {n_resamples} resamples of the {n_items} test {unit} drawn with replacement (the same draws "
            f"for every seed{both}); per resample the metric is averaged over the {runs}")


@dataclass(frozen=True)
class BootstrapCI:
    """A row's score with its bootstrap interval; ``method`` and ``n_resamples`` say how it was made."""

    metric: str
    estimate: float  # the metric averaged over the row's runs, on the full split
    low: float
    high: float
    confidence: float
    n_resamples: int
    n_items: int
    n_runs: int
    seed: int
    method: str

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON (the results store and the report)."""
        return asdict(self)


@dataclass(frozen=True)
class PairedComparison:
    """Row A against row B on the same resampled test items: difference, its interval and P(A better)."""

    metric: str
    estimate_a: float
    estimate_b: float
    delta: float  # estimate_a - estimate_b
    low: float  # interval of the difference
    high: float
    prob_a_better: float  # share of resamples where A beats B (ties count half)
    significant: bool  # the difference's interval excludes 0
    confidence: float
    n_resamples: int
    n_items: int
    seed: int
    method: str

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON (the results store and the report)."""
        return asdict(self)


def bootstrap_ci(runs: ResamplePayload | Sequence[ResamplePayload], metric: str = "oa", *,
                 n_resamples: int = DEFAULT_RESAMPLES, confidence: float = 0.95, seed: int = 0) -> BootstrapCI:
    """Percentile bootstrap interval of ``metric`` over test items for one row (its seeds' payloads pooled).

    Each resample draws n item indices with replacement (``default_rng(seed).integers(0, n, n)`` per resample) and
    applies the same draw to every run; the row's value on it is the metric averaged over the runs. ``low`` and
    ``high`` are the (1 - confidence)/2 and (1 + confidence)/2 quantiles of those values.
    """
    _validate(metric, n_resamples, confidence, seed)
    row = _as_runs(runs, "row")
    _check_same_split([row], ["row"])
    est, dist = _distribution([row], metric, int(n_resamples), int(seed))
    lo, hi = _percentiles(dist[0], confidence)
    runs_text = f"row's {len(row)} seed runs" if len(row) > 1 else "row's single run"
    return BootstrapCI(metric, float(est[0]), lo, hi, float(confidence), int(n_resamples), row[0].n_items, len(row),
                       int(seed), _describe(int(n_resamples), row[0].n_items, row[0].task, runs_text, False))


def _paired(metric: str, est: np.ndarray, dist: np.ndarray, i: int, j: int, confidence: float, n_resamples: int,
            n_items: int, seed: int, method: str) -> PairedComparison:
    delta = dist[i] - dist[j]
    lo, hi = _percentiles(delta, confidence)
    ok = np.isfinite(delta)
    # Exact ties (2 seeds of 0.5 against 3 seeds averaging 0.5) come out of the float means a few ulps apart:
    # a difference this small is a tie, counted half, and never makes a difference significant.
    d = np.where(np.abs(delta[ok]) <= _TIE, 0.0, delta[ok])
    p = float(((d > 0).sum() + 0.5 * (d == 0).sum()) / max(int(ok.sum()), 1))
    significant = bool(lo > _TIE or hi < -_TIE)
    return PairedComparison(metric, float(est[i]), float(est[j]), float(est[i] - est[j]), lo, hi, p, significant,
                            float(confidence), n_resamples, n_items, seed, method)


def paired_bootstrap(a: ResamplePayload | Sequence[ResamplePayload], b: ResamplePayload | Sequence[ResamplePayload],
                     metric: str = "oa", *, n_resamples: int = DEFAULT_RESAMPLES, confidence: float = 0.95,
                     seed: int = 0) -> PairedComparison:
    """Paired bootstrap of row ``a`` against row ``b`` on the same split: P(a better) and 95 % significance.

    Both rows are evaluated on the same resampled test items; ``delta`` per resample is a's seed-averaged metric
    minus b's. ``significant`` is True when the ``confidence`` percentile interval of delta excludes 0 (a
    two-sided test at 1 - confidence); ``prob_a_better`` is the share of resamples with delta > 0 (ties half).
    """
    _validate(metric, n_resamples, confidence, seed)
    rows = [_as_runs(a, "row a"), _as_runs(b, "row b")]
    _check_same_split(rows, ["row a", "row b"])
    est, dist = _distribution(rows, metric, int(n_resamples), int(seed))
    method = _describe(int(n_resamples), rows[0][0].n_items, rows[0][0].task, "seed runs of each row", True)
    return _paired(metric, est, dist, 0, 1, confidence, int(n_resamples), rows[0][0].n_items, int(seed), method)


def shared_ranks(significant: Sequence[bool]) -> list[str]:
    """Rank labels for rows ranked best first, from ``significant[i]`` = row i differs from row i+1.

    Rows joined by a chain of non-significant adjacent differences share one label spanning the chain:
    ``[True, False, False, True]`` (5 rows) -> ``["1", "2-4", "2-4", "2-4", "5"]``; no flags (one row) -> ``["1"]``.
    """
    flags = [bool(s) for s in significant]
    labels: list[str] = []
    start = 0
    for i in range(len(flags) + 1):
        if i == len(flags) or flags[i]:
            label = str(start + 1) if i == start else f"{start + 1}-{i + 1}"
            labels.extend([label] * (i - start + 1))
            start = i + 1
    return labels


def rank_labels(rows: Sequence[ResamplePayload | Sequence[ResamplePayload]], metric: str = "oa", *,
                n_resamples: int = DEFAULT_RESAMPLES, confidence: float = 0.95,
                seed: int = 0) -> tuple[list[str], list[PairedComparison]]:
    """Shared rank labels for rows ranked best first, and the paired comparison of each row with the next.

    ``rows[i]`` holds the payloads of row i's seeds; all rows share the split. Every comparison uses the same
    resamples. Returns ``(labels, comparisons)`` with ``comparisons[i]`` = row i against row i+1 and
    ``labels`` = :func:`shared_ranks` of their ``significant`` flags.
    """
    _validate(metric, n_resamples, confidence, seed)
    if not rows:
        return [], []
    runs = [_as_runs(r, f"row {i + 1}") for i, r in enumerate(rows)]
    names = [f"row {i + 1}" for i in range(len(runs))]
    _check_same_split(runs, names)
    est, dist = _distribution(runs, metric, int(n_resamples), int(seed))
    method = _describe(int(n_resamples), runs[0][0].n_items, runs[0][0].task, "seed runs of each row", True)
    comps = [_paired(metric, est, dist, i, i + 1, confidence, int(n_resamples), runs[0][0].n_items, int(seed),
                     method) for i in range(len(runs) - 1)]
    return shared_ranks([c.significant for c in comps]), comps
