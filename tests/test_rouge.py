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


def test_matches_rouge_score_directly():
    from rouge_score import rouge_scorer

    pairs = [
        ("Bonds pay interest.\nThey mature later.", "A bond pays interest and matures."),
        ("Stocks are shares of ownership.", "A stock is a share in a company."),
        ("", "Something."),
    ]
    scorer = rouge_scorer.RougeScorer(list(METRICS), use_stemmer=True)
    ours = score_pairs([p for p, _ in pairs], [r for _, r in pairs])
    for i, (prediction, reference) in enumerate(pairs):
        expected = scorer.score(reference, prediction)
        for metric in METRICS:
            assert ours[metric][i] == pytest.approx(expected[metric].fmeasure)


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
