"""The promotion gate: the new adapter becomes champion only if it beats the current one."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from finance_qlora.config import PromotionSettings
from finance_qlora.records import AdapterRecord, EvalRecord
from finance_qlora.registry import Decision, promote_if_better


@task(name="promote")  # never cached: the champion changes between runs
def promote(
    finetuned: EvalRecord, adapter: AdapterRecord, settings: PromotionSettings, registry: Path
) -> Decision:
    decision = promote_if_better(
        adapter.folder, finetuned.rouge, settings.metric, registry, settings.min_delta
    )
    before = "none" if decision.champion is None else f"{decision.champion:.4f}"
    create_markdown_artifact(
        f"## {'Promoted' if decision.promoted else 'Kept the champion'}\n\n"
        f"| | {settings.metric} |\n|---|---|\n| this run | {decision.candidate:.4f} |\n"
        f"| champion before | {before} |\n\n{decision.reason}.\n\n"
        f"Champion: `{decision.adapter}`",
        key="promotion",
        description="Promotion gate decision",
    )
    create_link_artifact(
        decision.adapter.resolve().as_uri(),
        link_text=str(decision.adapter),
        key="adapter",
        description="The champion adapter after this run",
    )
    return decision
