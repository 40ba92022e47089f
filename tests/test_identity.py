"""The step identity and its persisted results (tasks/identity.py): only plain JSON of the
project's records is written or read back; anything else found under a key is removed, never
run, and the step recomputed."""

from __future__ import annotations

import json
import pickle

import pytest

from finance_qlora.records import EvalRecord
from finance_qlora.store import Store
from tasks.identity import RecordSerializer, drop_stale_result
from tasks.store_access import RESULTS, StoreRef


class Planted:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_the_serializer_writes_and_reads_records_only(tmp_path):
    serializer = RecordSerializer()
    record = EvalRecord(folder="x", fingerprint="f", label="a", rows=1, rouge={}, max_new_tokens=1)
    assert serializer.loads(serializer.dumps(record)) == record
    for other in ({"a": 1}, "text", Planted(str(tmp_path / "ran"))):
        with pytest.raises(TypeError, match="only finance-qlora records"):
            serializer.dumps(other)
    with pytest.raises(ValueError):
        serializer.loads(pickle.dumps(Planted(str(tmp_path / "ran"))))
    with pytest.raises(ValueError):
        serializer.loads(json.dumps({"record": "Popen", "data": {}}).encode())
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("binary", [True, False])
def test_a_planted_result_is_removed_unexecuted(tmp_path, binary):
    """A pickle (raw bytes, or Prefect's JSON wrapper naming the pickle serializer) planted in
    the shared results folder: removed at the next lookup, its code never run."""
    store = StoreRef(url=str(tmp_path / "store"))
    marker = tmp_path / "ran"
    blob = pickle.dumps(Planted(str(marker)))
    if not binary:
        import base64

        blob = json.dumps(
            {
                "metadata": {"serializer": {"type": "pickle"}},
                "result": base64.b64encode(blob).decode(),
            }
        ).encode()
    folder = Store(store.url)
    folder.fs.makedirs(folder.path(RESULTS), exist_ok=True)
    folder.fs.pipe_file(folder.path(RESULTS, "k"), blob)
    drop_stale_result(store, "eval", "k")
    assert not folder.fs.exists(folder.path(RESULTS, "k"))
    assert not marker.exists()


# Code identity ---------------------------------------------------------------------------------
STEPS = ("load", "format", "train", "save_adapter", "evaluate", "compare")


@pytest.mark.parametrize("step", STEPS)
def test_each_steps_code_covers_the_modules_its_code_imports(step):
    """Checked against Python's own import, in a fresh interpreter: every project module that
    importing the step's module loads is in its identity (function-level imports come on top)."""
    import subprocess
    import sys

    from tasks.identity import code_modules
    from tests.conftest import ROOT

    script = (
        f"import sys, tasks.{step}; "
        "print('\\n'.join(m for m in sys.modules if m.startswith('finance_qlora')))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert loaded and set(loaded) <= set(code_modules(f"tasks.{step}"))


def test_the_model_steps_cover_what_the_review_found_missing():
    from tasks.identity import code_modules

    train, evaluate = code_modules("tasks.train"), code_modules("tasks.evaluate")
    for module in ("packing", "prompts", "quantized", "batching", "training", "modeling"):
        assert f"finance_qlora.{module}" in train
    for module in ("quantized", "generation", "rouge", "evaluate_modules.finance_rouge"):
        assert f"finance_qlora.{module}" in evaluate  # the last one is loaded by its path


def train_key(**changes):
    from finance_qlora.config import LoraSettings, ModelConfig, TrainSettings
    from finance_qlora.records import PromptRecord
    from tasks.train import train

    prompts = PromptRecord(
        folder="p", fingerprint="f", train_rows=1, test_rows=1, template="t", train_sha256="s"
    )
    settings = TrainSettings().model_copy(update=changes)
    inputs = {"store": None, "prompts": prompts, "model": ModelConfig(), "lora": LoraSettings()}
    return train.cache_policy.key(inputs | {"settings": settings})


def other_value(name: str):
    """A valid value other than the default, for any TrainSettings field."""
    from typing import Literal, get_args, get_origin

    from finance_qlora.config import TrainSettings, transformers_choices

    info = TrainSettings.model_fields[name]
    default = info.get_default(call_default_factory=True)
    choices = {"lr_scheduler": transformers_choices()[0], "optimizer": transformers_choices()[1]}
    if name in choices:
        return next(c for c in choices[name] if c != default)
    if get_origin(info.annotation) is Literal:
        return next(c for c in get_args(info.annotation) if c != default)
    if isinstance(default, bool):
        return not default
    if default is None:
        return 8
    if isinstance(default, int):
        return default + 1
    if isinstance(default, float):
        return default / 2
    raise AssertionError(f"no other value known for train.{name}: teach other_value")


def train_fields():
    from finance_qlora.config import TrainSettings

    return sorted(TrainSettings.model_fields)


@pytest.mark.parametrize("name", train_fields())
def test_every_training_field_outside_not_identity_retrains(name):
    from finance_qlora.config import TrainSettings
    from tasks.identity import NOT_IDENTITY

    changed = TrainSettings.model_validate(
        TrainSettings().model_dump() | {name: other_value(name)}
    )  # validated: a value the field accepts
    retrains = train_key(**{name: getattr(changed, name)}) != train_key()
    assert retrains == (name not in NOT_IDENTITY["TrainSettings"])


def test_library_versions_and_the_gpu_class_are_in_the_model_steps_keys(monkeypatch):
    import torch

    import tasks.identity

    before = train_key()
    versions = dict(tasks.identity.result_libraries("tasks.train"))
    assert {"torch", "transformers", "trl", "peft"} <= set(versions)
    monkeypatch.setattr(
        tasks.identity, "result_libraries", lambda entry: versions | {"torch": "9.9"}
    )
    assert train_key() != before
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (7, 5))
    t4 = tasks.identity.runtime(
        "tasks.train", __import__("finance_qlora.config").config.ModelConfig()
    )
    assert (t4["gpu"], t4["dtype"]) == ("Tesla T4", "float16")
    assert train_key() != before


def test_the_fields_that_never_retrain_are_the_reviewed_ones():
    """Adding a field here means an edit of it serves old adapters: a decision for review,
    not a side effect (the rule test above takes NOT_IDENTITY as given)."""
    from tasks.identity import NOT_IDENTITY

    # compile_cache: where compiled layers are kept; a graph from the store is the graph the
    # worker would compile (torch checks each graph's key at the lookup)
    assert NOT_IDENTITY["TrainSettings"] == {"checkpoint_steps", "loader_workers", "compile_cache"}
    assert NOT_IDENTITY["ModelConfig"] == {"hf_token_secret", "reuse_quantized"}
