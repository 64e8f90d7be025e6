"""pcbench.bench.stats against independent references: scipy.stats.bootstrap on the same resamples, the
normal-approximation intervals of a proportion, scikit-learn's balanced accuracy and pcbench.train.metrics."""

from __future__ import annotations

import hashlib
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats as sps
from sklearn.metrics import balanced_accuracy_score

from pcbench.bench import stats
from pcbench.bench.stats import (
    PAYLOAD_FILE,
    ResamplePayload,
    bootstrap_ci,
    load_payload,
    paired_bootstrap,
    rank_labels,
    save_payload,
    shared_ranks,
)
from pcbench.train.metrics import metrics_from_confusion


def _classifier(n: int, c: int, acc: float, seed: int, target: np.ndarray | None = None) -> ResamplePayload:
    """A classifier that is right on about ``acc`` of the samples and uniformly wrong elsewhere."""
    rng = np.random.default_rng(seed)
    t = rng.integers(0, c, n) if target is None else target
    wrong = (t + rng.integers(1, c, n)) % c
    return ResamplePayload.classification(t, np.where(rng.random(n) < acc, t, wrong), c)


def _scenes(n: int, c: int, seed: int) -> ResamplePayload:
    """Per-scene confusion matrices of a noisy segmenter; some classes are absent from some scenes."""
    rng = np.random.default_rng(seed)
    cm = rng.integers(0, 30, (n, c, c)) * (rng.random((n, c, c)) < 0.3)
    cm[:, np.arange(c), np.arange(c)] += rng.integers(0, 400, (n, c)) * (rng.random((n, c)) < 0.7)
    return ResamplePayload.segmentation(cm)


# ------------------------------------------------------------------------------------------- references

def test_oa_interval_equals_scipy_percentile_bootstrap_on_the_same_resamples() -> None:
    p = _classifier(500, 10, 0.8, seed=1)
    correct = (p.target == p.pred).astype(float)
    ref = sps.bootstrap((correct,), np.mean, n_resamples=999, method="percentile", confidence_level=0.95,
                        rng=np.random.default_rng(7))
    ci = bootstrap_ci(p, "oa", n_resamples=999, seed=7)
    assert ci.estimate == pytest.approx(correct.mean(), abs=1e-15)
    assert (ci.low, ci.high) == pytest.approx(tuple(ref.confidence_interval), abs=1e-12)
    assert ci.method.startswith("percentile bootstrap") and "999 resamples" in ci.method
    assert (ci.n_resamples, ci.n_items, ci.n_runs, ci.seed, ci.confidence) == (999, 500, 1, 7, 0.95)


def test_pooled_seed_macc_interval_equals_scipy_with_sklearn_balanced_accuracy() -> None:
    # Three seeds of one row, same split: the interval is of the seed-averaged balanced accuracy per resample.
    base = _classifier(300, 6, 0.7, seed=2)
    runs = [_classifier(300, 6, a, seed=s, target=base.target) for s, a in ((3, 0.6), (4, 0.7), (5, 0.8))]

    def statistic(t: np.ndarray, *preds: np.ndarray) -> float:
        with warnings.catch_warnings():  # a resample may miss a class that a prediction names
            warnings.simplefilter("ignore")
            return float(np.mean([balanced_accuracy_score(t, q) for q in preds]))

    ref = sps.bootstrap((base.target, *(r.pred for r in runs)), statistic, paired=True, vectorized=False,
                        n_resamples=200, method="percentile", rng=np.random.default_rng(11))
    ci = bootstrap_ci(runs, "macc", n_resamples=200, seed=11)
    assert ci.estimate == pytest.approx(statistic(base.target, *(r.pred for r in runs)), abs=1e-12)
    assert (ci.low, ci.high) == pytest.approx(tuple(ref.confidence_interval), abs=1e-12)
    assert ci.n_runs == 3 and "3 seed runs" in ci.method


