"""Paired bootstrap over test rows: intervals for each model's mean and for their difference."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel


class Interval(BaseModel):
    mean: float
    low: float
    high: float


class PairedInterval(BaseModel):
    pretrained: Interval
    finetuned: Interval
    delta: Interval  # fine-tuned minus pretrained


def paired_bootstrap(
    pretrained: list[float],
    finetuned: list[float],
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedInterval:
    """Percentile intervals from resampling test rows with replacement.

    Both models are resampled with the same row indices: the rows are shared, so the
    interval of the delta reflects per-row differences, not two independent spreads.
    """
    a = np.asarray(pretrained, dtype=np.float64)
    b = np.asarray(finetuned, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError("paired bootstrap needs two non-empty score lists of equal length")
    rows = np.random.default_rng(seed).integers(0, a.size, size=(resamples, a.size))
    tail = (1.0 - confidence) / 2 * 100

    def interval(values: np.ndarray) -> Interval:
        means = values[rows].mean(axis=1)
        low, high = np.percentile(means, [tail, 100 - tail])
        return Interval(mean=float(values.mean()), low=float(low), high=float(high))

    return PairedInterval(pretrained=interval(a), finetuned=interval(b), delta=interval(b - a))
