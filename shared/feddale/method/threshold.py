"""The label-free decision threshold a student ships with.

A student trained on balanced pseudo-labels has its own boundary at P(anomalous) = 0.5, which
lines up with balanced sampling, not with a stream where 3% of sessions are anomalous. The only
evidence a federation has without labels is how its scores fall on the unlabeled public set, so
the rules here look at that distribution and nothing else. Which rule a profile uses was chosen
on the validation split (docs/quality.md §9); the rule itself never sees a label.
"""

from __future__ import annotations

from typing import get_args

import numpy as np

from feddale.method.config import ThresholdRule

THRESHOLD_RULES: tuple[str, ...] = get_args(ThresholdRule)
_EPS = 1e-6


def otsu_threshold(scores: np.ndarray, bins: int = 64) -> float:
    """The cut that best separates the score histogram into two groups (Otsu's method).

    Maximises the between-group variance of the histogram. Every cut inside an empty stretch of
    the histogram separates the same groups, so the maximum is then a run of equal values whose
    first edge would move with the last bits of the scores (another runtime, another thread
    count); the cut is the middle of that run instead, an edge when the run is one edge long.
    Used for the FedAvg-teacher baseline's accuracy scores and, in logit space, for the
    student's P(anomalous).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("otsu_threshold needs at least one score")
    if not np.isfinite(scores).all():
        raise ValueError("otsu_threshold needs finite scores")
    hist, edges = np.histogram(scores, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    weights = hist / hist.sum()
    between = np.full(bins, -1.0)
    for i in range(1, bins):
        w0, w1 = weights[:i].sum(), weights[i:].sum()
        if w0 == 0 or w1 == 0:
            continue
        m0 = (weights[:i] * centers[:i]).sum() / w0
        m1 = (weights[i:] * centers[i:]).sum() / w1
        between[i] = w0 * w1 * (m0 - m1) ** 2
    best = int(np.argmax(between))
    if between[best] < 0:  # one non-empty bin: nothing to separate
        return float(np.median(scores))
    last = best
    while last + 1 < bins and np.isclose(between[last + 1], between[best], rtol=1e-9, atol=0.0):
        last += 1
    return float((edges[best] + edges[last]) / 2)


def decision_threshold(public_probs: np.ndarray, rule: ThresholdRule) -> float:
    """P(anomalous) at or above which a session is flagged, from the student's public-set scores.

    ``fixed``: 0.5, the student's own boundary. ``otsu``: Otsu's cut on the logits of the
    public-set scores, i.e. the valley between the student's "normal" and "anomalous" modes,
    wherever training put it. Logits, because a confident student piles its scores within
    1e-3 of 0 and 1, where a histogram of probabilities has no resolution.
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"threshold rule must be one of {THRESHOLD_RULES}, got {rule!r}")
    if rule == "fixed":
        return 0.5
    probs = np.clip(np.asarray(public_probs, dtype=np.float64), _EPS, 1 - _EPS)
    if probs.size == 0:
        raise ValueError("the otsu threshold needs the student's scores on a non-empty public set")
    logits = np.log(probs / (1 - probs))
    if logits.max() - logits.min() < 1e-9:  # one mode only: nothing to separate, keep the boundary
        return 0.5
    return float(1 / (1 + np.exp(-otsu_threshold(logits))))
