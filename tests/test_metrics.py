"""The evaluation metrics against answers worked out by hand, and against scikit-learn."""

import csv
import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from dclsify.pipeline.evaluate import metrics, write_per_class_csv

SQRT2 = math.sqrt(2)
PPF_3_4 = 0.6744897501960817  # the standard normal's 75 % quantile, from a table
PPF_1_3 = -0.4307272992954576  # and its 33.3 % quantile

# Two classes over four clips, ranked by hand:
# class 0 ranks pos, neg, pos, neg: AP = (1/1 + 2/3) / 2 = 5/6; AUC: 3 of 4 pos-neg pairs in order = 3/4.
# class 1 ranks neg, neg, pos, neg: AP = 1/3; AUC: 1 of 3 pairs in order = 1/3.
SCORES = np.array([[0.9, 0.2], [0.8, 0.3], [0.7, 0.6], [0.1, 0.4]])
TARGETS = np.array([[1, 0], [0, 1], [1, 0], [0, 0]], dtype=bool)


@pytest.mark.filterwarnings("error")  # no scikit-learn warning either: undefined classes are never passed to it
def test_hand_computed_example():
    result = metrics(SCORES, TARGETS, class_names=["dog", "cat"])
    assert result.mAP == pytest.approx((5 / 6 + 1 / 3) / 2, abs=1e-15)
    assert result.mAUC == pytest.approx((3 / 4 + 1 / 3) / 2, abs=1e-15)
    assert [(name, positives) for name, _, positives in result.per_class] == [("dog", 2), ("cat", 1)]
    assert [ap for _, ap, _ in result.per_class] == pytest.approx([5 / 6, 1 / 3], abs=1e-15)
    assert result.accuracy is None
    assert (result.clips, result.classes, result.classes_without_positives) == (4, 2, 0)


def test_d_prime_is_the_mean_of_per_class_d_primes():
    result = metrics(SCORES, TARGETS)
    assert result.d_prime == pytest.approx(SQRT2 * (PPF_3_4 + PPF_1_3) / 2, abs=1e-12)
    from scipy.stats import norm

    assert abs(result.d_prime - SQRT2 * norm.ppf(result.mAUC)) > 0.01  # not the d-prime of the mean AUC


def test_d_prime_of_chance_is_zero_and_of_a_known_auc_is_its_quantile():
    # pos 0.9 beats both negatives, pos 0.1 beats neither: AUC 1/2
    chance = metrics([[0.9], [0.8], [0.1], [0.2]], [[1], [0], [1], [0]])
    assert chance.mAUC == 0.5
    assert chance.d_prime == pytest.approx(0.0, abs=1e-15)
    three_quarters = metrics(SCORES[:, :1], TARGETS[:, :1])
    assert three_quarters.mAUC == 0.75
    assert three_quarters.d_prime == pytest.approx(SQRT2 * PPF_3_4, abs=1e-12)


def test_perfect_and_reversed_rankings():
    targets = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=bool)
    perfect = metrics(targets * 1.0, targets)
    assert (perfect.mAP, perfect.mAUC, perfect.d_prime) == (1.0, 1.0, math.inf)
    reversed_ = metrics([[0.1, 0.8], [0.2, 0.9], [0.8, 0.1], [0.9, 0.2]], targets)
    assert reversed_.mAUC == 0.0
    assert reversed_.d_prime == -math.inf
    # each class's positives ranked 3rd and 4th: (1/3 + 2/4) / 2
    assert reversed_.mAP == pytest.approx(5 / 12, abs=1e-15)


@pytest.mark.filterwarnings("error")
def test_a_class_without_positives_is_left_out_and_counted():
    scores = np.column_stack([SCORES, [0.5, 0.1, 0.9, 0.3]])
    targets = np.column_stack([TARGETS, np.zeros(4, dtype=bool)])
    result = metrics(scores, targets, class_names=["dog", "cat", "absent"])
    assert result.classes_without_positives == 1
    assert result.mAP == pytest.approx((5 / 6 + 1 / 3) / 2, abs=1e-15)  # not (5/6 + 1/3 + 0) / 3
    assert result.mAUC == pytest.approx((3 / 4 + 1 / 3) / 2, abs=1e-15)
    assert result.per_class[2] == ("absent", None, 0)


def test_a_class_with_only_positives_counts_in_map_but_not_in_auc():
    scores = np.column_stack([SCORES, [0.5, 0.1, 0.9, 0.3]])
    targets = np.column_stack([TARGETS, np.ones(4, dtype=bool)])
    result = metrics(scores, targets)
    assert result.classes_without_negatives == 1
    assert result.mAP == pytest.approx((5 / 6 + 1 / 3 + 1) / 3, abs=1e-15)
    assert result.mAUC == pytest.approx((3 / 4 + 1 / 3) / 2, abs=1e-15)


