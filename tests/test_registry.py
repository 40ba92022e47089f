"""The promotion gate on plain folders: better becomes champion, worse leaves it untouched."""

import json

import pytest

from finance_qlora.registry import CHAMPION, promote_if_better, read_champion


def rouge(value: float) -> dict[str, float]:
    return {"rouge1": value, "rouge2": value / 2, "rougeL": value, "rougeLsum": value}


@pytest.fixture
def adapter_folder(tmp_path):
    def make(name: str, content: str):
        folder = tmp_path / "adapters" / name
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_text(content)
        return folder

    return make


def test_first_adapter_becomes_champion(tmp_path, adapter_folder):
    registry = tmp_path / "registry"
    decision = promote_if_better(adapter_folder("a", "A"), rouge(0.2), "rougeL", registry)
    assert decision.promoted and decision.is_champion and decision.champion is None
    champion = read_champion(registry)
    assert champion.score == 0.2 and champion.adapter == registry / "adapters" / "a"
    assert (champion.adapter / "adapter_model.safetensors").read_text() == "A"


def test_better_adapter_replaces_champion(tmp_path, adapter_folder):
    registry = tmp_path / "registry"
    promote_if_better(adapter_folder("a", "A"), rouge(0.2), "rougeL", registry)
    decision = promote_if_better(adapter_folder("b", "B"), rouge(0.3), "rougeL", registry)
    assert decision.promoted and decision.champion == 0.2
    assert read_champion(registry).adapter.name == "b"
    assert (registry / "adapters" / "a").is_dir()  # earlier champions are kept


def test_worse_or_equal_adapter_leaves_champion_intact(tmp_path, adapter_folder):
    registry = tmp_path / "registry"
    promote_if_better(adapter_folder("a", "A"), rouge(0.3), "rougeL", registry)
    before = (registry / CHAMPION).read_bytes()
    for name, score in (("b", 0.1), ("c", 0.3)):
        decision = promote_if_better(adapter_folder(name, name), rouge(score), "rougeL", registry)
        assert not decision.promoted and not decision.is_champion
        assert decision.adapter.name == "a"
        assert not (registry / "adapters" / name).exists()
    assert (registry / CHAMPION).read_bytes() == before
    log = [json.loads(line) for line in (registry / "decisions.jsonl").read_text().splitlines()]
    assert [d["promoted"] for d in log] == [True, False, False]


def test_min_delta_and_rerun_of_the_champion(tmp_path, adapter_folder):
    registry = tmp_path / "registry"
    first = adapter_folder("a", "A")
    promote_if_better(first, rouge(0.30), "rougeL", registry)
    small_gain = promote_if_better(
        adapter_folder("b", "B"), rouge(0.305), "rougeL", registry, min_delta=0.01
    )
    assert not small_gain.promoted
    again = promote_if_better(first, rouge(0.30), "rougeL", registry)
    assert again.is_champion and not again.promoted and "already the champion" in again.reason
