"""ROUGE-1/2/L/Lsum through 🤗 `evaluate`: the project's local metric module
(`evaluate_modules/finance_rouge.py`, `rouge_score` with stemming), per-example F1 and means.

ROUGE-Lsum treats each newline-separated line as a sentence (rouge_score's own convention), so
no sentence splitter, and nothing to download, is needed.
"""

from __future__ import annotations

import logging
import threading
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
# Loaded by path: offline, no hub (see evaluate.load).
ROUGE_MODULE = Path(__file__).parent / "evaluate_modules" / "finance_rouge.py"


# Off: the metric loads at the first scoring, in the scoring thread (benchmarks time both).
AHEAD = True
# One load per process: a load ahead and the first scoring wait for each other.
_loading = threading.Lock()


def rouge_metric():
    with _loading:
        return _loaded_metric()


@lru_cache(maxsize=1)
def _loaded_metric():
    import evaluate

    return evaluate.load(str(ROUGE_MODULE), keep_in_memory=True)


def load_ahead() -> None:
    """Start loading the metric in a thread, so that the first scoring finds it loaded: called
    when the answers start to generate on a GPU, while this process mostly waits. Its first
    load imports evaluate, datasets, rouge_score and nltk (0.3 s on these CPUs, about 2.5 s of a
    bare H200 worker's first scoring). A load that fails is left to the scoring to meet."""
    if not AHEAD or _loaded_metric.cache_info().currsize:
        return

    def load() -> None:
        try:
            rouge_metric()
        except Exception as exc:  # noqa: BLE001 - the scoring loads it again and reports
            log.debug("the ROUGE metric was not loaded ahead (%s)", exc)

    threading.Thread(target=load, name="rouge-ahead", daemon=True).start()


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
