import pytest

from finance_qlora.bootstrap import paired_bootstrap


def test_constant_difference_gives_a_point_interval():
    before = [0.1, 0.4, 0.3, 0.9]
    after = [b + 0.05 for b in before]
    iv = paired_bootstrap(before, after, resamples=500, seed=1)
    assert iv.delta.mean == pytest.approx(0.05)
    assert iv.delta.low == pytest.approx(0.05)
    assert iv.delta.high == pytest.approx(0.05)
    # each model's own interval is wide: pairing is what makes the delta exact
    assert iv.pretrained.high - iv.pretrained.low > 0.2


def test_two_rows_hand_computed():
    # Resample means of [0, 1] are 0, 0.5, 1 with probability 1/4, 1/2, 1/4:
    # the 2.5th percentile is 0 and the 97.5th is 1.
    iv = paired_bootstrap([0.0, 0.0], [0.0, 1.0], resamples=4000, seed=0)
    assert (iv.delta.mean, iv.delta.low, iv.delta.high) == (0.5, 0.0, 1.0)


def test_reproducible_with_its_seed():
    before = [0.1, 0.2, 0.5, 0.3, 0.05, 0.7]
    after = [0.3, 0.1, 0.6, 0.6, 0.2, 0.65]
    a = paired_bootstrap(before, after, resamples=300, seed=7)
    b = paired_bootstrap(before, after, resamples=300, seed=7)
    c = paired_bootstrap(before, after, resamples=300, seed=8)
    assert a == b
    assert a.delta != c.delta
    assert a.delta.low < a.delta.mean < a.delta.high


def test_rejects_unpaired_scores():
    with pytest.raises(ValueError):
        paired_bootstrap([0.1], [0.1, 0.2])


def test_defaults_are_the_configurations():
    from finance_qlora.config import BootstrapSettings

    before, after = [0.1, 0.2, 0.5, 0.3, 0.05], [0.3, 0.1, 0.6, 0.6, 0.2]
    settings = BootstrapSettings()
    assert paired_bootstrap(before, after) == paired_bootstrap(
        before, after, settings.resamples, settings.confidence, settings.seed
    )


def test_one_row_gives_point_intervals():
    iv = paired_bootstrap([0.25], [0.75], resamples=50)
    assert (iv.pretrained.low, iv.pretrained.high) == (0.25, 0.25)
    assert (iv.delta.mean, iv.delta.low, iv.delta.high) == (0.5, 0.5, 0.5)


def test_empty_or_unpaired_scores_are_refused_in_words():
    for before, after in (([], []), ([0.1], [0.1, 0.2])):
        message = "^paired bootstrap needs two non-empty score lists of equal length$"
        with pytest.raises(ValueError, match=message):
            paired_bootstrap(before, after)


def test_the_interval_is_the_central_confidence_share_of_resampled_means():
    """Recomputed from the definition: the same seeded rows for both models, the mean of each
    resample, and the (1 - confidence) / 2 and 1 - (1 - confidence) / 2 percentiles."""
    import numpy as np

    before = [(i * 37 % 101) / 100 for i in range(30)]  # resample means nearly all distinct
    after = [(i * 53 % 97) / 100 for i in range(30)]
    iv = paired_bootstrap(before, after, resamples=2000, confidence=0.8, seed=11)
    rows = np.random.default_rng(11).integers(0, 30, size=(2000, 30))
    for values, got in ((before, iv.pretrained), (np.subtract(after, before), iv.delta)):
        means = np.asarray(values, dtype=np.float64)[rows].mean(axis=1)
        low, high = np.percentile(means, [10.0, 90.0])
        assert (got.low, got.high) == (pytest.approx(low), pytest.approx(high))
