"""The retry rule (tasks/retries.py): what can heal is retried (a dropped connection, a timeout,
a 5xx or 429, CUDA out-of-memory or a CUDA error, a dead rank, an output that vanished), bad
input and bugs never; and every task that retries asks this rule."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch
from prefect import Task
from prefect.states import Completed, Failed

import tasks
from finance_qlora.errors import ConfigError, DataError, FinanceQLoRAError, TrainingError
from finance_qlora.parallel import RankFailed
from finance_qlora.store import StaleOutput
from tasks.retries import is_transient, retry_unless_bad_input


class HTTPError(Exception):
    """An error carrying an HTTP response, as requests' and httpx's do."""

    def __init__(self, status_code: int):
        super().__init__(f"HTTP {status_code}")
        self.response = type("Response", (), {"status_code": status_code})()


HEALS = [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA error: an illegal memory access was encountered"),
    RankFailed("a training process exited with code -9"),
    StaleOutput("s3://bucket/runs/eval/k1 is missing or changed on the store"),
    ConnectionError("connection reset by peer"),
    TimeoutError("read timed out"),
    HTTPError(500),
    HTTPError(503),
    HTTPError(429),
    OSError("[Errno 104] Connection reset by peer"),
]
NEVER = [
    ConfigError("train.max_seq_length: 8 tokens is too short"),
    DataError("rows.jsonl: missing column(s) output"),
    TrainingError("training stopped at step 3: the loss is nan"),
    RuntimeError("Expected all tensors to be on the same device"),  # a bug, not a hiccup
    FileNotFoundError("no such file: rows.jsonl"),
    PermissionError("permission denied: /mnt/store"),
    IsADirectoryError("is a directory: rows.jsonl"),
    HTTPError(401),
    HTTPError(404),
    ValueError("bad value"),
    KeyError("prompt"),
    TypeError("unexpected keyword argument"),
]


@pytest.mark.parametrize("exc", HEALS, ids=lambda e: f"{type(e).__name__}:{e}"[:50])
def test_what_can_heal_is_retried(exc):
    assert is_transient(exc)
    assert retry_unless_bad_input(None, None, Failed(data=exc)) is True


@pytest.mark.parametrize("exc", NEVER, ids=lambda e: f"{type(e).__name__}:{e}"[:50])
def test_bad_input_and_bugs_are_never_retried(exc):
    assert retry_unless_bad_input(None, None, Failed(data=exc)) is False
    if not isinstance(exc, FinanceQLoRAError):
        assert not is_transient(exc)


def test_bad_input_is_never_retried_even_when_it_looks_transient():
    """A one-line error is bad input whatever it wraps: the same input fails the same way."""

    class BadAndTimedOut(ConfigError, TimeoutError):
        pass

    exc = BadAndTimedOut("model.name: the hub said 404")
    assert is_transient(exc)  # its class alone would be retried ...
    assert retry_unless_bad_input(None, None, Failed(data=exc)) is False  # ... bad input wins


def test_a_completed_state_is_not_retried():
    assert retry_unless_bad_input(None, None, Completed(data=1)) is False


def _retrying_tasks() -> dict[str, Task]:
    found = {}
    for info in pkgutil.iter_modules(tasks.__path__):
        module = importlib.import_module(f"tasks.{info.name}")
        for value in vars(module).values():
            if isinstance(value, Task) and value.retries:
                found[value.name] = value
    return found


def test_every_task_that_retries_asks_the_rule():
    retrying = _retrying_tasks()
    assert {"data-version", "load", "train", "evaluate"} <= set(retrying), sorted(retrying)
    for name, task in retrying.items():
        assert task.retry_condition_fn is retry_unless_bad_input, name
