"""How far a classifier's probabilities can be trusted, and a temperature that makes them truer.

NumPy only, so every stage (deploy included) can use it. The measures are the standard ones:

- expected calibration error (ECE): the test images put in 15 equal-width bins of confidence
  (the top probability; bin ``(lo, hi]``), the weighted mean of |accuracy - mean confidence|
  (Guo et al., ICML 2017);
- negative log-likelihood (mean ``-log p[true class]``) and the Brier score (mean over images of
  the squared distance between the probability vector and the one-hot true class, 0 to 2);
- selective accuracy: the accuracy on the most confident share (``coverage``) of the images;
- scores for "not one of the classes": the maximum probability (Hendrycks & Gimpel, ICLR 2017)
  and the negative energy ``T * logsumexp(logits / T)`` (Liu et al., NeurIPS 2020), higher
  meaning "more like the training data"; AUROC of a score separating in- from out-of-
  distribution images, and the threshold that accepts a stated share of in-distribution ones.

Temperature scaling divides the logits by one ``T`` fitted to minimise the NLL on held-out data;
it never changes a prediction's argmax. A model that ends in softmax gives probabilities, whose
logarithms are its logits up to a per-image constant, which softmax ignores: so ``T`` can be
fitted and applied on probabilities alone. (The energy is not shift-free: it needs the real
logits.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ECE_BINS = 15
# The temperatures searched (golden section on log T): far wider than any seen in practice.
T_BOUNDS = (0.05, 20.0)
DEFAULT_ACCEPTANCE = 0.95
# Floor of probabilities before a logarithm: here and in the exported graph (a float32 normal).
LOG_FLOOR = 1e-30
# A label-smoothed network's class at or under the smoothing's share keeps this part of the
# share (on a run's model trained with 0.1: test NLL 0.285 with it, 0.488 with LOG_FLOOR).
SMOOTHED_FLOOR = 0.01
# Added to a squared length before its square root: a zero feature vector stays zero.
NORM_EPSILON = 1e-12


def log_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """``log p`` (float64, floored at ``LOG_FLOOR``): the logits up to a per-image constant."""
    return np.log(np.clip(np.asarray(probabilities, dtype=np.float64), LOG_FLOOR, 1.0))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` (float64)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def smoothing_share(label_smoothing: float, classes: int) -> float:
    """What label smoothing ``ε`` gives every class of ``classes``: ``ε / K``."""
    return label_smoothing / classes


def unsmoothed_log_probabilities(
    probabilities: np.ndarray, label_smoothing: float = 0.0
) -> np.ndarray:
    """``log p`` of a network trained with label smoothing ``ε``, the smoothing taken off first.

    Such a network learns ``(1 - ε) q + ε / K``, not ``q``: no temperature undoes the floor of
    ``ε / K`` under every class (a run's model trained with 0.1 kept an ECE of 1.4-1.8 % after
    one, 0.8-0.9 % with the share taken off: docs/calibration.md). ``log(p - ε / K)`` is the
    logits of ``q`` up to a per-image constant; a class at or under the share keeps
    ``SMOOTHED_FLOOR`` of it (a floor of 1e-30 made the NLL of the rare true class there huge).
    """
    if not label_smoothing:
        return log_probabilities(probabilities)
    p = np.asarray(probabilities, dtype=np.float64)
    share = smoothing_share(label_smoothing, p.shape[1])
    return np.log(np.maximum(p - share, share * SMOOTHED_FLOOR))


def rescale(
    probabilities: np.ndarray, temperature: float, label_smoothing: float = 0.0
) -> np.ndarray:
    """The probabilities a temperature makes of a softmax output: ``softmax(log p / T)``, the
    network's label smoothing taken off first (``unsmoothed_log_probabilities``)."""
    return softmax(unsmoothed_log_probabilities(probabilities, label_smoothing), temperature)


def uncalibrated(
    probabilities: np.ndarray, temperature: float, label_smoothing: float = 0.0
) -> np.ndarray:
    """The softmax output before ``rescale`` made ``probabilities`` of it: the temperature
    undone, then the smoothing put back (exact where no class was at the floor)."""
    unsmoothed = rescale(probabilities, 1 / temperature)
    share = smoothing_share(label_smoothing, unsmoothed.shape[1])
    return (1 - label_smoothing) * unsmoothed + share


def nll(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes."""
    rows = np.arange(len(labels))
    return float(-log_probabilities(probabilities)[rows, labels].mean())


def brier(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean over images of the squared distance to the one-hot true class (0 best, 2 worst)."""
    p = np.asarray(probabilities, dtype=np.float64)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(labels)), labels] = 1.0
    return float(((p - onehot) ** 2).sum(axis=1).mean())


