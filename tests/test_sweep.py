"""The recipe search as a Prefect flow: candidates scored on validation rows carved from the
training split, the best one tested once, the decision an artifact; one pipeline definition."""

from __future__ import annotations

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from flows.sweep import sweep

pytestmark = pytest.mark.slow

# A learning rate too small to move the random tiny model keeps its (near zero, but not zero)
# pretrained ROUGE; a large one turns its answers into one repeated token, scoring zero.
STILL = {"train": {"learning_rate": 1e-9}}
LOUD = {"train": {"learning_rate": 2e-3}}


def test_sweep_picks_the_better_candidate_on_validation(prefect_api, tmp_path):
    result = sweep(
        preset="tiny-cpu",
        overrides={"output_dir": str(tmp_path)},
        candidates=[LOUD, STILL],
        validation_size=6,
    )
    scores = {str(s["candidate"]): s["validation"] for s in result["candidates"]}
    assert scores[str(STILL)] > scores[str(LOUD)]
    assert result["best"] == STILL
    # validation rows are carved from the training split: 22 fit rows, 6 scored
    runs = [
        (tmp_path / "sweep" / "runs" / f"{s['flow_run']}.json") for s in result["candidates"]
    ]
    assert all(path.is_file() for path in runs)
    test = result["test"]
    assert test["rouge"]["finetuned"]["rougeL"] >= 0.0 and "sweep" in test["report"]
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["sweep"]))
        )
    assert artifacts and "(best)" in artifacts[-1].data and '"learning_rate": 1e-09' in (
        artifacts[-1].data
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
