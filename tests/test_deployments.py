"""Deployments against a real `prefect server start` on 127.0.0.1 (SQLite), a real process
worker and `prefect deployment run --watch`; the server and worker stop even when a test fails."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT, cli

POOLS = ROOT / "deployments" / "work-pools"

pytestmark = [pytest.mark.server, pytest.mark.slow]


def _render(pool) -> dict:
    """What a worker does with a pool's template: fill placeholders with the variables'
    defaults."""
    from prefect.utilities.templating import apply_values

    variables = pool.base_job_template["variables"]["properties"]
    defaults = {name: spec.get("default") for name, spec in variables.items()}
    return apply_values(pool.base_job_template["job_configuration"], defaults)


@pytest.mark.parametrize("kind", ["kubernetes", "docker", "vertex-ai", "process"])
def test_job_templates_are_accepted_and_ask_for_a_t4(prefect_server, client, kind):
    template = POOLS / ("process-gpu.json" if kind == "process" else f"{kind}-t4.json")
    cli(
        prefect_server,
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
        assert job["env"] == {"FINANCE_QLORA_NUM_GPUS": 1}  # merged with the env variable's


def test_gpu_pool_and_deployments_allow_one_training_at_a_time(deployed, client):
    assert client.read_work_pool("gpu-t4").concurrency_limit == 1
    for name in ("llama2-7b-t4", "retrain-weekly"):
        deployment = client.read_deployment_by_name(f"finance-qlora/{name}")
        assert deployment.work_pool_name == "gpu-t4"
        assert deployment.global_concurrency_limit.limit == 1


def test_the_multi_gpu_deployment_asks_its_pool_for_four_gpus(deployed, client):
    deployment = client.read_deployment_by_name("finance-qlora/llama2-7b-4gpu")
    assert deployment.work_pool_name == "gpu-t4"
    assert deployment.job_variables == {"gpu_count": 4}
    pool = client.read_work_pool("gpu-t4")  # the process template here: FINANCE_QLORA_NUM_GPUS
    assert "gpu_count" in pool.base_job_template["variables"]["properties"]


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