@pytest.mark.parametrize("metric", ["oa", "macc", "miou"])
def test_segmentation_interval_equals_scipy_with_pcbench_train_metrics(metric: str) -> None:
    runs = [_scenes(40, 5, seed=s) for s in (0, 1)]
    cms = [torch.from_numpy(r.confusion) for r in runs]

    def statistic(idx: np.ndarray) -> float:
        vals = [metrics_from_confusion(cm[torch.from_numpy(idx)].sum(0))[metric] for cm in cms]
        return float(np.mean(vals))

    ref = sps.bootstrap((np.arange(40),), statistic, vectorized=False, n_resamples=150, method="percentile",
                        rng=np.random.default_rng(3))
    ci = bootstrap_ci(runs, metric, n_resamples=150, seed=3)
    assert ci.estimate == pytest.approx(statistic(np.arange(40)), abs=1e-12)
    assert (ci.low, ci.high) == pytest.approx(tuple(ref.confidence_interval), abs=1e-12)
    assert "40 test scenes" in ci.method


def test_oa_interval_matches_wald_and_wilson_for_a_large_proportion() -> None:
    n, k = 4000, 3400  # OA 0.85 exactly
    t = np.zeros(n, dtype=np.int64)
    pred = np.where(np.arange(n) < k, 0, 1)
    ci = bootstrap_ci(ResamplePayload.classification(t, pred, 2), "oa", n_resamples=4000, seed=0)
    p, z = k / n, 1.959963984540054
    half = z * math.sqrt(p * (1 - p) / n)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    wilson = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert ci.estimate == pytest.approx(0.85)
    for lo, hi in ((p - half, p + half), (centre - wilson, centre + wilson)):
        assert ci.low == pytest.approx(lo, abs=1e-3) and ci.high == pytest.approx(hi, abs=1e-3)
    assert ci.high - ci.low == pytest.approx(2 * half, rel=0.08)


def test_payload_metrics_match_pcbench_train_metrics_including_absent_classes() -> None:
    seg = _scenes(12, 6, seed=4)
    cm = seg.confusion.copy()
    cm[:, 5, :] = 0
    cm[:, :, 5] = 0  # class 5 never occurs: 0 in the all-classes means, left out of the *_present ones
    seg = ResamplePayload.segmentation(cm)
    ref = metrics_from_confusion(torch.from_numpy(cm.sum(0)))
    got = seg.metrics()
    names = ("oa", "macc", "miou", "macc_present", "miou_present")
    for m in names:
        assert got[m] == pytest.approx(ref[m], abs=1e-15)
    assert got["miou"] < got["miou_present"]
    cls = _classifier(200, 5, 0.6, seed=5)
    ref = metrics_from_confusion(torch.from_numpy(cls.confusion_matrix()))
    assert cls.metrics() == pytest.approx({m: ref[m] for m in names}, abs=1e-15)


# ------------------------------------------------------------------------------------------- paired comparisons

def test_identical_rows_give_half_probability_and_no_significance() -> None:
    a = [_classifier(800, 10, 0.9, seed=s) for s in (1, 2)]
    a = [ResamplePayload.classification(a[0].target, r.pred, 10) for r in a]
    c = paired_bootstrap(a, list(a), "oa")
    assert c.prob_a_better == 0.5 and not c.significant
    assert c.delta == 0 and c.low == 0 and c.high == 0
    seg = [_scenes(30, 4, seed=9)]
    c = paired_bootstrap(seg, seg, "miou")
    assert c.prob_a_better == 0.5 and not c.significant


def test_clearly_different_rows_are_significant_in_both_directions() -> None:
    t = _classifier(1000, 8, 1.0, seed=0).target
    good, bad = _classifier(1000, 8, 0.95, seed=1, target=t), _classifier(1000, 8, 0.80, seed=2, target=t)
    c = paired_bootstrap(good, bad, "oa")
    assert c.significant and c.prob_a_better == 1.0 and c.low > 0.1 and c.delta == pytest.approx(c.estimate_a - c.estimate_b)
    r = paired_bootstrap(bad, good, "oa")
    assert r.significant and r.prob_a_better == 0.0 and r.high < -0.1
    assert r.to_dict()["significant"] is True and r.to_dict()["n_resamples"] == 1000


def test_two_equally_good_independent_rows_are_not_significant() -> None:
    t = _classifier(1000, 8, 1.0, seed=0).target
    a, b = _classifier(1000, 8, 0.9, seed=3, target=t), _classifier(1000, 8, 0.9, seed=4, target=t)
    c = paired_bootstrap(a, b, "oa")
    assert not c.significant and 0.025 < c.prob_a_better < 0.975 and c.low < 0 < c.high


