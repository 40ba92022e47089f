"""The promotion gate: a candidate must beat the pretrained model and the champion, both scored
on the candidate's test prompts, before it becomes champion."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from finance_qlora.config import PromotionSettings
from finance_qlora.records import AdapterRecord, ComparisonRecord, EvalRecord
from finance_qlora.registry import Champion, Decision, Protocol, decide, record_decision
from tasks.store_access import StoreRef, store_of


@task(name="promote", cache_policy=NO_CACHE)  # never cached: the champion changes between runs
def promote(
    store: StoreRef,
    adapter: AdapterRecord,
    finetuned: EvalRecord,
    comparison: ComparisonRecord,
    champion: Champion | None,
    champion_eval: EvalRecord | None,
    settings: PromotionSettings,
    protocol: Protocol,
) -> Decision:
    metric = settings.metric
    delta = comparison.rouge[metric].delta
    if champion is not None and champion.adapter.fingerprint == adapter.fingerprint:
        promoted, reason = False, "this adapter is already the champion"
        champion_score = finetuned.rouge[metric]
    else:
        champion_score = champion_eval.rouge[metric] if champion_eval else None
        promoted, reason = decide(
            metric,
            finetuned.rouge[metric],
            delta,
            champion_score,
            settings.min_delta,
            settings.beat_pretrained,
        )
        if champion is not None and champion_eval is None:
            reason += f" (the champion was trained on {champion.protocol.base_model}; it cannot "
            reason += "be scored with this base model)"
    decision = Decision(
        promoted=promoted,
        metric=metric,
        candidate=finetuned.rouge[metric],
        pretrained=comparison.rouge[metric].pretrained.mean,
        delta=delta,
        champion=champion_score,
        candidate_adapter=adapter.folder,
        adapter=adapter.folder if promoted else champion.adapter.folder if champion else None,
        reason=reason,
        protocol=protocol,
    )
    record_decision(store_of(store), decision, adapter, finetuned.rouge)
    create_markdown_artifact(decision_markdown(decision), key="promotion", description="Gate")
    return decision


def decision_markdown(decision: Decision) -> str:
    champion = "none" if decision.champion is None else f"{decision.champion:.4f}"
    return "\n".join(
        [
            f"## {'Promoted' if decision.promoted else 'Kept the champion'}",
            "",
            f"All three scored on the same {decision.protocol.test_sha256[:12]} test prompts "
            f"(data {decision.protocol.data_version}).",
            "",
            f"| model | {decision.metric} |",
            "|---|---|",
            f"| pretrained | {decision.pretrained:.4f} |",
            f"| candidate | {decision.candidate:.4f} (delta {decision.delta.mean:+.4f}, 95% "
            f"[{decision.delta.low:+.4f}, {decision.delta.high:+.4f}]) |",
            f"| champion before | {champion} |",
            "",
            f"{decision.reason}.",
            "",
            f"Champion: `{decision.adapter}`",
        ]
    )
