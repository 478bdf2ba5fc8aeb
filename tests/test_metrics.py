"""finegym_store.metrics: hand-computed cases, the documented edge cases
(ties, absent classes, unlabelled and empty input), and agreement with
scikit-learn (a test dependency) on random cases."""

from __future__ import annotations

import warnings
from fractions import Fraction

import numpy as np
import pytest

from conftest import require

from finegym_store import metrics
from finegym_store.metrics import (
    confusion_matrix,
    mean_class_accuracy,
    per_class_accuracy,
    top1_accuracy,
    topk_accuracy,
)


# -- hand-computed ----------------------------------------------------------

LABELS = np.array([0, 0, 1, 1, 1, 2])
PREDS = np.array([0, 1, 1, 1, 0, 0])


def test_top1_hand_computed():
    # correct at positions 0, 2, 3: 3 of 6
    assert top1_accuracy(LABELS, PREDS) == 0.5


def test_mean_class_accuracy_hand_computed():
    # class 0: 1 of 2, class 1: 2 of 3, class 2: 0 of 1 -> (1/2 + 2/3 + 0) / 3 = 7/18
    expected = float((Fraction(1, 2) + Fraction(2, 3) + Fraction(0)) / 3)
    assert mean_class_accuracy(LABELS, PREDS) == pytest.approx(expected, abs=1e-15)
    classes, recall, support = per_class_accuracy(LABELS, PREDS)
    assert classes.tolist() == [0, 1, 2]
    assert recall.tolist() == pytest.approx([0.5, 2 / 3, 0.0])
    assert support.tolist() == [2, 3, 1]


def test_mean_class_accuracy_differs_from_top1_on_imbalance():
    # 9 instances of class 0 all right, 1 of class 1 wrong: top-1 0.9, MCA 0.5
    y = np.array([0] * 9 + [1])
    p = np.zeros(10, dtype=np.int64)
    assert top1_accuracy(y, p) == pytest.approx(0.9)
    assert mean_class_accuracy(y, p) == 0.5


def test_class_absent_from_predictions_counts_zero_and_predicted_only_class_is_ignored():
    y = np.array([0, 1, 2, 2])
    p = np.array([0, 1, 7, 7])  # class 2 never predicted; class 7 not in labels
    assert mean_class_accuracy(y, p) == pytest.approx((1 + 1 + 0) / 3)
    assert top1_accuracy(y, p) == 0.5
    classes, recall, _ = per_class_accuracy(y, p)
    assert 7 not in classes.tolist()


def test_classes_absent_from_labels_do_not_count_in_mean():
    # only classes 3 and 5 are present; MCA averages those two alone
    y = np.array([3, 3, 5])
    p = np.array([3, 0, 5])
    assert mean_class_accuracy(y, p) == pytest.approx((0.5 + 1.0) / 2)


def test_scores_argmax_and_ties_go_to_lowest_class():
    scores = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [3.0, 3.0, 3.0], [0.0, 0.0, 5.0]])
    assert metrics.as_predictions(scores).tolist() == [0, 1, 0, 2]
    y = np.array([0, 2, 0, 2])
    # predictions 0, 1, 0, 2: right, wrong (tie 1/2 goes to 1), right, right
    assert top1_accuracy(y, scores) == 0.75
    assert mean_class_accuracy(y, scores) == pytest.approx((1.0 + 0.5) / 2)
    assert top1_accuracy(y, scores) == top1_accuracy(y, metrics.as_predictions(scores))


def test_topk_hand_computed_with_ties():
    s = np.array([[0.1, 0.5, 0.5, 0.2]])
    # label 1: nothing higher, no lower id tied -> rank 0
    assert topk_accuracy([1], s, 1) == 1.0
    # label 2: class 1 ties and has the lower id -> rank 1
    assert topk_accuracy([2], s, 1) == 0.0
    assert topk_accuracy([2], s, 2) == 1.0
    # label 0: three classes score higher -> rank 3
    assert topk_accuracy([0], s, 3) == 0.0
    assert topk_accuracy([0], s, 4) == 1.0
    assert topk_accuracy([0], s, 100) == 1.0


def test_topk_1_equals_top1_with_ties():
    rng = np.random.default_rng(3)
    s = rng.integers(0, 3, (200, 5)).astype(np.float32)  # many ties
    y = rng.integers(0, 5, 200)
    assert topk_accuracy(y, s, 1) == top1_accuracy(y, s)


