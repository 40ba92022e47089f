"""One identity per step: each task's cache key is the configuration it reads, the content of
its inputs and its own code, and nothing else. Each rule is checked through the flow against
one baseline run in a store: which steps are served from the cache, which run again."""

from __future__ import annotations

import pytest

import tasks.identity
from tests.test_flow import run_flow, task_states

pytestmark = pytest.mark.slow

MODEL_WORK = {"evaluate-pretrained", "train", "save-adapter", "evaluate-finetuned"}
ALL = {"load", "format", "compare"} | MODEL_WORK


@pytest.fixture(scope="module")
def store(prefect_api, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache-rules")
    state, _ = run_flow(folder)
    assert state.is_completed()
    return folder


def ran_again(state) -> set[str]:
    """The steps that computed instead of being served from the cache."""
    states = task_states(state)
    assert states["promote"] == ["Completed"]  # the gate always looks at the champion now
    assert all(s in (["Cached"], ["Completed"]) for s in states.values()), states
    return {step for step in ALL if states[step] == ["Completed"]}


def with_changed_source(monkeypatch, module: str) -> None:
    real = tasks.identity.module_source
    monkeypatch.setattr(
        tasks.identity,
        "module_source",
        lambda name: real(name) + (b"\n# edited\n" if name == module else b""),
    )


def test_same_everything_is_all_cached(store):
    state, result = run_flow(store)
    assert ran_again(state) == set()
    assert set(result["cached_steps"]) == ALL


def test_bootstrap_settings_rerun_only_compare(store):
    state, _ = run_flow(store, bootstrap={"resamples": 321})
    assert ran_again(state) == {"compare"}


def test_promotion_settings_rerun_only_the_gate(store):
    state, _ = run_flow(store, promotion={"min_delta": 0.5, "metric": "rouge1"})
    assert ran_again(state) == set()


def test_decoding_reruns_only_the_two_evaluations(store):
    state, _ = run_flow(store, generation={"max_new_tokens": 12})
    assert ran_again(state) == {"evaluate-pretrained", "evaluate-finetuned", "compare"}


def test_report_code_reruns_no_model_work(store, monkeypatch):
    with_changed_source(monkeypatch, "finance_qlora.report")
    state, _ = run_flow(store)
    assert ran_again(state) == {"compare"}


def test_training_code_retrains(store, monkeypatch):
    with_changed_source(monkeypatch, "finance_qlora.training")
    state, _ = run_flow(store)
    # the same seed retrains to the same bytes, so what follows is served by content
    redone = ran_again(state)
    assert "train" in redone and redone & {"load", "format"} == set()
    # the pretrained scores are redone only while evaluation's code reaches training's
    reaches = "finance_qlora.training" in tasks.identity.code_modules("tasks.evaluate")
    assert ("evaluate-pretrained" in redone) == reaches


def test_training_field_retrains_and_rescores(store):
    state, _ = run_flow(store, train={"learning_rate": 1e-3})
    assert ran_again(state) == {"train", "save-adapter", "evaluate-finetuned", "compare"}


def test_checkpoint_interval_is_not_identity(store):
    state, _ = run_flow(store, train={"checkpoint_steps": 3})
    assert ran_again(state) == set()


def test_vanished_or_changed_files_are_recomputed(store):
    from pathlib import Path

    from finance_qlora.store import Store, folder_manifest, manifest_digest

    _, result = run_flow(store)
    for folder in (store / "eval").iterdir():  # tamper with a file of every evaluation
        (folder / "predictions.csv").write_text("tampered\n")
    for item in Path(result["adapter"]).iterdir():  # and delete the adapter's files
        if item.name != "MANIFEST.json":
            item.unlink()
    state, again = run_flow(store)
    redone = ran_again(state)
    assert {"evaluate-pretrained", "evaluate-finetuned", "save-adapter"} <= redone
    assert {"load", "format", "train"}.isdisjoint(redone)
    assert again["rouge"] == result["rouge"] and again["adapter"] == result["adapter"]
    digest = manifest_digest(folder_manifest(Path(again["adapter"])))
    assert Store(str(store)).intact(again["adapter"], digest)
