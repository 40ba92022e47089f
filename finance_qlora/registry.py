"""The champion registry in the durable store, and the promotion gate.

<store>/registry/champion.json          the champion: its adapter, scores and protocol
<store>/registry/decisions/<time>.json  every gate decision, promoted or not

Adapters are immutable folders in the store (`<store>/adapters/<name>/`, manifest last); the
champion file points at one and is written last, in one put, so an interrupted write never
becomes the champion.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from pydantic import BaseModel

from finance_qlora.bootstrap import Interval
from finance_qlora.records import AdapterRecord
from finance_qlora.store import Store

CHAMPION = ("registry", "champion.json")


class Protocol(BaseModel):
    """What a score was measured on: scores are comparable only when all of this is equal."""

    test_sha256: str  # the test prompts
    template: str  # the prompt template (sha256 of its text)
    generation: dict  # decoding settings
    base_model: str  # name@revision
    data_version: str  # the data the adapter was trained and tested on


class Champion(BaseModel):
    adapter: AdapterRecord
    metric: str
    score: float  # on `protocol`'s test prompts, when promoted
    rouge: dict[str, float]
    protocol: Protocol
    promoted_at: str


class Decision(BaseModel):
    promoted: bool
    metric: str
    candidate: float
    pretrained: float
    delta: Interval  # candidate minus pretrained, with its bootstrap interval
    champion: float | None  # the champion on the candidate's prompts; None: no champion
    candidate_adapter: str
    adapter: str | None  # the champion adapter after the decision; None: still no champion
    reason: str
    protocol: Protocol


def read_champion(store: Store) -> Champion | None:
    text = store.read_text(*CHAMPION)
    return Champion.model_validate_json(text) if text else None


def decide(
    metric: str,
    candidate: float,
    delta: Interval,
    champion: float | None,
    min_delta: float = 0.0,
    beat_pretrained: bool = True,
) -> tuple[bool, str]:
    """A candidate must beat the pretrained model (its delta interval above zero) and the
    champion, scored on the same prompts, by more than `min_delta`."""
    if beat_pretrained and delta.low <= 0.0:
        return False, (
            f"{metric} {candidate:.4f} does not beat the pretrained model: the delta "
            f"{delta.mean:+.4f} has a 95% interval [{delta.low:+.4f}, {delta.high:+.4f}] "
            "that is not above zero"
        )
    if champion is None:
        beaten = (
            "beats the pretrained model"
            if beat_pretrained
            else "(promotion.beat_pretrained is off: the pretrained model need not be beaten)"
        )
        return True, f"no champion yet; {metric} {candidate:.4f} {beaten}"
    if candidate > champion + min_delta:
        return True, (
            f"{metric} {candidate:.4f} beats the champion's {champion:.4f} on the same prompts"
            + (f" by more than {min_delta}" if min_delta else "")
        )
    return False, (
        f"{metric} {candidate:.4f} does not beat the champion's {champion:.4f} on the same "
        "prompts" + (f" by more than {min_delta}" if min_delta else "")
    )


def record_decision(
    store: Store,
    decision: Decision,
    candidate: AdapterRecord,
    rouge: dict[str, float],
) -> None:
    """Write the decision, then (if promoted) the champion pointer, last, and only once the
    adapter it points at is complete in the store."""
    if decision.promoted and not store.intact(candidate.folder, candidate.fingerprint):
        raise RuntimeError(f"adapter {candidate.folder} is incomplete in the store; not promoted")
    now = datetime.now(UTC)
    name = f"{now.strftime('%Y%m%dT%H%M%S%f')}-{uuid.uuid4().hex[:8]}.json"  # sorts by time
    store.write_text(decision.model_dump_json(indent=2), "registry", "decisions", name)
    if decision.promoted:
        champion = Champion(
            adapter=candidate,
            metric=decision.metric,
            score=decision.candidate,
            rouge=rouge,
            protocol=decision.protocol,
            promoted_at=now.isoformat(timespec="seconds"),
        )
        store.write_text(champion.model_dump_json(indent=2), *CHAMPION)


def decisions(store: Store) -> list[Decision]:
    names = [n for n in store.listdir("registry", "decisions") if n.endswith(".json")]
    return [
        Decision.model_validate_json(store.read_text("registry", "decisions", n) or "{}")
        for n in names
    ]
