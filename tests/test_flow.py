"""The whole flow on `tiny-cpu` through Prefect: real 4-bit QLoRA, generation and ROUGE."""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

import flows.finetune as finetune_module
from finance_qlora.rouge import METRICS
from tests.conftest import final_task_runs, task_run_states

pytestmark = pytest.mark.slow

STEPS = {"load", "format", "evaluate-pretrained", "train", "save-adapter", "evaluate-finetuned"}


def run_flow(output_dir: Path, **overrides):
    state = finetune_module.finetune(
        preset="tiny-cpu",
        overrides={"output_dir": str(output_dir), **overrides},
        return_state=True,
    )
    return state, state.result()


def sent_logs(flow_run_id=None, task_run_id=None) -> list[str]:
    """Log messages of a run, read from the API after the background log sender is drained
    (logs are sent in batches, so the newest may still be on their way)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterTaskRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    log_filter = LogFilter(
        flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]) if flow_run_id else None,
        task_run_id=LogFilterTaskRunId(any_=[task_run_id]) if task_run_id else None,
    )
    with get_client(sync_client=True) as client:
        return [log.message for log in client.read_logs(log_filter=log_filter)]


def task_states(flow_state) -> dict[str, list[str]]:
    with get_client(sync_client=True) as client:
        return task_run_states(client, flow_state.state_details.flow_run_id)


FROZEN_AT_COMPARE: list[int] = []  # objects the collections skipped while the flow compared


@pytest.fixture(scope="module")
def first_run(prefect_api, tmp_path_factory):
    import tasks.compare

    compare = tasks.compare.compare

    def compare_noting_the_heap(*args, **kwargs):
        FROZEN_AT_COMPARE.append(gc.get_freeze_count())
        return compare(*args, **kwargs)

    output_dir = tmp_path_factory.mktemp("flow")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tasks.compare, "compare", compare_noting_the_heap)
        state, result = run_flow(output_dir)
    return output_dir, state, result


def test_flow_completes_every_step(first_run):
    _, state, _ = first_run
    assert state.is_completed()
    states = task_states(state)
    assert STEPS <= set(states)
    assert all(s == ["Completed"] for s in states.values()), states


def test_the_flow_keeps_the_heap_it_began_with_out_of_its_collections(first_run):
    """finance_qlora.heap: a task outside any model's scope (compare) runs with the objects
    alive at the flow's start frozen; none stay frozen once the flow has ended."""
    assert len(FROZEN_AT_COMPARE) == 1 and FROZEN_AT_COMPARE[0] > 100_000
    assert gc.get_freeze_count() == 0


def test_the_report_is_in_the_run_logs(first_run):
    _, state, _ = first_run
    messages = sent_logs(flow_run_id=state.state_details.flow_run_id)
    assert len([m for m in messages if m.startswith("## Pretrained vs fine-tuned ROUGE")]) == 1


def test_adapter_files_load_with_peft(first_run):
    from peft import PeftConfig

    _, _, result = first_run
    adapter = Path(result["adapter"])
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "training_settings.json",
        "training_metrics.json",
    ):
        assert (adapter / name).is_file(), name
    config = PeftConfig.from_pretrained(str(adapter))
    assert sorted(config.target_modules) == ["q_proj", "v_proj"]
    assert config.base_model_name_or_path == "builtin:tiny-llama"  # no machine's own path
    assert not list(adapter.parent.glob(".tmp-*"))  # nothing half-written left behind
    settings = json.loads((adapter / "training_settings.json").read_text())
    assert set(settings) == {"model", "lora", "train", "data_version"}  # what made the weights


def test_rouge_records_have_four_metrics_in_range(first_run):
    _, _, result = first_run
    for label in ("pretrained", "finetuned"):
        scores = result["rouge"][label]
        assert set(scores) == set(METRICS)
        assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert Path(result["report"]).read_text().startswith("## Pretrained vs fine-tuned ROUGE")


def test_both_evaluations_saw_byte_identical_prompts(first_run):
    output_dir, _, _ = first_run
    tables = [pd.read_parquet(p) for p in sorted(output_dir.glob("eval/*/predictions.parquet"))]
    assert len(tables) == 2
    assert tables[0]["prompt"].tolist() == tables[1]["prompt"].tolist()
    assert tables[0]["reference"].tolist() == tables[1]["reference"].tolist()


