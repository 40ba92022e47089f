"""The promotion gate: a candidate must beat the pretrained model and the champion, both on the
same test rows, the champion only on rows it never trained on, by a paired-bootstrap interval.

Scores come per row from each evaluation's predictions.parquet (the test prompts' order), row
ids from the prompts' rows.json, the champion's training rows from its train_rows.json."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from pydantic import BaseModel

from finance_qlora.bootstrap import Interval, paired_bootstrap
from finance_qlora.config import BootstrapSettings, PromotionSettings


class VersusChampion(BaseModel):
    """The candidate against the champion on the test rows the champion never trained on."""

    rows: int  # test rows both are compared on
    excluded: int  # test rows the champion trained on, left out
    candidate: float  # mean on those rows
    champion: float
    delta: Interval  # candidate minus champion, paired bootstrap over those rows
    confidence: float


def read_row_ids(prompts_dir: Path, split: str) -> list[str]:
    return json.loads((Path(prompts_dir) / "rows.json").read_text())[split]


def read_trained_rows(adapter_dir: Path) -> set[str] | None:
    """The ids an adapter trained on; None for an adapter that did not record them."""
    path = Path(adapter_dir) / "train_rows.json"
    return set(json.loads(path.read_text())) if path.is_file() else None


def read_scores(eval_dir: Path, metric: str) -> list[float]:
    return pd.read_parquet(Path(eval_dir) / "predictions.parquet", columns=[metric])[
        metric
    ].tolist()


def versus_champion(
    test_ids: list[str],
    candidate: list[float],
    champion: list[float],
    champion_trained: set[str],
    bootstrap: BootstrapSettings,
) -> VersusChampion:
    """Both models' per-row scores restricted to the rows the champion never trained on."""
    if not len(test_ids) == len(candidate) == len(champion):
        raise ValueError("test ids and both models' scores must cover the same rows")
    keep = [i for i, row in enumerate(test_ids) if row not in champion_trained]
    a, b = [champion[i] for i in keep], [candidate[i] for i in keep]
    if keep:
        delta = paired_bootstrap(
            a, b, bootstrap.resamples, bootstrap.confidence, bootstrap.seed
        ).delta
    else:
        delta = Interval(mean=0.0, low=0.0, high=0.0)
    return VersusChampion(
        rows=len(keep),
        excluded=len(test_ids) - len(keep),
        candidate=sum(b) / len(b) if b else 0.0,
        champion=sum(a) / len(a) if a else 0.0,
        delta=delta,
        confidence=bootstrap.confidence,
    )


def decide(
    metric: str,
    candidate: float,
    delta: Interval,
    settings: PromotionSettings,
    versus: VersusChampion | None = None,
    unscorable: str | None = None,
) -> tuple[bool, str]:
    """Promote or not, and why in words. `delta`: candidate minus pretrained; `versus`: the
    comparison with the champion (None: no champion); `unscorable`: why the champion cannot be
    scored here (it is then kept unless `settings.replace_unscorable`)."""
    if settings.beat_pretrained and delta.low <= 0.0:
        return False, (
            f"{metric} {candidate:.4f} does not beat the pretrained model: the delta "
            f"{delta.mean:+.4f} has a 95% interval [{delta.low:+.4f}, {delta.high:+.4f}] "
            "that is not above zero"
        )
    if unscorable is not None:
        if settings.replace_unscorable:
            return True, (
                f"the champion cannot be scored here ({unscorable}); replaced, as "
                "promotion.replace_unscorable says"
            )
        return False, (
            f"the champion cannot be scored here ({unscorable}); kept (set "
            "promotion.replace_unscorable=true to replace it)"
        )
    if versus is None:
        beaten = (
            "beats the pretrained model"
            if settings.beat_pretrained
            else "(pretrained not required)"
        )
        return True, f"no champion yet; {metric} {candidate:.4f} {beaten}"
    rows = (
        f"the {versus.rows} test rows it never trained on ({versus.excluded} of "
        f"{versus.rows + versus.excluded} left out)"
    )
    if versus.rows < settings.min_rows:
        return False, (
            f"the champion was re-scored on {rows}: fewer than promotion.min_rows "
            f"{settings.min_rows}, so it is kept"
        )
    d = versus.delta
    interval = (
        f"the paired difference {d.mean:+.4f} has a {versus.confidence:.0%} interval "
        f"[{d.low:+.4f}, {d.high:+.4f}]"
    )
    scores = f"{metric} {versus.candidate:.4f} vs the champion's {versus.champion:.4f}"
    if d.low > settings.min_delta:
        return True, f"{scores}, re-scored on {rows}: {interval} above {settings.min_delta}"
    return False, (
        f"{scores}, re-scored on {rows}: {interval}, not above {settings.min_delta}; champion kept"
    )
