"""The promotion gate: a candidate must beat the pretrained model and the champion, the champion
re-scored on the candidate's test prompts and compared only on rows it never trained on."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from finance_qlora.config import BootstrapSettings, PromotionSettings
from finance_qlora.gate import (
    VersusChampion,
    decide,
    read_row_ids,
    read_scores,
    read_trained_rows,
    versus_champion,
)
from finance_qlora.records import AdapterRecord, ComparisonRecord, EvalRecord, PromptRecord
from finance_qlora.registry import Champion, Decision, Protocol, record_decision
from tasks.store_access import StoreRef, local, store_of

PROMOTED_EVENT = "finance-qlora.champion.promoted"


@task(name="promote", cache_policy=NO_CACHE)  # never cached: the champion changes between runs
def promote(
    store: StoreRef,
    adapter: AdapterRecord,
    finetuned: EvalRecord,
    comparison: ComparisonRecord,
    champion: Champion | None,
    champion_eval: EvalRecord | None,
    prompts: PromptRecord,
    settings: PromotionSettings,
    bootstrap: BootstrapSettings,
    protocol: Protocol,
    unscorable: str | None = None,
    note: str | None = None,
) -> Decision:
    """`champion_eval`: the champion on these prompts (None: no champion, or `unscorable`
    says why it cannot be scored); `note`: what happened to the registry first (a champion
    dropped), said in the decision."""
    metric = settings.metric
    delta = comparison.rouge[metric].delta
    versus: VersusChampion | None = None
    if champion is not None and champion.adapter.fingerprint == adapter.fingerprint:
        promoted, reason = False, "this adapter is already the champion"
    else:
        if champion is not None and champion_eval is not None and unscorable is None:
            trained = read_trained_rows(local(store, champion.adapter).path)
            if trained is None:
                unscorable = "its adapter does not record which rows it trained on"
            else:
                versus = versus_champion(
                    read_row_ids(local(store, prompts).path, "test"),
                    read_scores(local(store, finetuned).path, metric),
                    read_scores(local(store, champion_eval).path, metric),
                    trained,
                    bootstrap,
                )
        promoted, reason = decide(
            metric, finetuned.rouge[metric], delta, settings, versus, unscorable
        )
    if note:
        reason = f"{note}; {reason}"
    kept = champion.adapter.folder if champion else None
    decision = Decision(
        promoted=promoted,
        metric=metric,
        candidate=finetuned.rouge[metric],
        pretrained=comparison.rouge[metric].pretrained.mean,
        delta=delta,
        champion=versus.champion if versus else None,
        candidate_adapter=adapter.folder,
        adapter=adapter.folder if promoted else kept,
        reason=reason,
        protocol=protocol,
        versus_champion=versus,
    )
    record_decision(store_of(store), decision, adapter, finetuned.rouge)
    if promoted:  # after the champion file is written: whoever reacts reads the new one
        announce_promotion(store, adapter, decision, finetuned.rouge)
    create_markdown_artifact(decision_markdown(decision), key="promotion", description="Gate")
    return decision


def announce_promotion(
    store: StoreRef, adapter: AdapterRecord, decision: Decision, rouge: dict[str, float]
) -> None:
    """The `finance-qlora.champion.promoted` event: deployments triggered by it (answer-standing
    in prefect.yaml) get the adapter and its store from the payload."""
    emit_event(
        event=PROMOTED_EVENT,
        resource={
            "prefect.resource.id": f"finance-qlora.adapter.{adapter.fingerprint}",
            "prefect.resource.name": adapter.folder,
        },
        payload={
            "adapter": adapter.folder,
            "fingerprint": adapter.fingerprint,
            "store": store.url,
            "store_secret": store.secret,
            "metric": decision.metric,
            "score": decision.candidate,
            "rouge": rouge,
            "data_version": decision.protocol.data_version,
        },
    )


def decision_markdown(decision: Decision) -> str:
    versus = decision.versus_champion
    rows = [
        f"| pretrained | {decision.pretrained:.4f} | all test rows |",
        f"| candidate | {decision.candidate:.4f} (delta {decision.delta.mean:+.4f}, 95% "
        f"[{decision.delta.low:+.4f}, {decision.delta.high:+.4f}]) | all test rows |",
    ]
    if versus is not None:
        d = versus.delta
        rows += [
            f"| candidate | {versus.candidate:.4f} | {versus.rows} rows the champion never "
            "trained on |",
            f"| champion before | {versus.champion:.4f} | the same {versus.rows} rows |",
            f"| candidate - champion | {d.mean:+.4f}, {versus.confidence:.0%} "
            f"[{d.low:+.4f}, {d.high:+.4f}] | paired bootstrap over those rows |",
        ]
    else:
        rows.append("| champion before | not compared | |")
    return "\n".join(
        [
            f"## {'Promoted' if decision.promoted else 'Kept the champion'}",
            "",
            f"Scored on the same {decision.protocol.test_sha256[:12]} test prompts "
            f"(data {decision.protocol.data_version}).",
            "",
            f"| model | {decision.metric} | rows |",
            "|---|---|---|",
            *rows,
            "",
            f"{decision.reason}.",
            "",
            f"Champion: `{decision.adapter}`",
        ]
    )