def test_second_run_is_served_from_cache(first_run):
    output_dir, first_state, first_result = first_run
    state, result = run_flow(output_dir)
    assert state.is_completed()
    states = task_states(state)
    assert all(states[step] == ["Cached"] for step in STEPS | {"compare"}), states
    assert states["promote"] == ["Completed"]  # the gate always looks at the current champion
    assert not result["promoted"] and first_result["promoted"]  # it already is champion
    assert result["decision"]["reason"] == "this adapter is already the champion"
    assert set(result["cached_steps"]) == STEPS | {"compare"}
    for key in ("adapter", "champion", "table", "data_version", "train_losses"):
        assert result[key] == first_result[key]
    assert first_result["rouge"]["champion"] is None  # there was none before the first run
    assert result["rouge"] == {
        **first_result["rouge"],
        "champion": first_result["rouge"]["finetuned"],
    }
    assert any(
        m.startswith(f"no new data since {result['data_version']}; champion unchanged")
        for m in sent_logs(flow_run_id=state.state_details.flow_run_id)
    )


def test_deleted_adapter_is_recomputed_not_served(first_run):
    output_dir, _, first_result = first_run
    shutil.rmtree(first_result["adapter"])
    state, result = run_flow(output_dir)
    states = task_states(state)
    # its cached result pointed at a folder that is gone: dropped, and the step ran again
    assert states["save-adapter"] == ["Completed"]
    assert states["train"] == ["Cached"]
    assert Path(result["adapter"], "adapter_model.safetensors").is_file()
    for label in ("pretrained", "finetuned"):
        assert result["rouge"][label] == first_result["rouge"][label]


def test_transient_failure_is_retried(prefect_api, tmp_path, monkeypatch):
    import tasks.train

    real = tasks.train.train_adapter
    calls = []

    def fail_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA error: injected fault")
        return real(*args, **kwargs)

    monkeypatch.setattr(tasks.train, "train_adapter", fail_once)
    monkeypatch.setattr(
        finetune_module, "train", finetune_module.train.with_options(retry_delay_seconds=0)
    )
    state, _ = run_flow(tmp_path)
    assert state.is_completed()
    assert len(calls) == 2
    with get_client(sync_client=True) as client:
        runs = final_task_runs(client, state.state_details.flow_run_id)
    train_run = next(r for r in runs if r.name.startswith("train"))
    assert train_run.run_count == 2 and train_run.state.name == "Completed"


def test_bad_input_fails_fast_and_is_not_retried(prefect_api, tmp_path, write_rows):
    from prefect import flow

    from finance_qlora.config import DataConfig
    from finance_qlora.files import fingerprint
    from finance_qlora.records import DataVersion
    from tasks.load import load_splits
    from tasks.store_access import StoreRef

    path = write_rows([{"instruction": "Q", "input": "", "answer": "A"}] * 3)
    # The flow checks its input before any task runs ...
    state = finetune_module.finetune(
        preset="tiny-cpu",
        overrides={"output_dir": str(tmp_path), "data": {"dataset": str(path)}},
        return_state=True,
    )
    assert state.is_failed() and "missing column(s) output" in state.message
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
            )
        )
    assert runs == []

    # ... and the load task itself, which retries hub trouble, does not retry bad data.
    @flow
    def load_only():
        source = DataVersion(source=str(path), version=f"sha256:{fingerprint(path)}")
        store = StoreRef(url=str(tmp_path))
        return load_splits(store, DataConfig(dataset=str(path)), source, "hf-token")

    state = load_only(return_state=True)
    assert state.is_failed()
    with get_client(sync_client=True) as client:
        runs = final_task_runs(client, state.state_details.flow_run_id)
    assert [(r.run_count, r.state.name) for r in runs] == [(1, "Failed")]
    assert load_splits.retries == 3


def test_first_run_promotes_its_adapter(first_run):
    output_dir, _, result = first_run
    assert result["promoted"] and result["champion"] == result["adapter"]
    champion = json.loads((output_dir / "registry" / "champion.json").read_text())
    assert champion["adapter"]["folder"] == result["adapter"]
    assert champion["protocol"]["data_version"] == result["data_version"]
    assert Path(result["champion"], "adapter_model.safetensors").is_file()


