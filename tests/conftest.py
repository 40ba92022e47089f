"""Offline, CPU-only test setup: Prefect on a throwaway SQLite database, caches in tmp folders."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

# Before Prefect is imported anywhere: its settings are read from the environment.
_SESSION_TMP = Path(tempfile.mkdtemp(prefix="finance-qlora-tests-"))
os.environ.setdefault("PREFECT_HOME", str(_SESSION_TMP / "prefect"))
os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(_SESSION_TMP / "prefect" / "storage"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("FINANCE_QLORA_CACHE", str(_SESSION_TMP / "models"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Without a GPU, Triton's kernels (the decode steps' attention) run in its interpreter on CPU
# tensors; Triton reads this when it is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared/data/finance_alpaca_sample.jsonl"


@pytest.fixture(scope="session")
def prefect_api():
    """One Prefect API for the session (an ephemeral server on a fresh SQLite database)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture
def redaction():
    """For a test that redacts a secret: logging's record factory and the set of redacted
    secrets are put back afterwards, so no later test logs through this one's factory."""
    import logging

    import tasks.secrets

    factory, secrets = logging.getLogRecordFactory(), set(tasks.secrets._SECRETS)
    try:
        yield
    finally:
        logging.setLogRecordFactory(factory)
        tasks.secrets._SECRETS.clear()
        tasks.secrets._SECRETS.update(secrets)


@pytest.fixture
def write_rows(tmp_path):
    """Write rows to a data file in tmp_path and return its path."""

    def write(rows, name: str = "rows.jsonl") -> Path:
        path = tmp_path / name
        if name.endswith(".jsonl"):
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        elif name.endswith(".csv"):
            import pandas as pd

            pd.DataFrame(rows).to_csv(path, index=False)
        elif name.endswith(".parquet"):
            import pandas as pd

            pd.DataFrame(rows).to_parquet(path, index=False)
        else:
            path.write_text(json.dumps(rows))
        return path

    return write


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, **more):
    """Greedy answers in prompt order, uncut, through what the evaluate step calls
    (`generate_shard` with `GenerationSettings`)."""
    from finance_qlora.config import GenerationSettings
    from finance_qlora.generation import generate_shard

    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size, **more)
    answers = generate_shard(model, tokenizer, prompts, settings)
    return [answers[i] for i in range(len(prompts))]


def generate_cut(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int):
    """The same answers cut at the next '### ' section, as the evaluation scores them."""
    from finance_qlora.prompts import cut_answer

    raw = generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    return [cut_answer(g.text) for g in raw]


@pytest.fixture(scope="module")
def tiny():
    """The tiny-cpu preset's 4-bit model (eval mode) and tokenizer, once a test module."""
    from finance_qlora.modeling import load_model, load_tokenizer
    from finance_qlora.presets import resolve_config

    config = resolve_config("tiny-cpu")
    return load_model(config.model).eval(), load_tokenizer(config.model)


def tiny_llama(kv_heads: int = 4):
    """A 2-layer Llama with random weights (seed 0), built in code: for tests of one layer's
    arithmetic, without a tokenizer or the 4-bit path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
    )
    return LlamaForCausalLM(config)


def make_rows(n: int, with_input_every: int = 3) -> list[dict[str, str]]:
    return [
        {
            "instruction": f"What is finance term number {i}?",
            "input": f"context {i}" if i % with_input_every == 0 else "",
            "output": f"Term {i} is a way to save money number {i}.",
        }
        for i in range(n)
    ]


def final_task_runs(client, flow_run_id, timeout_s: float = 60.0) -> list:
    """A flow run's task runs once each has reached a final state. Prefect records task states
    asynchronously, after the flow has returned: poll (with a deadline), then read."""
    import time

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout_s
    while True:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
        final = runs and all(r.state is not None and r.state.is_final() for r in runs)
        if final or time.monotonic() > deadline:
            return runs
        time.sleep(0.2)


def task_run_states(client, flow_run_id) -> dict[str, list[str]]:
    """Task run name (without Prefect's random suffix) -> its final state names, oldest first."""
    states: dict[str, list[str]] = {}
    for run in sorted(final_task_runs(client, flow_run_id), key=lambda r: r.expected_start_time):
        name = run.name if run.name.startswith("evaluate-") else run.name.rsplit("-", 1)[0]
        states.setdefault(name, []).append(run.state.name)
    return states


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP endpoint on 127.0.0.1 (moto's server mode), reached through s3fs like a
    user's bucket; credentials and endpoint come from the environment, as on a work pool."""
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail("moto server did not start")
            time.sleep(0.3)
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": url,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.fixture
def bucket(s3_endpoint):
    """A fresh, empty bucket: its s3:// URL."""
    import uuid

    import s3fs

    name = f"store-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
    return f"s3://{name}"


# A real Prefect server ------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]


def stop(process) -> None:
    import signal
    import subprocess

    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def cli(env, *args: str, check: bool = True, timeout: int = 300):
    """A command against the server; `prefect` runs as this interpreter's module, so no
    activated virtual environment is needed."""
    import subprocess
    import sys

    if args[0] == "prefect":
        args = (sys.executable, "-m", "prefect", *args[1:])
    result = subprocess.run(
        args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """`prefect server start` on 127.0.0.1 with a fresh SQLite database; yields the
    environment for CLI calls and workers against it."""
    import subprocess
    import sys
    import time
    import urllib.request

    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOCAL_STORAGE_PATH": str(home / "storage"),
    }
    log = open(home / "server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
        + ["--port", str(port)],
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
        stop(process)
        log.close()


@pytest.fixture(scope="session")
def client(prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            yield client


@pytest.fixture(scope="session")
def deployed(prefect_server):
    cli(prefect_server, "bash", "deployments/create-pools.sh", "process")
    cli(prefect_server, "prefect", "--no-prompt", "deploy", "--all")
    return prefect_server


@contextlib.contextmanager
def worker(env, pool: str, log_path: Path):
    """A process worker polling `pool`; flow runs it starts inherit `env`."""
    import subprocess
    import sys

    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--limit", "1"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield process
        finally:
            stop(process)


def run_deployment(env, name: str, params: dict, client):
    """`prefect deployment run --watch`; returns the finished flow run."""
    import re

    run = cli(
        env,
        "prefect",
        "deployment",
        "run",
        name,
        "--params",
        json.dumps(params),
        "--watch",
        "--watch-timeout",
        "600",
        timeout=700,
        check=False,
    )
    match = re.search(r"UUID: ([0-9a-f-]{36})", run.stdout)
    assert match, run.stdout[-3000:] + run.stderr[-3000:]
    return client.read_flow_run(match.group(1))
