"""Step 5: the versioned adapter folder (weights, tokenizer, settings, metrics) in the store."""

from __future__ import annotations

import json

from prefect import task

from finance_qlora.adapter import save_adapter as write_adapter
from finance_qlora.config import LoraSettings, ModelConfig, TrainSettings
from finance_qlora.records import AdapterRecord, DataVersion, PromptRecord, TrainRecord
from tasks.identity import StepIdentity, step_key
from tasks.secrets import hf_token
from tasks.store_access import StoreRef, local, publish, store_of


@task(
    name="save-adapter",
    # The prompts only for which rows were trained on: the train split's fingerprint.
    cache_policy=StepIdentity(
        kind="adapters",
        entry=__name__,
        uses={"prompts": lambda p: p.train_sha256},
    ),
)
def save_adapter(
    store: StoreRef,
    trained: TrainRecord,
    model: ModelConfig,
    lora: LoraSettings,
    settings: TrainSettings,
    source: DataVersion,
    prompts: PromptRecord,
) -> AdapterRecord:
    # What made the weights, and nothing else: evaluation or gate settings never make a new
    # adapter. Adapters are immutable: one folder per key, kept whatever the gate decides.
    made_by = {
        "model": model.model_dump(mode="json", exclude={"hf_token_secret"}),
        "lora": lora.model_dump(mode="json"),
        "train": settings.model_dump(mode="json"),
        "data_version": source.version,
    }
    key = step_key()
    staging = store_of(store).staging("adapters", key) / "adapter"
    record = write_adapter(
        local(store, trained),
        model,
        made_by,
        staging,
        token=hf_token(model.hf_token_secret, model.name),
        trained_rows=json.loads(local(store, prompts).row_ids_path.read_text())["train"],
    )
    return publish(store, record, "adapters", key)
