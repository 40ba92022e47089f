"""Deployments against a real `prefect server start` on 127.0.0.1 (SQLite), a real process
worker and `prefect deployment run --watch`; the server and worker stop even when a test fails."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import task_run_states

ROOT = Path(__file__).resolve().parents[1]
POOLS = ROOT / "deployments" / "work-pools"
STEPS = {"load", "format", "evaluate-pretrained", "train", "save-adapter", "evaluate-finetuned"}

pytestmark = [pytest.mark.server, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real Prefect server; yields the environment for CLI calls against it."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOCAL_STORAGE_PATH": str(home / "storage"),
    }
    log = open(home / "server.log", "w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health", timeout=2)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(
                        f"prefect server did not start:\n{(home / 'server.log').read_text()}"
                    )
                time.sleep(1)
        yield env
    finally:
        _stop(process)
        log.close()


def cli(env, *args: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(
        args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def client(server):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: server["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            yield client


@pytest.fixture(scope="module")
def deployed(server):
    cli(server, "bash", "deployments/create-pools.sh", "process")
    cli(server, "prefect", "--no-prompt", "deploy", "--all")
    return server


def _render(pool) -> dict:
    """What a worker does with a pool's template: fill placeholders with the variables'
    defaults."""
    from prefect.utilities.templating import apply_values

    variables = pool.base_job_template["variables"]["properties"]
    defaults = {name: spec.get("default") for name, spec in variables.items()}
    return apply_values(pool.base_job_template["job_configuration"], defaults)


@pytest.mark.parametrize("kind", ["kubernetes", "docker", "vertex-ai", "process"])
def test_job_templates_are_accepted_and_ask_for_a_t4(server, client, kind):
    template = POOLS / ("process-gpu.json" if kind == "process" else f"{kind}-t4.json")
    cli(
        server,
        "prefect",
        "work-pool",
        "create",
        f"check-{kind}",
        "--type",
        kind,
        "--base-job-template",
        str(template),
        "--overwrite",
    )
    pool = client.read_work_pool(f"check-{kind}")
    assert pool.type == kind
    job = _render(pool)
    if kind == "kubernetes":
        pod = job["job_manifest"]["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-tesla-t4"}
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
            pod["tolerations"]
        )
    elif kind == "docker":
        kwargs = job["container_create_kwargs"]
        assert kwargs["device_requests"] == [
            {"driver": "nvidia", "count": 1, "capabilities": [["gpu"]]}
        ]
        assert kwargs["shm_size"] == "8g"
    elif kind == "vertex-ai":
        machine = job["job_spec"]["worker_pool_specs"][0]["machine_spec"]
        assert machine["accelerator_type"] == "NVIDIA_TESLA_T4"
        assert machine["accelerator_count"] == 1
        assert job["job_spec"]["maximum_run_time_hours"] > 1
    else:
        assert job["env"]["CUDA_VISIBLE_DEVICES"] == "0"


def test_gpu_pool_and_deployments_allow_one_training_at_a_time(deployed, client):
    assert client.read_work_pool("gpu-t4").concurrency_limit == 1
    for name in ("llama2-7b-t4", "retrain-weekly"):
        deployment = client.read_deployment_by_name(f"finance-qlora/{name}")
        assert deployment.work_pool_name == "gpu-t4"
        assert deployment.global_concurrency_limit.limit == 1


def test_retrain_weekly_has_an_active_cron_schedule(deployed, client):
    deployment = client.read_deployment_by_name("finance-qlora/retrain-weekly")
    schedules = [s for s in deployment.schedules if s.active]
    assert len(schedules) == 1
    assert schedules[0].schedule.cron == "0 3 * * 1"
    assert schedules[0].schedule.timezone == "UTC"
    assert deployment.parameters["overrides"]["promotion"]["metric"] == "rougeL"


@pytest.mark.parametrize(
    "params, message",
    [
        ({"overrides": {"train": {"learning_rate": -1}}}, "overrides.train.learning_rate"),
        ({"preset": "gpt-5"}, "'gpt-5' is not one of"),
        ({"overrides": {"trian": {}}}, "trian"),
    ],
)
def test_server_rejects_bad_parameters(deployed, params, message):
    result = cli(
        deployed,
        "prefect",
        "deployment",
        "run",
        "finance-qlora/smoke-cpu",
        "--params",
        json.dumps(params),
        check=False,
    )
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode != 0 and "Validation failed" in output and message in output


def test_smoke_deployment_runs_end_to_end_on_a_worker(deployed, client, tmp_path):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    worker_log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen(
        ["prefect", "worker", "start", "--pool", "cpu-process", "--limit", "1"],
        cwd=ROOT,
        env=deployed,
        stdout=worker_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    params = json.dumps({"overrides": {"output_dir": str(tmp_path / "runs")}})
    try:
        flow_runs = []
        for _ in range(2):
            run = cli(
                deployed,
                "prefect",
                "deployment",
                "run",
                "finance-qlora/smoke-cpu",
                "--params",
                params,
                "--watch",
                "--watch-timeout",
                "600",
                timeout=700,
            )
            assert "Completed" in run.stdout, run.stdout[-3000:]
            flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", run.stdout).group(1)
            flow_runs.append(client.read_flow_run(flow_run_id))
    finally:
        _stop(worker)
        worker_log.close()

    first, second = flow_runs
    assert first.state.is_completed() and second.state.is_completed()
    assert first.name.startswith("tiny-cpu: builtin:tiny-llama")

    first_tasks = task_run_states(client, first.id)
    assert all(first_tasks[step] == ["Completed"] for step in STEPS), first_tasks
    second_tasks = task_run_states(client, second.id)
    assert all(second_tasks[step] == ["Cached"] for step in STEPS), second_tasks

    artifacts = client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[first.id]))
    )
    by_key = {a.key: a for a in artifacts if a.key}
    assert {"rouge", "rouge-report", "adapter", "promotion"} <= set(by_key)
    assert by_key["rouge"].type == "table"
    assert "registry/adapters/builtin-tiny-llama-" in by_key["adapter"].data  # a link, as markdown
    assert "Largest ROUGE-L gains" in by_key["rouge-report"].data
    progress = [a for a in artifacts if a.type == "progress"]
    assert {"train", "generate-pretrained", "generate-finetuned"} <= {
        a.key for a in progress if a.key
    }
    assert all(float(a.data) == 100.0 for a in progress)  # they advanced to the end