def test_pairing_detects_a_small_consistent_win_that_separate_intervals_cannot() -> None:
    # B and A agree everywhere except 15 of 2000 samples that only A gets right: a 0.75-point win that the
    # unpaired intervals (about +-1.5 points each) swallow but every paired resample shows.
    n = 2000
    t = np.zeros(n, dtype=np.int64)
    pred_b = np.where(np.arange(n) % 10 == 0, 1, 0)  # 200 wrong
    pred_a = pred_b.copy()
    pred_a[np.flatnonzero(pred_b == 1)[:15]] = 0
    a, b = ResamplePayload.classification(t, pred_a, 2), ResamplePayload.classification(t, pred_b, 2)
    ca, cb = bootstrap_ci(a), bootstrap_ci(b)
    assert ca.low < cb.high  # the separate intervals overlap
    c = paired_bootstrap(a, b)
    assert c.significant and c.prob_a_better == 1.0 and c.delta == pytest.approx(15 / n)


def test_shared_ranks_chains_non_significant_neighbours() -> None:
    assert shared_ranks([]) == ["1"]
    assert shared_ranks([True]) == ["1", "2"]
    assert shared_ranks([False]) == ["1-2", "1-2"]
    assert shared_ranks([True, False, False, True]) == ["1", "2-4", "2-4", "2-4", "5"]
    assert shared_ranks([False, True, False]) == ["1-2", "1-2", "3-4", "3-4"]


def test_rank_labels_share_the_rank_of_indistinguishable_rows() -> None:
    t = _classifier(1000, 8, 1.0, seed=0).target
    best = _classifier(1000, 8, 0.97, seed=1, target=t)
    mid1, mid2 = _classifier(1000, 8, 0.85, seed=2, target=t), _classifier(1000, 8, 0.85, seed=3, target=t)
    labels, comps = rank_labels([[best], [mid1, mid2], [mid2, mid1]], "oa")
    assert labels == ["1", "2-3", "2-3"]
    assert [c.significant for c in comps] == [True, False]
    assert comps[1].prob_a_better == 0.5  # the same two runs in another order: identical seed averages
    assert rank_labels([], "oa") == ([], [])
    assert rank_labels([[best]], "oa") == (["1"], [])


# ------------------------------------------------------------------------------------------- determinism, speed paths

def test_results_are_deterministic_for_a_seed_and_change_with_it() -> None:
    runs = [_scenes(50, 6, seed=s) for s in (1, 2, 3)]
    assert bootstrap_ci(runs, "miou", seed=5) == bootstrap_ci(runs, "miou", seed=5)
    assert bootstrap_ci(runs, "miou", seed=5) != bootstrap_ci(runs, "miou", seed=6)


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_chunked_resampling_gives_the_same_result(task: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if task == "classification":
        t = _classifier(300, 7, 1.0, seed=0).target
        a = [_classifier(300, 7, acc, seed=s, target=t) for s, acc in ((1, 0.7), (2, 0.8))]
        b = [_classifier(300, 7, 0.75, seed=3, target=t)]
    else:
        a, b = [_scenes(60, 5, seed=1), _scenes(60, 5, seed=2)], [_scenes(60, 5, seed=3)]
    whole = paired_bootstrap(a, b, "miou", n_resamples=300)
    monkeypatch.setattr(stats, "_CHUNK_DRAWS", 1)  # one resample per chunk
    assert paired_bootstrap(a, b, "miou", n_resamples=300) == whole


# ------------------------------------------------------------------------------------------- payload files

@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_payload_round_trip_returns_the_file_sha256(task: str, tmp_path: Path) -> None:
    p = _classifier(50, 4, 0.7, seed=1) if task == "classification" else _scenes(7, 3, seed=1)
    p = ResamplePayload(p.task, p.num_classes, target=p.target, pred=p.pred, confusion=p.confusion,
                        items=[f"item{i}" for i in range(p.n_items)])
    path = tmp_path / "run" / PAYLOAD_FILE
    sha = save_payload(path, p)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [q.name for q in path.parent.iterdir()] == [PAYLOAD_FILE]  # no temporary file left behind
    q = load_payload(path, sha256=sha)
    assert (q.task, q.num_classes, q.n_items) == (p.task, p.num_classes, p.n_items)
    for f in ("target", "pred", "confusion", "items"):
        x, y = getattr(p, f), getattr(q, f)
        assert (x is None and y is None) or np.array_equal(x, y)
    assert bootstrap_ci(q, "miou", n_resamples=50) == bootstrap_ci(p, "miou", n_resamples=50)


def test_payload_load_errors_name_the_file_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / PAYLOAD_FILE
    with pytest.raises(FileNotFoundError, match=r"resample_test\.npz does not exist; evaluate"):
        load_payload(path)
    sha = save_payload(path, _classifier(20, 3, 0.5, seed=0))
    with pytest.raises(ValueError, match=r"sha256 .* differs from the recorded 0+; the file changed"):
        load_payload(path, sha256="0" * 64)
    assert load_payload(path, sha256=sha).n_items == 20
    path.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"resample_test\.npz: not a readable npz file"):
        load_payload(path)
    np.savez(tmp_path / "other.npz", x=np.arange(3))
    with pytest.raises(ValueError, match=r"other\.npz: not a pcbench resample payload \(field 'format' missing\)"):
        load_payload(tmp_path / "other.npz")


