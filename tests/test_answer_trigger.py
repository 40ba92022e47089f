"""Re-answered on promotion, against a real `prefect server start` and a process worker: the
promote step's finance-qlora.champion.promoted event starts the answer-standing deployment of
prefect.yaml (its trigger as written, on the CPU pool here), which answers the standing
questions with the promoted adapter; a run that promotes nothing starts nothing."""

from __future__ import annotations

import time

import pytest
import yaml

from finance_qlora.files import read_jsonl
from finance_qlora.registry import read_champion
from finance_qlora.store import Store
from tasks.promote import PROMOTED_EVENT
from tests.conftest import ROOT, cli, run_deployment, worker

pytestmark = [pytest.mark.server, pytest.mark.slow]

NAME = "answer-standing-cpu"
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def deploy_on_the_cpu_pool(env, tmp_path) -> None:
    """prefect.yaml's answer-standing entry, trigger and parameters unchanged, on the process
    pool and this checkout (the GPU pool's template asks for a GPU)."""
    project = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (entry,) = [d for d in project["deployments"] if d["name"] == "answer-standing"]
    entry |= {
        "name": NAME,
        "work_pool": {"name": "cpu-process", "work_queue_name": "default"},
        "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}],
    }
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump({**project, "deployments": [entry]}))
    cli(env, "prefect", "--no-prompt", "deploy", "--prefect-file", str(path), "-n", NAME)


def answer_runs(client, store: str) -> list:
    deployment = client.read_deployment_by_name(f"finance-qlora-answer/{NAME}")
    runs = client.read_flow_runs()
    return [
        r for r in runs if r.deployment_id == deployment.id and r.parameters["output_dir"] == store
    ]


def events(client, **filters) -> list:
    from prefect.events.filters import EventFilter

    return client.read_events(filter=EventFilter(**filters), limit=50).events


def wait_for(check, what: str, deadline_s: float = 600):
    deadline = time.monotonic() + deadline_s
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(2)


def test_a_promotion_answers_the_standing_questions(deployed, client, tmp_path):
    from prefect.events.filters import EventNameFilter, EventRelatedFilter

    deploy_on_the_cpu_pool(deployed, tmp_path)
    store = str(tmp_path / "store")
    params = {"overrides": {"output_dir": store}}
    log = tmp_path / "worker.log"
    with worker(deployed, "cpu-process", log):
        week1 = run_deployment(deployed, "finance-qlora/smoke-cpu", params, client)
        assert week1.state.is_completed(), log.read_text()[-4000:]
        (answered,) = wait_for(
            lambda: [r for r in answer_runs(client, store) if r.state.type.value in FINAL],
            "the answer-standing run",
        )
        assert answered.state.is_completed(), log.read_text()[-4000:]
        # Week 2: the same data, the same adapter, no promotion
        week2 = run_deployment(deployed, "finance-qlora/smoke-cpu", params, client)
        assert week2.state.is_completed(), log.read_text()[-4000:]

    champion = read_champion(Store(store))
    assert answered.parameters["adapter"] == champion.adapter.folder
    assert answered.parameters["questions"] == "deployments/standing-questions.jsonl"
    (folder,) = (tmp_path / "store" / "answers").iterdir()
    standing = read_jsonl(ROOT / "deployments" / "standing-questions.jsonl")
    answers = read_jsonl(folder / "answers.jsonl")
    assert [a["id"] for a in answers] == [q["id"] for q in standing]
    assert all(a["new_tokens"] > 0 for a in answers)

    # Once week 2's promote step is recorded as done, its events are in: no promotion event,
    # and still only the one answer-standing run.
    def promote_done():
        return [
            e
            for e in events(
                client,
                event=EventNameFilter(name=["prefect.task-run.Completed"]),
                related=EventRelatedFilter(id=[f"prefect.flow-run.{week2.id}"]),
            )
            if e.resource.get("prefect.resource.name", "").startswith("promote")
        ]

    wait_for(promote_done, "week 2's promote step in the events", 120)
    promoted = events(client, event=EventNameFilter(name=[PROMOTED_EVENT]))
    ours = [e for e in promoted if e.payload["store"] == store]
    assert [e.payload["adapter"] for e in ours] == [champion.adapter.folder]
    assert ours[0].payload["rouge"] == champion.rouge
    assert len(answer_runs(client, store)) == 1
