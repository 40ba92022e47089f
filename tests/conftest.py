"""Offline, CPU-only test setup: Prefect on a throwaway SQLite database, caches in tmp folders."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

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

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared/data/finance_alpaca_sample.jsonl"


@pytest.fixture(scope="session")
def prefect_api():
    """One Prefect API for the session (an ephemeral server on a fresh SQLite database)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


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


def make_rows(n: int, with_input_every: int = 3) -> list[dict[str, str]]:
    return [
        {
            "instruction": f"What is finance term number {i}?",
            "input": f"context {i}" if i % with_input_every == 0 else "",
            "output": f"Term {i} is a way to save money number {i}.",
        }
        for i in range(n)
    ]


def task_run_states(client, flow_run_id) -> dict[str, list[str]]:
    """Task run name (without Prefect's random suffix) -> its state names, oldest first."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    )
    states: dict[str, list[str]] = {}
    for run in sorted(runs, key=lambda r: r.expected_start_time):
        name = run.name if run.name.startswith("evaluate-") else run.name.rsplit("-", 1)[0]
        states.setdefault(name, []).append(run.state.name)
    return states