def test_invalid_payloads_are_refused_with_the_field_named() -> None:
    with pytest.raises(ValueError, match=r"'pred' holds classes \[7\] outside \[0, 5\)"):
        ResamplePayload.classification([0, 1, 2], [0, 7, 2], 5)
    with pytest.raises(ValueError, match=r"'target' has 3 samples but 'pred' has 2"):
        ResamplePayload.classification([0, 1, 2], [0, 1], 5)
    with pytest.raises(ValueError, match=r"'confusion' must have 3 dimensions"):
        ResamplePayload.segmentation(np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"'confusion' has shape \[2, 3, 4\]"):
        ResamplePayload("segmentation", 3, confusion=np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match=r"'confusion' holds negative counts"):
        ResamplePayload.segmentation(-np.ones((2, 3, 3)))
    with pytest.raises(ValueError, match=r"'items' has shape \[2\]; expected \[3\]"):
        ResamplePayload.classification([0, 1, 2], [0, 1, 2], 3, items=["a", "b"])
    with pytest.raises(ValueError, match=r"task must be one of"):
        ResamplePayload("detection", 3)
    with pytest.raises(ValueError, match=r"no test items"):
        ResamplePayload.classification([], [], 3)


def test_rows_from_different_splits_are_refused() -> None:
    a = _classifier(100, 4, 0.8, seed=1)
    b = _classifier(100, 4, 0.8, seed=2)  # other targets: another split or another order
    with pytest.raises(ValueError, match=r"row b run 0 gives test sample \d+ class \d but row a run 0 gives"):
        paired_bootstrap(a, b)
    with pytest.raises(ValueError, match=r"row run 1 has 50 test items but row run 0 has 100"):
        bootstrap_ci([a, _classifier(50, 4, 0.8, seed=1)])
    named = [ResamplePayload.classification(a.target, a.pred, 4, items=[f"s{i}" for i in range(100)]),
             ResamplePayload.classification(a.target, a.pred, 4, items=[f"s{i}" for i in range(99)] + ["x"])]
    with pytest.raises(ValueError, match=r"row 2 run 0 names test item 99 'x' but row 1 run 0 names it 's99'"):
        rank_labels([[named[0]], [named[1]]])
    with pytest.raises(ValueError, match=r"segmentation payload with 3 classes but row a run 0 is classification"):
        paired_bootstrap(a, _scenes(100, 3, seed=0))


def test_bad_arguments_are_refused() -> None:
    p = _classifier(20, 3, 0.5, seed=0)
    with pytest.raises(ValueError, match=r"metric must be one of \('oa', 'macc', 'miou'\), got 'f1'"):
        bootstrap_ci(p, "f1")
    with pytest.raises(ValueError, match=r"n_resamples must be a positive integer, got 0"):
        bootstrap_ci(p, n_resamples=0)
    with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\), got 95"):
        bootstrap_ci(p, confidence=95)
    with pytest.raises(ValueError, match=r"row has no runs"):
        bootstrap_ci([])
