"""The gate and the champion registry in a store: a candidate must beat the pretrained model
and the champion on the same prompts; the champion pointer is written last."""

from __future__ import annotations

import pytest

from finance_qlora.bootstrap import Interval
from finance_qlora.records import AdapterRecord
from finance_qlora.registry import (
    Decision,
    Protocol,
    RegistryError,
    decisions,
    live_champion,
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


def test_a_damaged_champion_pointer_is_one_line_naming_it(tmp_path):
    store = Store(str(tmp_path / "store"))
    store.write_text('{"adapter": "half a write', "registry", "champion.json")
    with pytest.raises(RegistryError) as caught:
        read_champion(store)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(store.uri("registry", "champion.json"))
    assert "delete it" in message
    store.write_text("{}", "registry", "decisions", "x.json")
    with pytest.raises(RegistryError, match="decisions/x.json is not a decision record"):
        decisions(store)


def test_a_champion_whose_adapter_is_gone_is_dropped_not_kept(tmp_path):
    store = Store(str(tmp_path / "store"))
    a = published_adapter(store, tmp_path, "a")
    record_decision(store, decision(True, a), a, {"rougeL": 0.3})
    assert live_champion(store) == (read_champion(store), None)
    store.remove(a.folder)
    champion, note = live_champion(store)
    assert champion is None and read_champion(store) is None  # no dangling pointer
    assert "is gone or changed" in note and a.folder in note
    (dropped,) = store.listdir("registry", "dropped")  # set aside, not lost
    assert a.folder in store.read_text("registry", "dropped", dropped)


def test_the_command_line_says_which_registry_object_is_damaged(tmp_path, capsys):
    from flows.finetune import main

    store = Store(str(tmp_path / "store"))
    store.write_text("not json", "registry", "champion.json")
    assert main(["--preset", "tiny-cpu", "--output-dir", str(tmp_path / "store")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {store.uri('registry', 'champion.json')} is not a champion")
    assert not store.listdir("data")  # before any work
