"""The gate and the champion registry in a store: a candidate must beat the pretrained model
and the champion on the same prompts; the champion pointer is written last."""

from __future__ import annotations

import pytest

from finance_qlora.bootstrap import Interval
from finance_qlora.records import AdapterRecord
from finance_qlora.registry import (
    Decision,
    Protocol,
    decide,
    decisions,
    read_champion,
    record_decision,
)
from finance_qlora.store import Store

PROTOCOL = Protocol(
    test_sha256="t" * 64,
    template="p" * 64,
    generation={"max_new_tokens": 8},
    base_model="builtin:tiny-llama@default",
    data_version="sha256:abc",
)


def delta(low: float, mean: float = 0.05) -> Interval:
    return Interval(mean=mean, low=low, high=mean + 0.05)


def test_must_beat_the_pretrained_model():
    promoted, reason = decide("rougeL", 0.30, delta(low=-0.01), champion=None)
    assert not promoted and "does not beat the pretrained model" in reason
    promoted, _ = decide("rougeL", 0.30, delta(low=0.0), champion=None)
    assert not promoted  # an interval that touches zero is not "above zero"
    promoted, reason = decide("rougeL", 0.30, delta(low=0.01), champion=None)
    assert promoted and "no champion yet" in reason
    promoted, _ = decide("rougeL", 0.30, delta(low=-0.01), None, beat_pretrained=False)
    assert promoted


def test_must_beat_the_champion_by_min_delta():
    assert decide("rougeL", 0.31, delta(0.01), champion=0.30)[0]
    assert not decide("rougeL", 0.30, delta(0.01), champion=0.30)[0]  # a tie keeps it
    assert not decide("rougeL", 0.305, delta(0.01), champion=0.30, min_delta=0.01)[0]
    assert decide("rougeL", 0.311, delta(0.01), champion=0.30, min_delta=0.01)[0]


def published_adapter(store: Store, tmp_path, name: str) -> AdapterRecord:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_text(name)
    uri, digest = store.publish(folder, "adapters", name)
    return AdapterRecord(folder=uri, fingerprint=digest)


def decision(promoted: bool, adapter: AdapterRecord) -> Decision:
    return Decision(
        promoted=promoted,
        metric="rougeL",
        candidate=0.3,
        pretrained=0.2,
        delta=delta(0.01),
        champion=None,
        candidate_adapter=adapter.folder,
        adapter=adapter.folder if promoted else None,
        reason="test",
        protocol=PROTOCOL,
    )


@pytest.fixture(params=["folder", "s3"])
def store(request, tmp_path):
    if request.param == "folder":
        return Store(str(tmp_path / "store"))
    return Store(request.getfixturevalue("bucket") + "/runs")


def test_promotion_writes_the_pointer_and_every_decision(store, tmp_path):
    a = published_adapter(store, tmp_path, "a")
    record_decision(store, decision(True, a), a, {"rougeL": 0.3})
    champion = read_champion(store)
    assert champion.adapter == a and champion.protocol == PROTOCOL
    b = published_adapter(store, tmp_path, "b")
    record_decision(store, decision(False, b), b, {"rougeL": 0.1})
    assert read_champion(store).adapter == a
    assert [d.promoted for d in decisions(store)] == [True, False]


def test_an_incomplete_adapter_never_becomes_champion(store, tmp_path):
    a = published_adapter(store, tmp_path, "a")
    record_decision(store, decision(True, a), a, {"rougeL": 0.3})
    before = store.read_text("registry", "champion.json")
    b = published_adapter(store, tmp_path, "b")
    store.fs.rm_file(store.path("adapters", "b", "MANIFEST.json"))  # killed mid-upload
    with pytest.raises(RuntimeError, match="incomplete"):
        record_decision(store, decision(True, b), b, {"rougeL": 0.9})
    assert store.read_text("registry", "champion.json") == before


def test_the_gate_gives_its_reason_in_words():
    low = Interval(mean=0.05, low=-0.01, high=0.1)
    assert decide("rougeL", 0.3, low, champion=None) == (
        False,
        "rougeL 0.3000 does not beat the pretrained model: the delta +0.0500 has a 95% interval "
        "[-0.0100, +0.1000] that is not above zero",
    )
    assert decide("rougeL", 0.3, delta(0.01), champion=None) == (
        True,
        "no champion yet; rougeL 0.3000 beats the pretrained model",
    )
    assert decide("rouge1", 0.3, low, champion=None, beat_pretrained=False) == (
        True,
        "no champion yet; rouge1 0.3000 (promotion.beat_pretrained is off: the pretrained model "
        "need not be beaten)",
    )
    assert decide("rougeL", 0.311, delta(0.01), champion=0.3, min_delta=0.01) == (
        True,
        "rougeL 0.3110 beats the champion's 0.3000 on the same prompts by more than 0.01",
    )
    assert decide("rougeL", 0.31, delta(0.01), champion=0.3) == (
        True,
        "rougeL 0.3100 beats the champion's 0.3000 on the same prompts",
    )
    assert decide("rougeL", 0.3, delta(0.01), champion=0.3) == (
        False,
        "rougeL 0.3000 does not beat the champion's 0.3000 on the same prompts",
    )
    assert decide("rougeL", 0.305, delta(0.01), champion=0.3, min_delta=0.01) == (
        False,
        "rougeL 0.3050 does not beat the champion's 0.3000 on the same prompts by more than 0.01",
    )


def test_decisions_are_named_by_utc_time_and_the_files_are_indented(tmp_path):
    import re

    store = Store(str(tmp_path / "store"))
    assert read_champion(store) is None  # no champion yet
    a = published_adapter(store, tmp_path, "a")
    record_decision(store, decision(True, a), a, {"rougeL": 0.3})
    (name,) = store.listdir("registry", "decisions")
    assert re.fullmatch(r"\d{8}T\d{12}-[0-9a-f]{8}\.json", name)  # sorts by time
    assert read_champion(store).promoted_at.endswith("+00:00")
    for text in (
        store.read_text("registry", "decisions", name),
        store.read_text("registry", "champion.json"),
    ):
        assert text.startswith('{\n  "')  # read by people too
