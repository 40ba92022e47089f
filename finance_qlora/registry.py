"""The champion registry in the durable store, and the promotion gate.

<store>/registry/champion.json          the champion: its adapter, scores and protocol
<store>/registry/decisions/<time>.json  every gate decision, promoted or not
<store>/registry/dropped/<time>.json    champion pointers set aside (their adapter was gone)

Adapters are immutable folders in the store (`<store>/adapters/<name>/`, manifest last); the
champion file points at one and is written last, in one put, so an interrupted write never
becomes the champion.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from pydantic import BaseModel, ValidationError

from finance_qlora.bootstrap import Interval
from finance_qlora.errors import FinanceQLoRAError
from finance_qlora.gate import VersusChampion
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
    # How the rows were split: seed, sizes, which rows were scored (test or validation).
    split: dict = {}
    # The model as it was run: name, revision, quantization, the resolved compute dtype and
    # whether the 4-bit weights were dequantized.
    model: dict = {}
    # Library versions and GPU class the scores were computed with.
    runtime: dict = {}


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
    champion: float | None  # the champion on the rows compared; None: not compared
    candidate_adapter: str
    adapter: str | None  # the champion adapter after the decision; None: still no champion
    reason: str
    protocol: Protocol
    # The candidate against the champion on the test rows the champion never trained on.
    versus_champion: VersusChampion | None = None


class RegistryError(FinanceQLoRAError):
    """An object of the registry is not what it should be: one line naming it."""


def _load(model: type[BaseModel], store: Store, *parts: str, fix: str):
    text = store.read_text(*parts)
    if text is None:
        return None
    try:
        return model.model_validate_json(text)
    except (ValidationError, ValueError):
        raise RegistryError(
            f"{store.uri(*parts)} is not a {model.__name__.lower()} record (damaged or "
            f"edited); {fix}"
        ) from None


def read_champion(store: Store) -> Champion | None:
    return _load(
        Champion,
        store,
        *CHAMPION,
        fix="restore it (each promotion's decision in registry/decisions names the adapter) "
        "or delete it to go on without a champion",
    )


def live_champion(store: Store) -> tuple[Champion | None, str | None]:
    """The champion, if its adapter is still complete in the store. One whose adapter is gone
    or changed is set aside (moved to registry/dropped/) and the gate decides without it; the
    second value says so, for the decision."""
    champion = read_champion(store)
    if champion is None or store.intact(champion.adapter.folder, champion.adapter.fingerprint):
        return champion, None
    name = _timestamped(datetime.now(UTC))
    store.write_text(champion.model_dump_json(indent=2), "registry", "dropped", name)
    store.fs.rm_file(store.path(*CHAMPION))
    return None, (
        f"the champion's adapter {champion.adapter.folder} is gone or changed in the store; "
        f"the champion was dropped (registry/dropped/{name})"
    )


def _timestamped(now: datetime) -> str:
    return f"{now.strftime('%Y%m%dT%H%M%S%f')}-{uuid.uuid4().hex[:8]}.json"  # sorts by time


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
    store.write_text(decision.model_dump_json(indent=2), "registry", "decisions", _timestamped(now))
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
    fix = "move it out of registry/decisions (it is a record, not used by the gate)"
    return [_load(Decision, store, "registry", "decisions", n, fix=fix) for n in names]
