"""Step 2: both splits as Alpaca prompt/completion pairs (one template for every step)."""

from __future__ import annotations

from prefect import task

from finance_qlora.prompts import write_prompts
from finance_qlora.records import PromptRecord, SplitRecord
from tasks.identity import StepIdentity, step_key
from tasks.store_access import StoreRef, local, publish, store_of


@task(name="format", cache_policy=StepIdentity(kind="prompts", entry=__name__))
def format_prompts(store: StoreRef, splits: SplitRecord) -> PromptRecord:
    key = step_key()
    staging = store_of(store).staging("prompts", key) / "prompts"
    return publish(store, write_prompts(local(store, splits), staging), "prompts", key)
