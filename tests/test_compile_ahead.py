"""The train step's layers compiled ahead in a side process (train.compile_ahead): a shallow copy
of the model compiles the graphs the train step then finds in the worker's caches; a side
process that fails or is stopped costs nothing but the overlap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from finance_qlora import compile_ahead, compile_cache
from finance_qlora.config import ModelConfig
from finance_qlora.files import write_jsonl
from finance_qlora.presets import resolve_config
from finance_qlora.prompts import to_prompt_completion
from tests.conftest import make_rows
from tests.test_compile_cache import ROOT, needs_cc

COMPILED = {"compile": True, "checkpoint_steps": 0}

# One training run in a new process (a worker's train step) on the model folder given; its
# inductor graph lookups as the last line.
WORKER = """
import json, sys
from pathlib import Path
from finance_qlora import compile_cache
from finance_qlora.presets import resolve_config
from finance_qlora.training import train_adapter
prompts, out, model = sys.argv[1:4]
config = resolve_config("tiny-cpu", {"model": {"name": model}, "train": json.loads(sys.argv[4])})
train_adapter(Path(prompts), config.model, config.lora, config.train, Path(out))
print(json.dumps(compile_cache.graph_lookups()))
"""


@pytest.fixture
def own_temp(tmp_path, monkeypatch) -> Path:
    """Side processes' folders under this test's own temporary folder."""
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    return temp


def side_folders(temp: Path) -> list[Path]:
    return list(temp.glob("finance-qlora-ahead-*"))


def train_rows(tmp_path: Path) -> Path:
    prompts = tmp_path / "train.jsonl"
    write_jsonl(prompts, [to_prompt_completion(r) for r in make_rows(8)])
    return prompts


def deeper_tiny_llama(folder: Path, layers: int) -> str:
    """The builtin tiny Llama with `layers` layers (random weights), saved with its tokenizer:
    deeper than the side process's shallow copy."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from finance_qlora import builtin_models

    source = builtin_models.resolve("builtin:tiny-llama")
    config = AutoConfig.from_pretrained(source)
    config.num_hidden_layers = layers
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return str(folder)


@pytest.mark.slow
@needs_cc
def test_the_shallow_copys_graphs_serve_a_deeper_models_train_step(tmp_path, own_temp, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    prompts = train_rows(tmp_path)
    model = deeper_tiny_llama(tmp_path / "deep", layers=2 * compile_ahead.SHALLOW_LAYERS + 1)
    config = resolve_config("tiny-cpu", {"model": {"name": model}, "train": COMPILED})
    key = compile_cache.entry_key(config.model, config.lora, config.train)

    compile_ahead.start(key, prompts, config.model, config.lora, config.train, dict(os.environ))
    compiled, line = compile_ahead.join(key)
    assert compiled, line
    assert " 0 graphs compiled" not in line  # its cache started empty: it compiled
    assert side_folders(own_temp) == []  # its shallow copy is gone with it

    done = subprocess.run(
        [
            sys.executable,
            "-c",
            WORKER,
            str(prompts),
            str(tmp_path / "out"),
            model,
            json.dumps(COMPILED),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lookups = json.loads(done.stdout.strip().splitlines()[-1])
    assert lookups["hits"] > 0 and lookups["misses"] == 0  # nothing left to compile


def test_a_side_process_that_fails_is_one_line_and_leaves_nothing(tmp_path, own_temp):
    config = resolve_config("tiny-cpu", {"train": COMPILED})
    missing = ModelConfig(name=str(tmp_path / "no-such-model"))
    rows = train_rows(tmp_path)
    compile_ahead.start("k", rows, missing, config.lora, config.train, dict(os.environ))
    compiled, line = compile_ahead.join("k")
    assert not compiled
    assert line.startswith("compiling ahead failed (") and line.endswith("); compiling here")
    assert "no-such-model" in line and "\n" not in line
    assert compile_ahead.join("k") is None  # joined once
    assert side_folders(own_temp) == []


def test_a_stopped_side_process_is_gone_with_its_folder(tmp_path, own_temp):
    config = resolve_config("tiny-cpu", {"train": COMPILED})
    args = (train_rows(tmp_path), config.model, config.lora, config.train, dict(os.environ))
    compile_ahead.start("k", *args)
    process = compile_ahead._running["k"].process
    compile_ahead.start("k", *args)  # one a key: the running one stays
    assert compile_ahead._running["k"].process is process and len(side_folders(own_temp)) == 1
    compile_ahead.stop("k")
    assert process.poll() is not None  # stopped, not left running
    assert side_folders(own_temp) == []
    assert compile_ahead.join("k") is None


@pytest.mark.slow
@needs_cc
def test_the_flow_compiles_the_layers_beside_the_pretrained_evaluation(
    prefect_api, tmp_path, own_temp, monkeypatch
):
    import torch._dynamo
    from torch._dynamo.utils import counters

    from tests.test_flow import run_flow, sent_logs

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()  # this process's train step traces afresh, as a new worker's does
    counters.clear()
    store = tmp_path / "store"
    state, _ = run_flow(store, train={"compile": True})
    assert state.is_completed()
    logs = sent_logs(flow_run_id=state.state_details.flow_run_id)
    (line,) = [m for m in logs if m.startswith("layers compiled ahead in a side process")]
    assert " 0 graphs compiled" not in line  # the side process compiled them
    lookups = compile_cache.graph_lookups()
    assert lookups["hits"] > 0 and lookups["misses"] == 0  # the train step found them all

    # a rerun serves every step from the cache: the side process it started is stopped
    state, _ = run_flow(store, train={"compile": True})
    assert state.is_completed() and side_folders(own_temp) == []
    assert compile_ahead._running == {}
