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
