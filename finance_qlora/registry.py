"""The champion registry: the best adapter so far, with its metrics, and the promotion gate.

<registry>/champion.json          which adapter is champion, its ROUGE and when
<registry>/adapters/<name>/       promoted adapters (copied, so run folders can be cleaned)
<registry>/decisions.jsonl        every gate decision, promoted or not
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel

from finance_qlora.files import atomic_dir

CHAMPION = "champion.json"


class Champion(BaseModel):
    adapter: Path
    metric: str
    score: float
    rouge: dict[str, float]
    promoted_at: str


class Decision(BaseModel):
    promoted: bool  # this run made the candidate champion
    is_champion: bool  # the candidate is champion after the decision (now or already)
    metric: str
    candidate: float
    champion: float | None  # None: there was no champion yet
    adapter: Path  # the champion adapter after the decision
    reason: str


def read_champion(registry: Path) -> Champion | None:
    path = registry / CHAMPION
    return Champion.model_validate_json(path.read_text()) if path.is_file() else None


def decide(
    candidate: dict[str, float], metric: str, champion: Champion | None, min_delta: float = 0.0
) -> tuple[bool, str]:
    """Promote only a strict improvement on `metric` (by more than `min_delta`)."""
    score = candidate[metric]
    if champion is None:
        return True, f"no champion yet; {metric} {score:.4f}"
    if champion.metric != metric:
        return True, f"champion was chosen on {champion.metric}; now judged on {metric}"
    if score > champion.score + min_delta:
        return True, f"{metric} {score:.4f} beats the champion's {champion.score:.4f}"
    return False, f"{metric} {score:.4f} does not beat the champion's {champion.score:.4f}"


def _write_json_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


def promote_if_better(
    adapter: Path, rouge: dict[str, float], metric: str, registry: Path, min_delta: float = 0.0
) -> Decision:
    registry.mkdir(parents=True, exist_ok=True)
    champion = read_champion(registry)
    kept = registry / "adapters" / adapter.name
    if champion is not None and champion.adapter == kept:
        # A re-run that reproduced the champion (same weights, same folder name).
        promoted, reason = False, "this adapter is already the champion"
    else:
        promoted, reason = decide(rouge, metric, champion, min_delta)
    if promoted:
        if not kept.exists():
            with atomic_dir(kept) as tmp:
                shutil.copytree(adapter, tmp, dirs_exist_ok=True)
        new = Champion(
            adapter=kept,
            metric=metric,
            score=rouge[metric],
            rouge=rouge,
            promoted_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        _write_json_atomically(registry / CHAMPION, new.model_dump_json(indent=2))
    decision = Decision(
        promoted=promoted,
        is_champion=promoted or champion.adapter == kept,
        metric=metric,
        candidate=rouge[metric],
        champion=champion.score if champion else None,
        adapter=kept if promoted else champion.adapter,
        reason=reason,
    )
    with open(registry / "decisions.jsonl", "a", encoding="utf-8") as log:
        log.write(
            json.dumps(
                {
                    "at": datetime.now(UTC).isoformat(timespec="seconds"),
                    **decision.model_dump(mode="json"),
                }
            )
            + "\n"
        )
    return decision
