"""The weekly retraining as users deploy it: a real `prefect server start`, a process worker,
`prefect deployment run`, and one durable store (a real S3 endpoint, or a file:// URL) shared
by two "containers" (separate working folders, PREFECT_HOME and model caches).

Week 1 promotes; week 2 (same data) is served from the cache and keeps the champion; week 3
(the data file grew) retrains, re-scores the champion on the new test prompts and decides."""

from __future__ import annotations

import json

import pytest

from finance_qlora.store import Store
from tests.conftest import make_rows, run_deployment, task_run_states, worker

pytestmark = [pytest.mark.server, pytest.mark.slow]

STEPS = {
    "load",
    "format",
    "evaluate-pretrained",
    "train",
    "save-adapter",
    "evaluate-finetuned",
    "compare",
}


def container(env: dict, folder) -> dict:
    folder.mkdir()
    return {
        **env,
        "PREFECT_HOME": str(folder / "prefect-home"),
        "FINANCE_QLORA_CACHE": str(folder / "cache"),
        "TMPDIR": str(folder),
    }


def put_rows(store: Store, rows: list[dict]) -> str:
    store.write_text("".join(json.dumps(r) + "\n" for r in rows), "incoming", "rows.jsonl")
    return store.uri("incoming", "rows.jsonl")


@pytest.fixture(params=["s3", "file"])
def where(request, tmp_path):
    """The store's URL and the environment that reaches it (credentials, endpoint)."""
    if request.param == "s3":
        env = request.getfixturevalue("s3_endpoint")
        return request.getfixturevalue("bucket") + "/finance-qlora", env
    return f"file://{tmp_path}/store", {}


def test_three_weeks_on_one_store(deployed, client, where, tmp_path):
    url, store_env = where
    store = Store(url)  # this test process reaches the store as the workers do
    a = container({**deployed, **store_env}, tmp_path / "container-a")
    b = container({**deployed, **store_env}, tmp_path / "container-b")
    data = put_rows(store, make_rows(60))
    params = {"overrides": {"output_dir": url, "data": {"dataset": data}}}

    def week(env, name):
        with worker(env, "cpu-process", tmp_path / f"{name}.log"):
            run = run_deployment(env, "finance-qlora/smoke-cpu", params, client)
        assert run.state.is_completed(), (tmp_path / f"{name}.log").read_text()[-4000:]
        return run, task_run_states(client, run.id)

    # Week 1, in container A: everything computed, the adapter promoted.
    run1, states1 = week(a, "week-1")
    assert all(states1[step] == ["Completed"] for step in STEPS), states1
    champion1 = json.loads(store.read_text("registry", "champion.json"))
    assert champion1["protocol"]["data_version"].startswith("sha256:")

    # Week 2, in container B: same data, so every step is served from the store's cache.
    run2, states2 = week(b, "week-2")
    assert all(states2[step] == ["Cached"] for step in STEPS), states2
    assert states2["promote"] == ["Completed"] and "evaluate-champion" not in states2
    assert json.loads(store.read_text("registry", "champion.json")) == champion1
    logs = [log.message for log in client.read_logs()]
    version = champion1["protocol"]["data_version"]
    assert f"no new data since {version}; champion unchanged" in logs

    # Week 3: the data file grew. New version, new split: retrain, re-score the champion on
    # the new test prompts, and decide on identical prompts.
    put_rows(store, make_rows(90))
    run3, states3 = week(b, "week-3")
    assert states3["load"] == ["Completed"] and states3["train"] == ["Completed"]
    assert states3["evaluate-champion"] == ["Completed"]
    decisions = sorted(store.listdir("registry", "decisions"))
    assert len(decisions) == 3
    last = json.loads(store.read_text("registry", "decisions", decisions[-1]))
    assert last["protocol"]["data_version"] != version and last["champion"] is not None
    champion3 = json.loads(store.read_text("registry", "champion.json"))
    assert champion3["adapter"]["folder"] == (
        last["candidate_adapter"] if last["promoted"] else champion1["adapter"]["folder"]
    )
    # Prefect's persisted results live in the store, not in a container's PREFECT_HOME
    assert len(store.listdir("prefect-results")) >= len(STEPS)
    for env in (a, b):
        assert not list((tmp_path / env["PREFECT_HOME"] / "storage").glob("*"))
