"""pcbench.train.metrics against scikit-learn's confusion_matrix / accuracy / balanced accuracy / jaccard."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, jaccard_score
from sklearn.metrics import confusion_matrix as sk_confusion

from pcbench.train.metrics import ConfusionMatrix, confusion_matrix, metrics_from_confusion


def _reference(pred: np.ndarray, target: np.ndarray, c: int, ignore: int) -> dict:
    keep = target != ignore
    p, t = pred[keep], target[keep]
    labels = list(range(c))
    iou0 = jaccard_score(t, p, labels=labels, average=None, zero_division=0)  # no support at all: 0
    iou = iou0.copy()
    iou[~(np.isin(np.arange(c), t) | np.isin(np.arange(c), p))] = np.nan  # ... reported as undefined per class
    present = np.isin(np.arange(c), t)
    recall = np.array([np.mean(p[t == k] == k) if present[k] else np.nan for k in range(c)])
    return {"cm": sk_confusion(t, p, labels=labels), "oa": accuracy_score(t, p),
            "macc": np.nan_to_num(recall).sum() / c, "miou": iou0.sum() / c,  # all classes (Pointcept)
            "macc_present": balanced_accuracy_score(t, p) if len(t) else np.nan,
            "miou_present": iou0[present].mean() if present.any() else np.nan,
            "iou": iou, "acc": recall, "present": int(present.sum())}


def _same(ours: list, ref: np.ndarray) -> None:
    a = np.array([np.nan if v is None else v for v in ours], dtype=float)
    np.testing.assert_allclose(a, ref, rtol=1e-12, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("seed", range(6))
def test_random_cases_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    c = int(rng.integers(2, 12))
    n = int(rng.integers(1, 500))
    target = rng.integers(-1, c, n)            # -1 = ignore
    pred = np.where(rng.random(n) < 0.6, np.maximum(target, 0), rng.integers(0, c, n))
    absent = rng.integers(0, c)                # one class never a target (still predicted sometimes)
    target[target == absent] = -1
    ref = _reference(pred, target, c, -1)
    cm = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), c, ignore_index=-1)
    np.testing.assert_array_equal(cm.numpy(), ref["cm"])
    m = metrics_from_confusion(cm)
    if ref["cm"].sum() == 0:
        assert m["oa"] is None
        return
    assert m["oa"] == pytest.approx(ref["oa"], abs=1e-12)
    for k in ("macc", "miou", "macc_present", "miou_present"):
        assert m[k] == pytest.approx(ref[k], abs=1e-12), k
    assert m["classes_present"] == ref["present"]
    _same(m["iou_per_class"], ref["iou"])
    _same(m["acc_per_class"], ref["acc"])
    assert m["acc_per_class"][absent] is None  # undefined, not 0


def test_absent_class_predicted_counts_as_zero_iou() -> None:
    # class 2 never occurs as a target but is predicted once: IoU 0 (it is in the union), accuracy undefined
    pred = torch.tensor([0, 1, 2, 1])
    target = torch.tensor([0, 1, 1, 1])
    m = metrics_from_confusion(confusion_matrix(pred, target, 4))
    assert m["iou_per_class"] == [1.0, pytest.approx(2 / 3), 0.0, None]
    assert m["acc_per_class"] == [1.0, pytest.approx(2 / 3), None, None]
    assert m["miou"] == pytest.approx((1 + 2 / 3 + 0 + 0) / 4)  # all 4 classes of the label set
    assert m["miou_present"] == pytest.approx((1 + 2 / 3) / 2)  # classes 0 and 1 are in the ground truth
    ref = jaccard_score(target.numpy(), pred.numpy(), labels=[0, 1, 2, 3], average=None, zero_division=0)
    _same(m["iou_per_class"][:3], ref[:3])


def test_all_ignored_gives_undefined_not_zero() -> None:
    m = metrics_from_confusion(confusion_matrix(torch.tensor([0, 1, 2]), torch.tensor([-1, -1, -1]), 3))
    assert m["oa"] is None and m["macc"] is None and m["miou"] is None and m["count"] == 0
    assert m["miou_present"] is None and m["macc_present"] is None and m["classes_present"] == 0
    assert m["iou_per_class"] == [None] * 3


def test_custom_ignore_index_and_accumulation() -> None:
    rng = np.random.default_rng(7)
    pred, target = rng.integers(0, 5, 300), rng.integers(0, 6, 300)  # 5 = ignore
    acc = ConfusionMatrix(5, ignore_index=5)
    for chunk in np.array_split(np.arange(300), 7):
        acc.update(torch.from_numpy(pred[chunk]), torch.from_numpy(target[chunk]))
    ref = _reference(pred, target, 5, 5)
    np.testing.assert_array_equal(acc.matrix.numpy(), ref["cm"])
    assert acc.compute()["miou"] == pytest.approx(ref["miou"], abs=1e-12)


def test_bad_labels_raise_naming_the_fix() -> None:
    with pytest.raises(ValueError, match=r"target holds labels \[7\] outside \[0, 5\)"):
        confusion_matrix(torch.tensor([0]), torch.tensor([7]), 5)
    with pytest.raises(ValueError, match="pred has shape"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0]), 5)


def test_absent_classes_hand_computed_both_conventions() -> None:
    # regression: miou averaged over classes in targets or predictions, so its denominator moved with false
    # positives. 6 classes; 3 and 5 never a target, 3 predicted once (a false positive), 5 never predicted.
    cm = torch.tensor([[8, 2, 0, 0, 0, 0],
                       [1, 3, 0, 0, 0, 0],
                       [0, 0, 5, 1, 0, 0],
                       [0, 0, 0, 0, 0, 0],
                       [0, 0, 0, 0, 4, 0],
                       [0, 0, 0, 0, 0, 0]])
    m = metrics_from_confusion(cm)
    iou = [8 / 11, 3 / 6, 5 / 6, 0.0, 1.0, None]  # union = row + column - diagonal
    acc = [8 / 10, 3 / 4, 5 / 6, None, 1.0, None]
    assert m["iou_per_class"] == [pytest.approx(v) if v is not None else None for v in iou]
    assert m["acc_per_class"] == [pytest.approx(v) if v is not None else None for v in acc]
    assert m["miou"] == pytest.approx((8 / 11 + 3 / 6 + 5 / 6 + 1) / 6)
    assert m["macc"] == pytest.approx((8 / 10 + 3 / 4 + 5 / 6 + 1) / 6)
    assert m["miou_present"] == pytest.approx((8 / 11 + 3 / 6 + 5 / 6 + 1) / 4)
    assert m["macc_present"] == pytest.approx((8 / 10 + 3 / 4 + 5 / 6 + 1) / 4)
    assert m["classes_present"] == 4 and m["oa"] == pytest.approx(20 / 24)
    # a false positive on an absent class changes no denominator: predicting class 5 instead of 4 once
    # lowers only class 4's IoU, under both conventions
    moved = cm.clone()
    moved[4, 4], moved[4, 5] = 3, 1
    m2 = metrics_from_confusion(moved)
    assert m2["miou"] == pytest.approx((8 / 11 + 3 / 6 + 5 / 6 + 3 / 4) / 6)
    assert m2["miou_present"] == pytest.approx((8 / 11 + 3 / 6 + 5 / 6 + 3 / 4) / 4)


def test_scannet200_like_split_without_train_only_classes() -> None:
    # 200 classes, 189 in the split's ground truth, predictions perfect: the published convention gives
    # 189/200, the present-class one 1.0 (the ~+2 points of the issue at 35 % come from this gap)
    target = torch.arange(189).repeat_interleave(3)
    m = metrics_from_confusion(confusion_matrix(target, target, 200))
    assert m["miou"] == pytest.approx(189 / 200) and m["macc"] == pytest.approx(189 / 200)
    assert m["miou_present"] == 1.0 and m["macc_present"] == 1.0 and m["classes_present"] == 189
