"""Steps 3 and 6: one evaluation task, run for the pretrained model, the fine-tuned one and,
at the gate, the champion adapter on the same prompts."""

from __future__ import annotations

from prefect import task

from finance_qlora.config import (
    DeviceSettings,
    EvaluationSettings,
    GenerationSettings,
    ModelConfig,
)
from finance_qlora.evaluation import evaluate_model
from finance_qlora.parallel import process_count
from finance_qlora.records import AdapterRecord, EvalRecord, PromptRecord
from tasks.identity import StepIdentity, runtime, step_key
from tasks.progress import Progress
from tasks.retries import GPU_RETRIES, GPU_RETRY_DELAY_S, retry_unless_bad_input
from tasks.secrets import hf_token
from tasks.store_access import StoreRef, local, publish, store_of


@task(
    name="evaluate",
    task_run_name="evaluate-{label}",
    # Evaluation reads the test prompts only: new training rows alone do not re-score.
    cache_policy=StepIdentity(
        kind="eval", entry=__name__, uses={"prompts": lambda p: p.test_sha256}
    ),
    retries=GPU_RETRIES,
    retry_delay_seconds=GPU_RETRY_DELAY_S,
    retry_condition_fn=retry_unless_bad_input,
)
def evaluate(
    label: str,
    store: StoreRef,
    prompts: PromptRecord,
    model: ModelConfig,
    generation: GenerationSettings,
    evaluation: EvaluationSettings,
    adapter: AdapterRecord | None = None,
    devices: DeviceSettings | None = None,
) -> EvalRecord:
    key = step_key()
    staging = store_of(store).staging("eval", key) / "eval"
    record = evaluate_model(
        local(store, prompts).test_path,
        model,
        generation,
        staging,
        label,
        adapter_dir=local(store, adapter).path if adapter else None,
        token=hf_token(model.hf_token_secret, model.name),
        on_progress=Progress(f"generate-{label}", f"Answers generated ({label})"),
        evaluation=evaluation,
        processes=process_count(devices or DeviceSettings()),
    )
    # what the scores were computed with, for the gate's protocol (the key holds the same)
    record.runtime = {**runtime(__name__, model), **record.runtime}
    return publish(store, record, "eval", key)
