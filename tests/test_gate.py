"""The gate's comparison with the champion: only on test rows the champion never trained on,
by a paired bootstrap of candidate minus champion against promotion.min_delta; a champion that
cannot be scored is kept unless the run says it replaces it."""

from __future__ import annotations

from finance_qlora.bootstrap import Interval
from finance_qlora.config import BootstrapSettings, PromotionSettings
from finance_qlora.gate import VersusChampion, decide, versus_champion

BOOT = BootstrapSettings(resamples=500)
GATE = PromotionSettings(min_rows=3, beat_pretrained=False)
ABOVE = Interval(mean=0.1, low=0.05, high=0.15)  # candidate minus pretrained


def versus(low: float, mean: float = 0.02, rows: int = 10) -> VersusChampion:
    delta = Interval(mean=mean, low=low, high=mean + 0.01)
    return VersusChampion(
        rows=rows, excluded=2, candidate=0.3, champion=0.28, delta=delta, confidence=0.95
    )


def test_the_champion_is_compared_only_on_rows_it_never_trained_on():
    ids = ["a", "b", "c", "d", "e"]
    candidate = [0.5, 0.5, 0.1, 0.2, 0.3]
    champion = [1.0, 1.0, 0.0, 0.1, 0.2]  # perfect on the two rows it trained on
    result = versus_champion(ids, candidate, champion, {"a", "b", "z"}, BOOT)
    assert (result.rows, result.excluded) == (3, 2)
    assert result.champion == (0.0 + 0.1 + 0.2) / 3
    assert result.candidate == (0.1 + 0.2 + 0.3) / 3
    assert result.delta.low > 0  # the leaked rows would have made the champion win


def test_promotion_needs_the_paired_interval_above_min_delta():
    assert decide("rougeL", 0.3, ABOVE, GATE, versus(low=0.001))[0]
    promoted, reason = decide("rougeL", 0.3, ABOVE, GATE, versus(low=-0.001, mean=0.05))
    assert not promoted and "not above 0.0" in reason  # a higher mean alone is noise
    gate = GATE.model_copy(update={"min_delta": 0.01})
    assert not decide("rougeL", 0.3, ABOVE, gate, versus(low=0.005))[0]
    assert decide("rougeL", 0.3, ABOVE, gate, versus(low=0.011))[0]
    assert "re-scored on the 10 test rows it never trained on (2 of 12 left out)" in reason


def test_too_few_unseen_rows_keep_the_champion_and_say_how_many():
    promoted, reason = decide("rougeL", 0.3, ABOVE, GATE, versus(low=0.5, rows=2))
    assert not promoted
    assert "re-scored on the 2 test rows it never trained on" in reason and "min_rows 3" in reason


def test_an_unscorable_champion_is_kept_unless_the_run_replaces_it():
    why = "it was trained on other@default, this run uses tiny@default"
    promoted, reason = decide("rougeL", 0.3, ABOVE, GATE, None, unscorable=why)
    assert not promoted and why in reason and "promotion.replace_unscorable" in reason
    replace = GATE.model_copy(update={"replace_unscorable": True})
    promoted, reason = decide("rougeL", 0.3, ABOVE, replace, None, unscorable=why)
    assert promoted and "replaced" in reason


def test_the_pretrained_rule_and_the_first_champion():
    below = Interval(mean=0.05, low=-0.01, high=0.1)
    strict = PromotionSettings()
    promoted, reason = decide("rougeL", 0.3, below, strict, versus(low=0.5))
    assert not promoted and "does not beat the pretrained model" in reason
    assert not decide("rougeL", 0.3, Interval(mean=0.1, low=0.0, high=0.2), strict)[0]
    assert decide("rougeL", 0.3, ABOVE, strict) == (
        True,
        "no champion yet; rougeL 0.3000 beats the pretrained model",
    )
