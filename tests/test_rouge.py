import pytest

from finance_qlora.rouge import METRICS, mean_scores, score_pairs


def test_hand_computed_rouge():
    # prediction "the cat sat" vs reference "the cat sat on the mat":
    # unigram overlap 3, precision 3/3, recall 3/6 -> F1 = 2/3
    # bigram overlap 2 ("the cat", "cat sat"), precision 2/2, recall 2/5 -> F1 = 4/7
    scores = score_pairs(["the cat sat"], ["the cat sat on the mat"])
    assert scores["rouge1"][0] == pytest.approx(2 / 3)
    assert scores["rouge2"][0] == pytest.approx(4 / 7)
    assert scores["rougeL"][0] == pytest.approx(2 / 3)


# (prediction, reference, expected F1 of rouge1, rouge2, rougeL, rougeLsum), by hand, without
# rouge_score: tokens are lower-cased words, stemmed (Porter); ROUGE-Lsum takes each line as a
# sentence and, for each reference sentence, the union of its LCS with every predicted line.
HAND_COMPUTED = [
    # stems: prediction invest, investor, invest; reference invest, invest.
    # rouge1: 2 matches, P 2/3, R 2/2 -> F1 0.8; no common bigram; LCS "invest invest" = 2.
    ("Investing investors invested", "invest investment", (0.8, 0.0, 0.8, 0.8)),
    # prediction "a b" twice, reference "a b" then "b a": same words (rouge1 1), bigrams
    # ab ba ab vs ab bb ba: 2 of 3 each way; LCS of a b a b and a b b a: 3 of 4 each way.
    # ROUGE-Lsum is not symmetric: reference line "a b" takes a and b, line "b a" only one of
    # its words (its LCS with "a b" is one word): 3 hits of 4 -> 3/4 (the other way round: 1).
    ("a b\na b", "a b\nb a", (1.0, 2 / 3, 3 / 4, 3 / 4)),
    ("a b\nb a", "a b\na b", (1.0, 2 / 3, 3 / 4, 1.0)),
    ("", "Something.", (0.0, 0.0, 0.0, 0.0)),
]


def test_scores_match_hand_computed_values_with_prediction_and_reference_in_place():
    """Independent of rouge_score: a swap of prediction and reference changes ROUGE-Lsum."""
    ours = score_pairs([p for p, _, _ in HAND_COMPUTED], [r for _, r, _ in HAND_COMPUTED])
    for i, (_, _, expected) in enumerate(HAND_COMPUTED):
        assert [ours[m][i] for m in METRICS] == pytest.approx(list(expected)), i


def test_rouge_lsum_splits_sentences_on_newlines():
    joined = score_pairs(["b a"], ["a b"])["rougeLsum"][0]
    split = score_pairs(["b\na"], ["a\nb"])["rougeLsum"][0]
    assert joined == pytest.approx(0.5)  # one sentence: LCS of "a b" and "b a" is 1 word
    assert split == pytest.approx(1.0)  # two sentences: each one matched separately


