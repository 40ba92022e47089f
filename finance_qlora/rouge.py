"""ROUGE-1/2/L/Lsum through 🤗 `evaluate`: the project's local metric module
(`evaluate_modules/finance_rouge.py`, `rouge_score` with stemming), per-example F1 and means.

ROUGE-Lsum treats each newline-separated line as a sentence (rouge_score's own convention), so
no sentence splitter, and nothing to download, is needed.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
# Loaded by path: offline, no hub (see evaluate.load).
ROUGE_MODULE = Path(__file__).parent / "evaluate_modules" / "finance_rouge.py"


@lru_cache(maxsize=1)
def rouge_metric():
    import evaluate

    return evaluate.load(str(ROUGE_MODULE), keep_in_memory=True)


def score_pairs(predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """Per-example F-measures, one list per metric."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {m: [] for m in METRICS}
    scores = rouge_metric().compute(
        predictions=predictions, references=references, use_aggregator=False
    )
    return {m: list(scores[m]) for m in METRICS}


def mean_scores(per_example: dict[str, list[float]]) -> dict[str, float]:
    return {m: sum(v) / len(v) if v else 0.0 for m, v in per_example.items()}