def test_a_losing_adapter_is_kept_and_the_champion_unchanged(prefect_api, tmp_path):
    """The champion is re-scored on the candidate's prompts; the loser stays in the store
    (adapters are immutable) and nothing a run did not create is ever removed."""
    _, first = run_flow(tmp_path)
    before = (tmp_path / "registry" / "champion.json").read_bytes()
    state, second = run_flow(tmp_path, train={"seed": 7}, promotion={"min_delta": 1.0})
    assert state.is_completed()
    assert task_states(state)["evaluate-champion"] == ["Cached"]  # same prompts as run 1
    assert not second["promoted"] and second["champion"] == first["adapter"]
    assert second["adapter"] != first["adapter"]
    assert Path(second["adapter"], "adapter_model.safetensors").is_file()
    assert Path(first["adapter"], "adapter_model.safetensors").is_file()
    assert (tmp_path / "registry" / "champion.json").read_bytes() == before
    decisions = sorted((tmp_path / "registry" / "decisions").glob("*.json"))
    assert [json.loads(p.read_text())["promoted"] for p in decisions] == [True, False]


def test_hf_token_never_reaches_logs_or_artifacts(prefect_api, tmp_path, monkeypatch, redaction):
    """The token really is logged inside the run, by the run logger and by a library logger
    sending to the API (as PREFECT_LOGGING_EXTRA_LOGGERS does), and is redacted in both."""
    import logging

    from prefect.blocks.system import Secret
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogHandler

    import tasks.train
    from finance_qlora.builtin_models import resolve

    token = "hf_TestToken0123456789abcdefXYZ"
    Secret(value=token).save("hf-token-test", overwrite=True)
    library = logging.getLogger("huggingface_hub.finance_qlora_test")
    to_api = APILogHandler()
    library.addHandler(to_api)
    real = tasks.train.train_adapter

    def leaky(*args, **kwargs):
        assert kwargs["token"] == token  # what a hub download would send
        tasks.train.get_run_logger().warning("retrying the download with token %s", token)
        library.warning(f"401 Client Error for Authorization: Bearer {kwargs['token']}")
        return real(*args, **kwargs)

    monkeypatch.setattr(tasks.train, "train_adapter", leaky)
    # a local model folder is not "builtin:", so the token is looked up and passed on
    model = {"name": resolve("builtin:tiny-llama"), "hf_token_secret": "hf-token-test"}
    try:
        state, result = run_flow(tmp_path, model=model)
    finally:
        library.removeHandler(to_api)
    assert state.is_completed()
    flow_run_id = state.state_details.flow_run_id
    messages = sent_logs(flow_run_id=flow_run_id)
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    assert any("Hugging Face token from Secret block 'hf-token-test'" in m for m in messages)
    assert "retrying the download with token ***" in messages
    assert "401 Client Error for Authorization: Bearer ***" in messages
    assert not [m for m in messages if token in m]
    assert artifacts and not [a for a in artifacts if token in json.dumps(a.data, default=str)]
    saved = [p.read_text(errors="ignore") for p in tmp_path.rglob("*") if p.is_file()]
    assert not [text for text in saved if token in text]


def test_retried_training_resumes_from_its_checkpoint(prefect_api, tmp_path, monkeypatch):
    """A fault after a checkpoint: Prefect retries the train task, which resumes from it and
    ends with the same adapter as an uninterrupted run of the same seed."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    import tasks.train

    class FailAtStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise RuntimeError("CUDA error: injected fault at step 5")

    checkpoints = {"train": {"checkpoint_steps": 2}}
    _, whole = run_flow(tmp_path / "whole", **checkpoints)

    real, calls = tasks.train.train_adapter, []

    def crash_once(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs, callbacks=[FailAtStep()] if len(calls) == 1 else [])

    monkeypatch.setattr(tasks.train, "train_adapter", crash_once)
    monkeypatch.setattr(
        finetune_module, "train", finetune_module.train.with_options(retry_delay_seconds=0)
    )
    state, resumed = run_flow(tmp_path / "resumed", **checkpoints)
    assert state.is_completed() and len(calls) == 2
    assert resumed["train_losses"] == pytest.approx(whole["train_losses"], rel=1e-4)

    with get_client(sync_client=True) as client:
        runs = final_task_runs(client, state.state_details.flow_run_id)
        train_run = next(r for r in runs if r.name.startswith("train"))
    assert train_run.run_count == 2
    messages = sent_logs(task_run_id=train_run.id)
    assert any("injected fault at step 5" in m for m in messages)
    assert "resumed from the checkpoint at step 4" in messages
    # the step counter carried on: steps 1-4 before the fault, 5-14 after the retry, none twice
    steps = [m.split()[1] for m in messages if m.startswith("step ")]
    assert steps == [f"{i}/14" for i in range(1, 15)]

    a = load_file(Path(whole["adapter"], "adapter_model.safetensors"))
    b = load_file(Path(resumed["adapter"], "adapter_model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)
