"""What a run tells people (tasks/progress.py): the run logger inside a flow or task run, a plain
logger elsewhere; a progress artifact that starts at 0 and advances in percent of the work."""

from __future__ import annotations

import logging
import uuid

from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterId
from prefect.runtime import flow_run, task_run

from tasks.progress import Progress, run_logger


def artifact(artifact_id):
    with get_client(sync_client=True) as client:
        (found,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(id=ArtifactFilterId(any_=[artifact_id]))
        )
    return found


def test_outside_a_run_the_logger_is_the_projects_own():
    assert run_logger() is logging.getLogger("finance_qlora")


def test_inside_a_run_the_logger_is_the_runs(prefect_api):
    @task
    def in_task():
        return run_logger().extra, str(task_run.id)

    @flow
    def in_flow():
        return run_logger().extra, str(flow_run.id), in_task()

    flow_extra, flow_id, (task_extra, task_id) = in_flow()
    assert flow_extra["flow_run_id"] == flow_id  # its records go to this run's logs
    assert task_extra["task_run_id"] == task_id


def test_progress_starts_at_zero_and_advances_in_percent(prefect_api):
    key = f"test-progress-{uuid.uuid4().hex[:8]}"

    @flow
    def work():
        progress = Progress(key, "Steps done")
        seen = [artifact(progress.id)]
        for done in (1, 2, 3):
            progress(done, 3)
            seen.append(artifact(progress.id))
        return seen

    seen = work()
    assert {(a.key, a.type, a.description) for a in seen} == {(key, "progress", "Steps done")}
    assert [a.data for a in seen] == [0.0, round(100 / 3, 1), round(200 / 3, 1), 100.0]


def test_progress_of_no_work_is_zero_not_an_error(prefect_api):
    @flow
    def nothing_to_do():
        progress = Progress(f"test-progress-{uuid.uuid4().hex[:8]}", "Questions answered")
        progress(0, 0)
        return artifact(progress.id).data

    assert nothing_to_do() == 0.0
