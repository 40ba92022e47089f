"""The gate through the flow, on one store in order: a champion from the default seed, then
runs that change the split, the prompts' champion record, the base model's revision, the
results in the store and the champion's adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from finance_qlora.gate import read_trained_rows
from tests.test_flow import run_flow, task_states

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(prefect_api, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gate")
    state, result = run_flow(folder)
    assert state.is_completed() and result["promoted"]
    return folder, result


def test_a_new_seed_scores_the_champion_only_on_rows_it_never_saw(store):
    from finance_qlora.data import BUILTIN_DATA, check_rows, drop_duplicates, row_id, split_rows
    from finance_qlora.files import read_jsonl

    folder, first = store
    _, result = run_flow(folder, data={"seed": 7}, promotion={"min_rows": 99})
    versus = result["decision"]["versus_champion"]
    # the seed-7 test rows the champion trained on, counted independently of the gate
    rows = drop_duplicates(check_rows(read_jsonl(BUILTIN_DATA["builtin:tiny-finance-alpaca"]), "x"))
    _, test, _ = split_rows(rows, 28, 8, seed=7)
    leaked = {row_id(r) for r in test} & read_trained_rows(Path(first["adapter"]))
    assert leaked and (versus["excluded"], versus["rows"]) == (len(leaked), 8 - len(leaked))
    reason = result["decision"]["reason"]
    assert f"re-scored on the {8 - len(leaked)} test rows it never trained on" in reason
    assert not result["promoted"] and "fewer than promotion.min_rows 99" in reason


def test_the_gate_compares_against_the_champions_re_score(store):
    """The champion's recorded score is never what the candidate faces."""
    folder, _ = store
    pointer = folder / "registry" / "champion.json"
    saved = pointer.read_text()
    champion = json.loads(saved)
    champion["score"], champion["rouge"] = 1.0, {k: 1.0 for k in champion["rouge"]}
    pointer.write_text(json.dumps(champion))
    state, result = run_flow(folder, train={"seed": 3}, promotion={"min_rows": 1})
    if not result["promoted"]:
        pointer.write_text(saved)
    assert task_states(state)["evaluate-champion"] == ["Cached"]  # same prompts as run 1
    versus = result["decision"]["versus_champion"]
    assert (versus["excluded"], versus["rows"]) == (0, 8)
    rescored = result["rouge"]["champion"]["rougeL"]
    assert result["decision"]["champion"] == pytest.approx(rescored) and rescored != 1.0
    assert versus["champion"] == pytest.approx(rescored)


def test_a_champion_on_another_revision_is_kept(store):
    folder, _ = store
    before = (folder / "registry" / "champion.json").read_text()
    state, result = run_flow(folder, model={"revision": "v2"})
    assert "evaluate-champion" not in task_states(state)
    reason = result["decision"]["reason"]
    assert not result["promoted"] and "cannot be scored here" in reason and "@v2" in reason
    assert (folder / "registry" / "champion.json").read_text() == before


def test_a_planted_pickle_result_is_removed_and_the_step_recomputed(store):
    import pickle

    folder, first = store
    marker = folder.parent / "ran"

    class Planted:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for result_file in (folder / "prefect-results").iterdir():
        result_file.write_bytes(pickle.dumps(Planted()))
    state, result = run_flow(folder)
    assert state.is_completed() and not marker.exists()
    assert task_states(state)["load"] == ["Completed"]
    assert result["rouge"]["finetuned"] == first["rouge"]["finetuned"]


def test_a_champion_whose_adapter_is_gone_is_dropped_and_the_run_goes_on(store):
    folder, _ = store
    champion = json.loads((folder / "registry" / "champion.json").read_text())
    shutil.rmtree(champion["adapter"]["folder"])
    state, result = run_flow(folder, train={"seed": 5}, generation={"max_new_tokens": 12})
    assert state.is_completed()
    assert "evaluate-champion" not in task_states(state)  # never re-scored, never retried
    assert (
        "is gone or changed in the store; the champion was dropped"
        in (result["decision"]["reason"])
    )
    now = json.loads((folder / "registry" / "champion.json").read_text())
    # no dangling pointer: the champion now is the candidate, complete in the store
    assert Path(now["adapter"]["folder"], "adapter_model.safetensors").is_file()
    assert list((folder / "registry" / "dropped").iterdir())
