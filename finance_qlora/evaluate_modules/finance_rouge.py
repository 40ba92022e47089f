"""finance-qlora's ROUGE as a local 🤗 `evaluate` metric module; loads offline, no hub:

    evaluate.load("<path to>/finance_qlora/evaluate_modules/finance_rouge.py")

ROUGE-1/2/L/Lsum F1 from `rouge_score` with Porter stemming; ROUGE-Lsum treats each
newline-separated line as a sentence (rouge_score's own convention), so no sentence splitter,
and nothing to download, is needed. Unlike the hub's `rouge`, the aggregate is the plain mean of
the per-example F1 (no bootstrap aggregator), and `use_aggregator=False` gives the per-example
scores the project's paired bootstrap needs.

Self-contained (evaluate copies it into its module cache and imports it from there).
"""

from functools import lru_cache

import datasets
import evaluate
from nltk.stem import porter
from rouge_score import rouge_scorer, tokenize, tokenizers

ROUGE_TYPES = ["rouge1", "rouge2", "rougeL", "rougeLsum"]

_DESCRIPTION = (
    "ROUGE-1/2/L/Lsum F1 with stemming, as finance-qlora scores answers (rouge_score), "
    "ROUGE-Lsum split on newlines."
)
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated answers.
    references: list of reference answers, one per prediction.
    use_aggregator: True (default): the mean F1 of each type; False: the per-example F1 lists.
Returns:
    {"rouge1": ..., "rouge2": ..., "rougeL": ..., "rougeLsum": ...}
"""


class CachedStemTokenizer(tokenizers.Tokenizer):
    """rouge_score's default tokenizer (lowercase, alphanumeric words, Porter stems of words
    longer than 3 characters) with each distinct word stemmed once per scoring: words repeat
    (300 answer pairs: 83,000 stems of 6,000 words, about 40% of the scoring's time), and a
    stem depends on the word alone, so every score is unchanged."""

    def __init__(self):
        self.stem = lru_cache(maxsize=None)(porter.PorterStemmer().stem)

    def tokenize(self, text):
        # rouge_score calls self.stem(word) for words longer than 3 characters, as its
        # DefaultTokenizer calls its stemmer
        return tokenize.tokenize(text, self)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class FinanceRouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Lin, ROUGE: A Package for Automatic Evaluation of Summaries, 2004.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, use_aggregator=True):
        scorer = rouge_scorer.RougeScorer(ROUGE_TYPES, tokenizer=CachedStemTokenizer())
        scores = {name: [] for name in ROUGE_TYPES}
        for prediction, reference in zip(predictions, references, strict=True):
            result = scorer.score(reference, prediction)  # rouge_score takes (target, prediction)
            for name in ROUGE_TYPES:
                scores[name].append(result[name].fmeasure)
        if not use_aggregator:
            return scores
        return {name: sum(v) / len(v) if v else 0.0 for name, v in scores.items()}