def test_nothing_to_average_gives_nan():
    result = metrics(np.ones((3, 2)), np.zeros((3, 2), dtype=bool))
    assert math.isnan(result.mAP) and math.isnan(result.mAUC) and math.isnan(result.d_prime)
    assert result.classes_without_positives == 2


def test_random_arrays_match_scikit_learn():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random((300, 40)), 2)  # rounded: ties, which AP must handle as scikit-learn does
    targets = rng.random((300, 40)) < np.linspace(0.005, 0.5, 40)
    targets[:, [3, 17]] = False  # classes without positives, left out
    kept = targets.any(axis=0)
    result = metrics(scores, targets)
    expected_ap = average_precision_score(targets[:, kept], scores[:, kept], average=None)
    assert result.mAP == pytest.approx(expected_ap.mean(), abs=1e-12)
    assert result.mAP == pytest.approx(average_precision_score(targets[:, kept], scores[:, kept]), abs=1e-12)
    ours = np.array([ap for _, ap, _ in result.per_class if ap is not None])
    np.testing.assert_allclose(ours, expected_ap, rtol=0, atol=1e-12)
    expected_auc = [roc_auc_score(targets[:, c], scores[:, c]) for c in np.flatnonzero(kept)]
    assert result.mAUC == pytest.approx(np.mean(expected_auc), abs=1e-12)
    assert result.classes_without_positives == (~kept).sum()


def test_logits_and_their_sigmoid_score_alike():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (200, 10))
    targets = rng.random((200, 10)) < 0.3
    from_logits = metrics(logits, targets).as_dict()
    from_probabilities = metrics(1 / (1 + np.exp(-logits)), targets).as_dict()
    assert from_logits == pytest.approx(from_probabilities, abs=1e-12)


def test_single_label_accuracy():
    scores = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [5.0, 0.0, 4.0], [0.1, 0.2, 0.3]])
    targets = np.eye(3, dtype=bool)[[0, 1, 2, 2]]
    result = metrics(scores, targets, multi_label=False)
    assert result.accuracy == 0.75  # clip 2's highest score is class 0, not its class 2
    with pytest.raises(ValueError, match="clip 1 has 2"):
        metrics(scores, targets | np.eye(3, dtype=bool)[[0, 0, 2, 2]], multi_label=False)


def test_bad_input():
    with pytest.raises(ValueError, match="must both be"):
        metrics(np.zeros((4, 2)), np.zeros((4, 3), dtype=bool))
    with pytest.raises(ValueError, match="not finite"):
        metrics(np.array([[np.nan], [0.0]]), [[True], [False]])
    with pytest.raises(ValueError, match="3 class names for 2"):
        metrics(SCORES, TARGETS, class_names=["a", "b", "c"])


def test_as_dict_leaves_out_the_per_class_list_unless_asked():
    result = metrics(SCORES, TARGETS)
    assert "per_class" not in result.as_dict()
    assert result.as_dict()["mAP"] == result.mAP
    assert result.as_dict(per_class=True)["per_class"] == result.per_class


def test_per_class_csv(tmp_path):
    scores = np.column_stack([SCORES, [0.5, 0.1, 0.9, 0.3]])
    targets = np.column_stack([TARGETS, np.zeros(4, dtype=bool)])
    path = tmp_path / "out" / "per_class.csv"
    result = metrics(scores, targets, class_names=["dog", "cat, big", "absent"])
    write_per_class_csv(result, path)
    rows = list(csv.DictReader(path.read_text().splitlines()))
    assert [r["class"] for r in rows] == ["dog", "cat, big", "absent"]
    assert [float(r["ap"]) for r in rows[:2]] == [ap for _, ap, _ in result.per_class[:2]]  # exact round trip
    assert [float(r["ap"]) for r in rows[:2]] == pytest.approx([5 / 6, 1 / 3], abs=1e-15)
    assert rows[2]["ap"] == ""
    assert [int(r["positives"]) for r in rows] == [2, 1, 0]
    assert [p.name for p in path.parent.iterdir()] == ["per_class.csv"]  # no temporary left behind


def test_an_infinite_d_prime_is_null_in_json():
    import json

    from dclsify.pipeline.evaluate import metrics

    perfect = metrics(np.array([[0.9], [0.1]]), np.array([[True], [False]]))
    assert perfect.d_prime == float("inf") and perfect.as_dict()["d_prime"] is None
    json.dumps(perfect.as_dict(), allow_nan=False)  # valid JSON
