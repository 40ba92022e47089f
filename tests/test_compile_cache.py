"""Compiled layers kept in the store (train.compile_cache="store"): a worker with empty compile
caches finds the graphs another worker compiled, and only where the store is trusted."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from finance_qlora import compile_cache
from finance_qlora.config import LoraSettings, ModelConfig, TrainSettings
from finance_qlora.files import write_jsonl
from finance_qlora.prompts import to_prompt_completion
from finance_qlora.store import MANIFEST
from tasks.compiled_layers import TRUST_ENV, SharedLayers
from tasks.identity import identity
from tasks.store_access import StoreRef
from tests.conftest import make_rows

ROOT = Path(__file__).resolve().parents[1]
needs_cc = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None,
    reason="inductor needs a C compiler on the CPU",
)

# One training run in a fresh process (a new worker) with compiled layers, as the train task
# runs it: the kept file loaded where there is one, else written after training; then
# inductor's graph lookups of that process as its last line.
WORKER = """
import json, sys
from pathlib import Path
from finance_qlora import compile_cache
from finance_qlora.presets import resolve_config
from finance_qlora.training import train_adapter
prompts, out, kept = sys.argv[1:4]
config = resolve_config("tiny-cpu", {"train": {"compile": True, "checkpoint_steps": 0}})
loaded = compile_cache.load(Path(kept)) if kept else 0
train_adapter(Path(prompts), config.model, config.lora, config.train, Path(out),
              save_compiled=Path(kept) if kept and not loaded else None)
