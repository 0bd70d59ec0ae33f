"""The label-free decision threshold: what each rule returns from public-set scores alone."""

import numpy as np
import pytest

from feddale.method.threshold import decision_threshold, otsu_threshold


def test_otsu_threshold_splits_two_groups():
    scores = np.concatenate([np.full(50, 0.2), np.full(50, 0.9)])
    assert 0.2 < otsu_threshold(scores) <= 0.9
    with pytest.raises(ValueError):
        otsu_threshold(np.array([]))
    with pytest.raises(ValueError):
        otsu_threshold(np.array([0.1, np.nan]))


def test_otsu_cuts_in_the_middle_of_an_empty_gap_so_tiny_score_changes_do_not_move_it():
    low, high = np.full(90, 0.0), np.full(10, 10.0)
    cut = otsu_threshold(np.concatenate([low, high]))
    assert cut == pytest.approx(5.0, abs=10 / 64)  # the middle of the gap, not its first edge
    nudged = otsu_threshold(np.concatenate([low + 1e-9, high - 1e-9]))
    assert nudged == pytest.approx(cut, abs=1e-6)


def test_fixed_rule_is_the_students_own_boundary_whatever_the_scores():
    assert decision_threshold(np.array([0.001, 0.002, 0.99]), "fixed") == 0.5


def test_otsu_rule_cuts_in_the_gap_between_the_students_modes_in_logit_space():
    # A confident student: normals at ~1e-4, anomalies at ~0.7. Half-way in probability (0.35)
    # would sit inside nothing; the logit-space valley lies between the two modes.
    probs = np.concatenate([np.full(900, 1e-4), np.full(100, 0.7)])
    cut = decision_threshold(probs, "otsu")
    assert 1e-4 < cut < 0.7
    assert ((probs >= cut) == (probs > 0.5)).all()  # it separates exactly the two groups


def test_otsu_rule_moves_with_the_modes_unlike_the_fixed_boundary():
    # Anomalies the student is unsure about (P ~ 0.3) are below 0.5 but above the valley.
    probs = np.concatenate([np.full(950, 1e-5), np.full(50, 0.3)])
    cut = decision_threshold(probs, "otsu")
    assert cut < 0.3 and (probs >= cut).sum() == 50


def test_one_mode_keeps_the_boundary_and_bad_rules_are_refused():
    assert decision_threshold(np.full(10, 0.2), "otsu") == 0.5
    with pytest.raises(ValueError, match="threshold rule"):
        decision_threshold(np.full(10, 0.2), "median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty"):
        decision_threshold(np.array([]), "otsu")
