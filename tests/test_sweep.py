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
    # no gate in a recipe search: its adapters never become anyone's champion
    assert not (tmp_path / "sweep" / "registry").exists()
    assert not (tmp_path / "registry").exists() and not test["promoted"]
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


@pytest.mark.server
def test_sweep_fans_the_candidates_out_onto_a_work_pool(deployed, client, tmp_path):
    """`--deployment`: every candidate and the test stage run as deployment runs on a pool's
    worker, children of the sweep's run, and the sweep reads their summaries from the store."""
    import json
    import sys

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    from tests.conftest import cli, worker

    store = tmp_path / "store"
    with worker(deployed, "cpu-process", tmp_path / "worker.log"):
        done = cli(
            deployed,
            *(sys.executable, "-m", "flows.sweep", "--preset", "tiny-cpu"),
            *("--validation-size", "6", "--deployment", "finance-qlora/smoke-cpu"),
            *("--candidate", json.dumps(LOUD), "--candidate", json.dumps(STILL)),
            *("--set", f"output_dir={store}"),
            timeout=900,
        )
    printed = json.loads(done.stdout[: done.stdout.rindex("}") + 1])
    sweep_run = next(r for r in client.read_flow_runs() if r.id and r.parameters.get("deployment"))
    children = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[sweep_run.id])
        )
    )
    smoke = client.read_deployment_by_name("finance-qlora/smoke-cpu")
    assert len(children) == 3 and all(r.deployment_id == smoke.id for r in children)
    assert all(r.state.is_completed() for r in children)
    scores = {json.dumps(s["candidate"]): s["validation"] for s in printed["candidates"]}
    assert printed["best"] == json.loads(max(scores, key=scores.get))
    assert len(list((store / "sweep" / "runs").glob("*.json"))) == 3  # read by the sweep