def ece(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error over ``bins`` equal-width bins of confidence, ``(lo, hi]``."""
    p = np.asarray(probabilities, dtype=np.float64)
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == labels).astype(np.float64)
    # (lo, hi]: a confidence of exactly k/bins belongs to the bin below it; 0 to the first.
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            total += members.sum() * abs(correct[members].mean() - confidence[members].mean())
    return float(total / len(labels))


def reliability(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Per bin of confidence: its bounds, image count, mean confidence and accuracy (the
    reliability diagram's bars; empty bins have count 0 and None for the means)."""
    p = np.asarray(probabilities, dtype=np.float64)
    confidence = p.max(axis=1)
    correct = p.argmax(axis=1) == labels
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        rows.append(
            {
                "low": b / bins,
                "high": (b + 1) / bins,
                "count": count,
                "confidence": float(confidence[members].mean()) if count else None,
                "accuracy": float(correct[members].mean()) if count else None,
            }
        )
    return rows


def selective_accuracy(probabilities: np.ndarray, labels: np.ndarray, coverage: float) -> float:
    """Accuracy on the ``ceil(coverage * n)`` most confident images (ties: the earlier first)."""
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must be in (0, 1], not {coverage}")
    p = np.asarray(probabilities, dtype=np.float64)
    kept = max(1, math.ceil(round(coverage * len(labels), 9)))
    order = np.argsort(-p.max(axis=1), kind="stable")[:kept]
    return float((p[order].argmax(axis=1) == labels[order]).mean())


def max_probability(probabilities: np.ndarray) -> np.ndarray:
    """The maximum-softmax-probability score of each image (higher: more in-distribution)."""
    return np.asarray(probabilities, dtype=np.float64).max(axis=1)


def energy_score(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Negative energy ``T * logsumexp(logits / T)`` of each image (higher: more in-distribution).

    Needs the real pre-softmax logits: from probabilities alone it is 0 for every image.
    """
    z = np.asarray(logits, dtype=np.float64) / temperature
    top = z.max(axis=1)
    return temperature * (top + np.log(np.exp(z - top[:, None]).sum(axis=1)))


def acceptance_threshold(scores: np.ndarray, rate: float = DEFAULT_ACCEPTANCE) -> float:
    """The highest threshold ``t`` for which ``score >= t`` accepts at least ``rate`` of
    ``scores`` (in-distribution, held-out images)."""
    if not 0 < rate <= 1:
        raise ValueError(f"acceptance rate must be in (0, 1], not {rate}")
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    rejected = math.floor(round((1 - rate) * len(ordered), 9))
    return float(ordered[rejected])


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Area under the ROC curve of a score telling in- (higher) from out-of-distribution
    images: the chance that a random in-distribution image scores above a random other one,
    ties counting one half (the Mann-Whitney U statistic, from average ranks)."""
    scores = np.concatenate([np.asarray(in_scores, float), np.asarray(out_scores, float)])
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    values, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    mean_rank = np.bincount(inverse, weights=ranks) / counts  # ties share their average rank
    positives, negatives = len(in_scores), len(out_scores)
    u = mean_rank[inverse][:positives].sum() - positives * (positives + 1) / 2
    return float(u / (positives * negatives))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, iterations: int = 80) -> float:
    """The ``T`` minimising the NLL of ``softmax(logits / T)`` on held-out images: golden
    section search on ``log T`` within ``T_BOUNDS`` (the NLL is convex in ``1/T``, so unimodal)."""
    logits = np.asarray(logits, dtype=np.float64)

    def loss(log_t: float) -> float:
        return nll(softmax(logits, math.exp(log_t)), labels)

    low, high = math.log(T_BOUNDS[0]), math.log(T_BOUNDS[1])
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = loss(a), loss(b)
    for _ in range(iterations):
        if fa <= fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = loss(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = loss(b)
    return math.exp((low + high) / 2)


@dataclass
class TemperatureFit:
    """A fitted temperature and what it did on the images it was fitted on."""

    temperature: float
    images: int
    source: str
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    method: str = "temperature"
    label_smoothing: float = 0.0  # the network's, taken off before the temperature


def calibrate(
    probabilities: np.ndarray, labels: np.ndarray, source: str, label_smoothing: float = 0.0
) -> TemperatureFit:
    """Fit a temperature to a softmax model's held-out ``probabilities`` (``source`` says which
    images), the label smoothing it trained with taken off first, and measure ECE and NLL
    before and after."""
    labels = np.asarray(labels)
    temperature = fit_temperature(
        unsmoothed_log_probabilities(probabilities, label_smoothing), labels
    )
    after = rescale(probabilities, temperature, label_smoothing)
    return TemperatureFit(
        temperature=temperature,
        images=len(labels),
        source=source,
        ece_before=ece(probabilities, labels),
        ece_after=ece(after, labels),
        nll_before=nll(probabilities, labels),
        nll_after=nll(after, labels),
        method="temperature, label smoothing undone" if label_smoothing else "temperature",
        label_smoothing=label_smoothing,
    )


def normalised(features: np.ndarray) -> np.ndarray:
    """Each row divided by its Euclidean length (float64; a zero row stays zero)."""
    f = np.asarray(features, dtype=np.float64)
    return f / np.sqrt((f**2).sum(axis=1, keepdims=True) + NORM_EPSILON)


def knn_score(features: np.ndarray, bank: np.ndarray, k: int) -> np.ndarray:
    """The cosine similarity of each image's features to its ``k``-th nearest neighbour in
    ``bank`` (normalised features of training images; Sun et al., ICML 2022): higher, more
    in-distribution. Computed as the exported graph computes it."""
    if not 1 <= k <= len(bank):
        raise ValueError(f"k must be between 1 and the {len(bank)} bank images, not {k}")
    similarities = normalised(features) @ np.asarray(bank, dtype=np.float64).T
    return -np.partition(-similarities, k - 1, axis=1)[:, k - 1]