def test_confusion_matrix_hand_computed():
    cm = confusion_matrix([0, 0, 1, 2], [0, 1, 1, 0])
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]
    assert cm.dtype == np.int64
    # num_classes pads with zero rows and columns
    assert confusion_matrix([0, 1], [1, 1], num_classes=4).tolist() == [
        [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    # scores: the size follows the score columns
    assert confusion_matrix([0], np.array([[0.0, 1.0, 0.0, 0.0, 0.0]])).shape == (5, 5)


# -- refusals ----------------------------------------------------------------


@pytest.mark.parametrize("fn", [top1_accuracy, mean_class_accuracy, confusion_matrix])
def test_unlabelled_is_refused(fn):
    with pytest.raises(ValueError, match=r"labels\[1\] is -1.*unlabelled"):
        fn([0, -1, 1], [0, 0, 1])


def test_topk_unlabelled_is_refused():
    with pytest.raises(ValueError, match="unlabelled"):
        topk_accuracy([0, -1], np.zeros((2, 3)), 1)


@pytest.mark.parametrize("fn", [top1_accuracy, mean_class_accuracy, confusion_matrix])
def test_empty_is_refused(fn):
    with pytest.raises(ValueError, match="empty"):
        fn(np.zeros(0, np.int64), np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="empty"):
        fn(np.zeros(0, np.int64), np.zeros((0, 4)))


def test_bad_shapes_and_types_are_refused():
    with pytest.raises(ValueError, match="3 entries but labels has 2"):
        top1_accuracy([0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="3 rows but labels has 2"):
        top1_accuracy([0, 1], np.zeros((3, 2)))
    with pytest.raises(ValueError, match="integer class ids, got dtype float64"):
        top1_accuracy([0, 1], np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="labels must be integer"):
        top1_accuracy(np.array([0.0, 1.0]), [0, 1])
    with pytest.raises(ValueError, match="labels must be 1-D"):
        top1_accuracy(np.zeros((2, 2), np.int64), [0, 1])
    with pytest.raises(ValueError, match="NaN or infinite"):
        top1_accuracy([0, 1], np.array([[0.0, 1.0], [np.nan, 0.0]]))
    with pytest.raises(ValueError, match="labels go up to 5 but the scores have only 3"):
        top1_accuracy([0, 5], np.zeros((2, 3)))
    with pytest.raises(ValueError, match="class ids >= 0"):
        top1_accuracy([0, 1], [0, -1])
    with pytest.raises(ValueError, match="k must be at least 1, got 0"):
        topk_accuracy([0], np.zeros((1, 3)), 0)
    with pytest.raises(ValueError, match="num_classes is 2 but labels contain class id 2"):
        confusion_matrix([0, 2], [0, 1], num_classes=2)
    with pytest.raises(ValueError, match="num_classes is 2 but predictions contain class id 3"):
        confusion_matrix([0, 1], [0, 3], num_classes=2)
    with pytest.raises(ValueError, match="refused"):
        confusion_matrix([0, 2**31 - 1], [0, 1])  # would be a 2**62-cell matrix


@pytest.mark.parametrize("fn", [top1_accuracy, mean_class_accuracy, per_class_accuracy, confusion_matrix])
def test_ids_beyond_int64_are_refused_not_wrapped(fn):
    # uint64 2**63 would become -2**63 as int64; 2**64 is an object array.
    with pytest.raises(ValueError, match=r"labels\[1\] is 9223372036854775808, outside the int64 range"):
        fn(np.array([0, 2**63], np.uint64), [0, 1])
    with pytest.raises(ValueError, match=r"predictions\[0\] is 18446744073709551615, outside the int64 range"):
        fn([0, 1], np.array([2**64 - 1, 1], np.uint64))
    with pytest.raises(ValueError, match="labels holds integers outside the int64 range"):
        fn([0, 2**64], [0, 1])
    with pytest.raises(ValueError, match="predictions holds integers outside the int64 range"):
        fn([0, 1], [0, -(2**70)])
    with pytest.raises(ValueError, match="labels must be integer class ids, got dtype bool"):
        fn(np.array([True, False]), [0, 1])
    with pytest.raises(ValueError, match="labels must be integer class ids, got dtype <U1"):
        fn(np.array(["0", "1"]), [0, 1])


def test_uint64_ids_in_range_still_work():
    assert top1_accuracy(np.array([0, 1, 2], np.uint64), np.array([0, 1, 1], np.uint64)) == pytest.approx(2 / 3)


# -- against scikit-learn ------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_against_sklearn_random(seed):
    skm = require("sklearn.metrics", "scikit-learn", "pip install '.[test]'")
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    classes = int(rng.integers(1, 30))
    y = rng.integers(0, classes, n)
    # mostly right, with classes that are never predicted and predicted
    # classes that are absent from the labels
    p = np.where(rng.random(n) < 0.6, y, rng.integers(0, classes + 3, n))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "y_pred contains classes not in y_true"
        assert mean_class_accuracy(y, p) == pytest.approx(skm.balanced_accuracy_score(y, p), abs=1e-12)
    assert top1_accuracy(y, p) == pytest.approx(skm.accuracy_score(y, p), abs=1e-12)
    c = int(max(y.max(), p.max())) + 1
    np.testing.assert_array_equal(confusion_matrix(y, p), skm.confusion_matrix(y, p, labels=np.arange(c)))
    # scores without ties: top-k against sklearn's top_k_accuracy_score
    s = rng.standard_normal((n, classes + 1))
    for k in (1, 2, 5):
        if k < classes + 1:
            expected = skm.top_k_accuracy_score(y, s, k=k, labels=np.arange(classes + 1))
            assert topk_accuracy(y, s, k) == pytest.approx(expected, abs=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert mean_class_accuracy(y, s) == pytest.approx(skm.balanced_accuracy_score(y, s.argmax(1)), abs=1e-12)
