"""The recipe search as a Prefect flow: candidates scored on validation rows carved from the
training split, the best one tested once, the decision an artifact; one pipeline definition."""

from __future__ import annotations

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from flows.sweep import sweep

pytestmark = pytest.mark.slow

# Two recipes that score differently on the tiny model's validation rows.
STILL = {"train": {"learning_rate": 1e-9}}
LOUD = {"train": {"learning_rate": 2e-3}}


def test_sweep_picks_the_better_candidate_on_validation(prefect_api, tmp_path):
    result = sweep(
        preset="tiny-cpu",
        overrides={"output_dir": str(tmp_path)},
        candidates=[LOUD, STILL],
        validation_size=6,
    )
    import json
    from pathlib import Path

    scores = {json.dumps(s["candidate"]): s["validation"] for s in result["candidates"]}
    assert len(set(scores.values())) == 2  # else this test could not tell them apart
    best = max(scores, key=scores.get)
    assert result["best"] == json.loads(best)
    # the test stage trained the best recipe, once, on the real train/test split
    settings = json.loads(Path(result["test"]["adapter"], "training_settings.json").read_text())
    assert settings["train"]["learning_rate"] == result["best"]["train"]["learning_rate"]
    # validation rows are carved from the training split: 22 fit rows, 6 scored
    runs = [(tmp_path / "sweep" / "runs" / f"{s['flow_run']}.json") for s in result["candidates"]]
    assert all(path.is_file() for path in runs)
    test = result["test"]
    assert test["rouge"]["finetuned"]["rougeL"] >= 0.0 and "sweep" in test["report"]
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["sweep"]))
        )
    assert (
        artifacts
        and "(best)" in artifacts[-1].data
        and '"learning_rate": 1e-09' in (artifacts[-1].data)
    )


def test_several_candidates_need_validation_rows(prefect_api, tmp_path):
    from finance_qlora.errors import ConfigError

    with pytest.raises(ConfigError, match="validation_size"):
        sweep(
            preset="tiny-cpu",
            overrides={"output_dir": str(tmp_path)},
            candidates=[LOUD, STILL],
            validation_size=0,
        )
