"""Calibrated scores: each task's temperature, fitted when it is learned, and how calibration is measured.

A trained task module is overconfident (on 200-example tasks its answers score 0.91-0.97 on
average at 81-91 % accuracy). When a task is learned, its logits on the held-out slice (examples the
module never trained on) fit one temperature T; the model divides that task's logits by T in every
precision it serves (model/ctt.py). Dividing by a positive number keeps the largest logit largest,
so no label changes: only the scores do.

The temperature is the one that maximises the held-out slice's likelihood, kept at one or above
(a slice of 30 examples the module gets all right would otherwise drive it towards zero, i.e.
certainty). Measured on the continual benchmark (``benchmarks/calibration.py``), it did as well as
a log-normal prior around the other tasks' temperatures, which would have tied every lineage to
the benchmark; vector scaling (a scale and an offset per class) changes labels, so it is out.

Calibration is measured as the expected calibration error of the top label (ECE): the answers are
put in 15 equal-width bins of their score, and ECE is the mean over answers of |accuracy − mean score|
of their bin. On a few hundred examples ECE has a floor above zero even for perfectly calibrated
scores (``ece_floor``).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from model.registry import MAX_TEMPERATURE, MIN_TEMPERATURE  # noqa: F401  (re-exported for the benchmarks and tests)

ECE_BINS = 15
# T is searched in [MIN_TEMPERATURE, MAX_TEMPERATURE], the bounds a version may hold (model/registry.py says why).


def top_label(probabilities: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The score of each answer and whether the answer is right (1.0 or 0.0)."""
    confidence, predicted = probabilities.max(-1)
    return confidence.double(), (predicted == targets).double()


def _bins(confidence: torch.Tensor, bins: int) -> torch.Tensor:
    # A score in (k/bins, (k+1)/bins] is in bin k; a score of exactly 0 in the first.
    return (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)


def reliability(confidence: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> list[dict]:
    """Per equal-width bin of the answers' scores: answers, their mean score and their accuracy."""
    index = _bins(confidence, bins)
    rows = []
    for k in range(bins):
        members = index == k
        count = int(members.sum())
        rows.append({"low": k / bins, "high": (k + 1) / bins, "count": count,
                     "confidence": float(confidence[members].mean()) if count else None,
                     "accuracy": float(correct[members].mean()) if count else None})
    return rows


def bootstrap_interval(point: float, resampled: list[float]) -> list[float]:
    """The 2.5-97.5 % range of an ECE's bootstrap resamples, moved by the bootstrap's own bias: a
    resample repeats examples, which inflates ECE, so its resamples sit above the estimate itself."""
    values = sorted(resampled)
    shift = sum(values) / len(values) - point
    return [values[int(0.025 * len(values))] - shift, values[min(len(values) - 1, int(0.975 * len(values)))] - shift]


def ece_of(confidence: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE from each answer's score and rightness: per bin, (answers / all) · |accuracy − mean
    score|, which is |rights − summed scores| / all."""
    if len(confidence) == 0:
        return 0.0
    index = _bins(confidence, bins)
    gap = torch.zeros(bins, dtype=torch.double).index_add_(0, index, correct.double() - confidence.double())
    return float(gap.abs().sum()) / len(confidence)


def expected_calibration_error(probabilities: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Top-label ECE with equal-width bins (Guo et al., 2017)."""
    return ece_of(*top_label(probabilities, targets), bins)


def ece_floor(confidence: torch.Tensor, draws: int = 200, seed: int = 0, bins: int = ECE_BINS) -> float:
    """The ECE that perfectly calibrated scores would show on this many examples: the mean ECE when
    each answer is right with exactly the probability of its score. ECE on a set of this size
    cannot be expected below it."""
    if len(confidence) == 0 or draws == 0:
        return 0.0
    confidence = confidence.double()
    generator = torch.Generator().manual_seed(seed)
    right = (torch.rand(draws, len(confidence), generator=generator, dtype=torch.double) < confidence).double()
    gap = torch.zeros(draws, bins, dtype=torch.double).index_add_(1, _bins(confidence, bins), right - confidence)
    return float(gap.abs().sum(1).mean()) / len(confidence)


def probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return torch.softmax(logits.double() / temperature, -1)


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, lowest: float = MIN_TEMPERATURE,
                    highest: float = MAX_TEMPERATURE) -> float:
    """The temperature in [``lowest``, ``highest``] that minimises the negative log-likelihood of
    ``targets`` (the likelihood is convex in 1/T, so a golden-section search over ln T finds it)."""
    logits, targets = logits.double(), targets.long()
    if len(targets) == 0:
        return lowest

    def objective(log_t: float) -> float:
        return float(F.cross_entropy(logits / math.exp(log_t), targets, reduction="sum"))

    low, high = math.log(lowest), math.log(highest)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = objective(a), objective(b)
    while high - low > 1e-6:
        if fa <= fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = objective(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = objective(b)
    # The search stops within its tolerance of a bound it runs into: the bound is then the answer.
    best = min((math.log(lowest), math.log(highest), (low + high) / 2), key=objective)
    return math.exp(best)


def calibration_errors(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> dict:
    """ECE of the raw scores and of the calibrated ones on one set, and the floor of the calibrated
    scores' ECE on a set of this size."""
    calibrated = probabilities(logits, temperature)
    return {"ece_before": expected_calibration_error(probabilities(logits), targets),
            "ece_after": expected_calibration_error(calibrated, targets),
            "ece_floor": ece_floor(calibrated.max(-1).values)}