def test_means_and_mismatched_lengths():
    scores = score_pairs(["a", "b"], ["a", "c"])
    assert mean_scores(scores)["rouge1"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        score_pairs(["a"], ["a", "b"])


PAIRS = [  # (prediction, reference)
    ("Bonds pay interest.\nThey mature later.", "A bond pays interest.\nIt matures later."),
    ("Stocks are shares of ownership.", "A stock is a share in a company."),
    ("Investing investors invested", "invest investment"),  # stemming
    ("b\na", "a\nb"),  # ROUGE-Lsum: one sentence a line
    ("", "Something."),
    ("The same answer.", "The same answer."),
]


def _rouge_score_directly(pairs=PAIRS) -> dict[str, list[float]]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    results = [scorer.score(reference, prediction) for prediction, reference in pairs]
    return {m: [r[m].fmeasure for r in results] for m in METRICS}


def test_evaluate_module_gives_rouge_scores_exactly():
    import evaluate

    from finance_qlora.rouge import ROUGE_MODULE

    module = evaluate.load(str(ROUGE_MODULE), keep_in_memory=True)
    predictions, references = [p for p, _ in PAIRS], [r for _, r in PAIRS]
    expected = _rouge_score_directly()
    per_example = module.compute(
        predictions=predictions, references=references, use_aggregator=False
    )
    assert {m: per_example[m] for m in METRICS} == expected  # exactly, not approximately
    means = module.compute(predictions=predictions, references=references)
    assert means == {m: sum(v) / len(v) for m, v in expected.items()}
    assert score_pairs(predictions, references) == expected  # what evaluation uses


def _real_pairs() -> list[tuple[str, str]]:
    """Answers scored against other rows' answers: long texts, repeated words, newlines."""
    from finance_qlora.files import read_jsonl
    from tests.conftest import SHARED_DATA

    if not SHARED_DATA.is_file():
        pytest.skip(f"{SHARED_DATA} is not there")
    outputs = [row["output"] for row in read_jsonl(SHARED_DATA)[:120]]
    return list(zip(outputs[:60], outputs[60:], strict=True))


def test_every_score_on_real_answers_is_rouge_scores_own():
    """The metric's CachedStemTokenizer scores long real answers exactly as rouge_score's own
    stemming tokenizer does."""
    pairs = _real_pairs()
    scores = score_pairs([p for p, _ in pairs], [r for _, r in pairs])
    assert scores == _rouge_score_directly(pairs)


def test_each_distinct_word_is_stemmed_once_a_scoring(monkeypatch):
    """Porter stems are worked out once per distinct word (of more than 3 characters) in a
    scoring, and again in the next scoring: nothing kept from one scoring to the next."""
    from nltk.stem import porter
    from rouge_score import tokenize

    from finance_qlora.rouge import rouge_metric

    predictions = ["Investors invested in investing funds.\nFunds invested again.", "Bonds pay."]
    references = ["An investor invests in funds; funds grow.", "Bonds paying interest pay."]
    words = {w for t in predictions + references for w in tokenize.tokenize(t, None)}
    distinct = [w for w in words if len(w) > 3]
    stemmed, stem = [], porter.PorterStemmer.stem

    def counted(self, word, *args, **kwargs):
        stemmed.append(word)
        return stem(self, word, *args, **kwargs)

    monkeypatch.setattr(porter.PorterStemmer, "stem", counted)
    for scoring in (1, 2):
        rouge_metric().compute(predictions=predictions, references=references)
        assert sorted(stemmed) == sorted(distinct * scoring)


_OFFLINE_LOAD = """
import json, socket, sys

def no_network(*args, **kwargs):
    raise OSError("no network in this test")

socket.socket.connect = socket.create_connection = no_network
import evaluate

module = evaluate.load(sys.argv[1])
pairs = json.loads(sys.argv[2])
print(json.dumps(module.compute(
    predictions=[p for p, _ in pairs], references=[r for _, r in pairs], use_aggregator=False
)))
"""


def test_evaluate_module_loads_offline_into_an_empty_module_cache(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from finance_qlora.rouge import ROUGE_MODULE

    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_EVALUATE_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf"),
        HF_MODULES_CACHE=str(tmp_path / "modules"),
    )
    done = subprocess.run(
        [sys.executable, "-c", _OFFLINE_LOAD, str(ROUGE_MODULE), json.dumps(PAIRS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    scores = json.loads(done.stdout.strip().splitlines()[-1])
    assert {m: scores[m] for m in METRICS} == _rouge_score_directly()
    assert any((tmp_path / "modules").rglob("finance_rouge.py"))  # loaded from the copy


def test_no_rows_mean_zero_and_a_count_mismatch_is_told():
    assert mean_scores({m: [] for m in METRICS}) == {m: 0.0 for m in METRICS}
    assert score_pairs([], []) == {m: [] for m in METRICS}
    with pytest.raises(ValueError, match="^1 predictions for 2 references$"):
        score_pairs(["a"], ["a", "b"])
