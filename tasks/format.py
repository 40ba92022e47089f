"""Step 2: both splits as Alpaca prompt/completion pairs (one template for every step)."""

from __future__ import annotations

from prefect import task

from finance_qlora.prompts import write_prompts
from finance_qlora.records import PromptRecord, SplitRecord
from tasks.common import CACHE_POLICY


@task(name="format", cache_policy=CACHE_POLICY, persist_result=True)
def format_prompts(splits: SplitRecord) -> PromptRecord:
    return write_prompts(splits, splits.folder.parent / "prompts")