print(json.dumps(compile_cache.graph_lookups()))
"""


def worker(tmp_path: Path, name: str, prompts: Path, compiled: Path | None) -> dict[str, int]:
    """Train in a new process whose inductor cache starts empty; its graph lookups."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{name}")}
    done = subprocess.run(
        [sys.executable, "-c", WORKER, str(prompts), str(tmp_path / name), str(compiled or "")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@needs_cc
def test_a_new_worker_finds_the_layers_another_compiled(tmp_path):
    prompts = tmp_path / "train.jsonl"
    write_jsonl(prompts, [to_prompt_completion(r) for r in make_rows(8)])
    artifacts = tmp_path / "kept" / compile_cache.ARTIFACTS

    first = worker(tmp_path, "first", prompts, artifacts)
    assert first["misses"] > 0  # compiled: its caches were empty
    assert artifacts.is_file()  # and what it compiled is written for the next worker

    written = artifacts.read_bytes()
    second = worker(tmp_path, "second", prompts, artifacts)
    assert second == {"hits": first["misses"], "misses": 0}  # nothing compiled again
    assert artifacts.read_bytes() == written  # an existing file is only read

    alone = worker(tmp_path, "alone", prompts, None)  # the same worker without the file
    assert alone["misses"] > 0


def test_an_unreadable_file_compiles_instead(tmp_path, caplog):
    damaged = tmp_path / compile_cache.ARTIFACTS
    damaged.write_bytes(b"not torch's artifacts")
    assert compile_cache.load(damaged) == 0
    assert compile_cache.load(tmp_path / "missing.bin") == 0
    assert "compiling them" in caplog.text
    assert "Traceback" not in caplog.text  # one line, not torch's traceback


def test_the_store_entry_follows_the_layers_graph_not_the_schedule():
    model, lora, train = ModelConfig(), LoraSettings(), TrainSettings(compile=True)
    key = compile_cache.entry_key(model, lora, train)
    weekly = train.model_copy(update={"learning_rate": 1e-4, "rows_per_step": 32, "seed": 1})
    assert compile_cache.entry_key(model, lora, weekly) == key
    for other in (
        (model.model_copy(update={"name": "other"}), lora, train),
        (model, lora, train.model_copy(update={"dequantize": "never"})),
        (model, lora.model_copy(update={"r": 8}), train),
        (model, lora, train.model_copy(update={"padding_free": True})),
        (model, lora, train, 2),  # data-parallel ranks
    ):
        assert compile_cache.entry_key(*other) != key


def test_the_store_entry_follows_the_projects_code_and_libraries(monkeypatch):
    key = compile_cache.entry_key(ModelConfig(), LoraSettings(), TrainSettings(compile=True))
    monkeypatch.setattr(compile_cache, "project_code", lambda: "another packing.py")
    assert compile_cache.entry_key(ModelConfig(), LoraSettings(), TrainSettings()) != key
    monkeypatch.undo()
    versions = compile_cache.environment()
    monkeypatch.setattr(compile_cache, "environment", lambda: versions | {"torch": "9.9"})
    assert compile_cache.entry_key(ModelConfig(), LoraSettings(), TrainSettings()) != key


def test_where_compiled_layers_are_kept_is_not_part_of_the_adapters_identity():
    kept = TrainSettings(compile=True, compile_cache="store")
    assert identity(kept) == identity(TrainSettings(compile=True))


def shared_layers(ref, monkeypatch, trusted=True, cache="store"):
    if trusted:
        monkeypatch.setenv(TRUST_ENV, "1")
    else:
        monkeypatch.delenv(TRUST_ENV, raising=False)
    train = TrainSettings(compile=True, compile_cache=cache)
    log = logging.getLogger("test")
    return SharedLayers.open(ref, ModelConfig(), LoraSettings(), train, log)


def test_a_store_copy_of_no_use_is_compiled_again_and_replaced(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    ref = StoreRef(url=str(tmp_path / "store"))
    shared = shared_layers(ref, monkeypatch)
    assert shared.target is not None and not shared.replace  # none there yet
    shared.target.write_bytes(b"not torch's artifacts")  # as training would write them
    assert shared.keep(logging.getLogger("test"))
    entry = tmp_path / "store" / compile_cache.KIND / shared.key

    # the next worker cannot load it (another torch, say): compiles, and replaces it
    again = shared_layers(ref, monkeypatch)
    assert again.loaded == 0 and again.replace and again.target != shared.target
    assert "of no use here" in caplog.text
    again.target.write_bytes(b"compiled again")
    assert again.keep(logging.getLogger("test"))
    assert (entry / compile_cache.ARTIFACTS).read_bytes() == b"compiled again"
    assert sorted(p.name for p in entry.iterdir()) == sorted([compile_cache.ARTIFACTS, MANIFEST])


def test_only_a_run_that_asks_on_a_worker_that_trusts_its_store_reads_it(
    tmp_path, monkeypatch, caplog
):
    ref = StoreRef(url=str(tmp_path / "store"))
    assert shared_layers(ref, monkeypatch, cache="worker") is None
    assert shared_layers(ref, monkeypatch, trusted=False) is None
    assert "FINANCE_QLORA_TRUST_STORE=1" in caplog.text
    assert not (tmp_path / "store" / compile_cache.KIND).exists()


def test_nothing_written_leaves_nothing_staged(tmp_path, monkeypatch):
    ref = StoreRef(url=str(tmp_path / "store"))
    shared = shared_layers(ref, monkeypatch)
    assert not shared.keep(logging.getLogger("test"))
    assert not shared.target.parent.exists()
    assert not (tmp_path / "store" / compile_cache.KIND).exists()


@pytest.mark.slow
@needs_cc
def test_the_train_step_keeps_compiled_layers_in_the_store_only_when_told(
    prefect_api, tmp_path, monkeypatch
):
    from tests.test_flow import run_flow, sent_logs

    monkeypatch.setenv(TRUST_ENV, "1")
    store, told = tmp_path / "store", {"compile": True, "compile_cache": "store"}
    state, _ = run_flow(store, train=told)
    assert state.is_completed()
    (entry,) = (store / compile_cache.KIND).iterdir()
    assert (entry / MANIFEST).is_file()
    written = (entry / compile_cache.ARTIFACTS).read_bytes()
    assert written

    # the next run on other rows trains again, with them loaded from the store
    state, _ = run_flow(store, train=told, data={"seed": 7})
    assert state.is_completed()
    messages = sent_logs(flow_run_id=state.state_details.flow_run_id)
    loaded = [m for m in messages if m.endswith("artifacts loaded from the store")]
    assert loaded and int(loaded[0].split()[2]) > 0
    assert [p.name for p in (store / compile_cache.KIND).iterdir()] == [entry.name]
    assert (entry / compile_cache.ARTIFACTS).read_bytes() == written

    # by default, or on a worker that does not trust its store, the store's copy is never
    # read (it is code) and nothing is written there
    def refuse(path):
        raise AssertionError(f"read {path}")

    load = compile_cache.load
    monkeypatch.setattr(compile_cache, "load", refuse)
    for name, train in (("default", {"compile": True}), ("untrusted", told)):
        if name == "untrusted":
            monkeypatch.delenv(TRUST_ENV)
        other = tmp_path / name
        shutil.copytree(store / compile_cache.KIND, other / compile_cache.KIND)
        state, _ = run_flow(other, train=train, data={"seed": 8})
        assert state.is_completed()
        assert [p.name for p in (other / compile_cache.KIND).iterdir()] == [entry.name]

    # data-parallel ranks keep their layers under an entry of their own (their graphs may
    # differ from one process's: an entry that loads but serves nothing is never replaced)
    monkeypatch.setattr(compile_cache, "load", load)
    monkeypatch.setenv(TRUST_ENV, "1")
    state, _ = run_flow(store, train=told, data={"seed": 9}, devices={"cpu_processes": 2})
    assert state.is_completed()
    entries = {p.name for p in (store / compile_cache.KIND).iterdir()}
    assert entry.name in entries and len(entries) == 2
    assert (entry / compile_cache.ARTIFACTS).read_bytes() == written
