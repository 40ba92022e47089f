"""Steps 3 and 6: one evaluation task, run for the pretrained and the fine-tuned model."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from finance_qlora.config import GenerationSettings, ModelConfig
from finance_qlora.evaluation import evaluate_model
from finance_qlora.records import AdapterRecord, EvalRecord, PromptRecord
from tasks.common import (
    CACHE_POLICY,
    GPU_RETRIES,
    GPU_RETRY_DELAY_S,
    Progress,
    hf_token,
    retry_unless_bad_input,
    step_dir,
)


@task(
    name="evaluate",
    task_run_name="evaluate-{label}",
    cache_policy=CACHE_POLICY,
    persist_result=True,
    retries=GPU_RETRIES,
    retry_delay_seconds=GPU_RETRY_DELAY_S,
    retry_condition_fn=retry_unless_bad_input,
)
def evaluate(
    label: str,
    prompts: PromptRecord,
    model: ModelConfig,
    generation: GenerationSettings,
    output_dir: Path,
    adapter: AdapterRecord | None = None,
) -> EvalRecord:
    adapter_id = adapter.fingerprint if adapter else None
    out = step_dir(output_dir, "eval", prompts.fingerprint, model, generation, adapter_id)
    return evaluate_model(
        prompts.test_path,
        model,
        generation,
        out,
        label,
        adapter_dir=adapter.folder if adapter else None,
        token=hf_token(model.hf_token_secret, model.name),
        on_progress=Progress(f"generate-{label}", f"Answers generated ({label})"),
    )
