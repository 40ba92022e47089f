"""ROUGE-1/2/L/Lsum with `rouge_score`: per-example F1 and their means.

ROUGE-Lsum treats each newline-separated line as a sentence (rouge_score's own convention), so
no sentence splitter, and nothing to download, is needed.
"""

from __future__ import annotations

from functools import lru_cache

METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(METRICS), use_stemmer=True)


def score_pairs(predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """Per-example F-measures, one list per metric."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scores: dict[str, list[float]] = {m: [] for m in METRICS}
    for prediction, reference in zip(predictions, references, strict=True):
        result = _scorer().score(reference, prediction)  # rouge_score takes (target, prediction)
        for metric in METRICS:
            scores[metric].append(result[metric].fmeasure)
    return scores


def mean_scores(per_example: dict[str, list[float]]) -> dict[str, float]:
    return {m: sum(v) / len(v) if v else 0.0 for m, v in per_example.items()}
