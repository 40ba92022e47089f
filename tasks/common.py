"""What every task shares: the cache policy, the retry rule, the HF token and progress."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

import finance_qlora
from finance_qlora.errors import FinanceQLoRAError

# Transient failures (hub downloads, a preempted GPU, CUDA hiccups) get retried after a pause;
# bad input never is (see `retry_unless_bad_input`).
HUB_RETRIES, HUB_RETRY_DELAY_S = 3, [10, 30, 90]
GPU_RETRIES, GPU_RETRY_DELAY_S = 2, [30, 120]


@lru_cache(maxsize=1)
def library_digest() -> str:
    digest = hashlib.sha256()
    package = Path(finance_qlora.__file__).parent
    for path in sorted(package.rglob("*")):
        if path.is_file() and path.suffix in (".py", ".jsonl"):
            digest.update(path.relative_to(package).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


@dataclass
class LibrarySource(CachePolicy):
    """The ML code the task calls: a change in `finance_qlora` invalidates cached results."""

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str:
        return library_digest()


# Inputs (configs, records with fingerprints, folders), the task's own source and the library's.
CACHE_POLICY = INPUTS + TASK_SOURCE + LibrarySource()


# Worth a retry: CUDA errors and out-of-memory (RuntimeError), I/O and network trouble.
TRANSIENT = (RuntimeError, OSError, ConnectionError, TimeoutError)


def retry_unless_bad_input(task, task_run, state) -> bool:
    """Prefect retry condition: retry transient failures, never bad input or a bug."""
    try:
        state.result()
    except FinanceQLoRAError:
        return False
    except TRANSIENT:
        return True
    except Exception:
        return False
    return False


def step_dir(root: Path, kind: str, *parts: Any) -> Path:
    """A content-addressed folder: the same inputs always write to the same place."""
    payload = json.dumps([_plain(p) for p in parts], sort_keys=True, default=str)
    return Path(root) / kind / hashlib.sha256(payload.encode()).hexdigest()[:12]


def _plain(value: Any) -> Any:
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a flow or task run, else a plain module logger."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("finance_qlora")


_SECRETS: set[str] = set()


def redact_in_logs(secret: str) -> None:
    """From now on, every log record in this process shows `secret` as '***'.

    Done in the record factory, so it holds for every handler: the console, Prefect's API
    log handler, and any added later."""
    if not _SECRETS:
        make_record = logging.getLogRecordFactory()

        def redacting_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = make_record(*args, **kwargs)
            message = record.getMessage()
            if any(s in message for s in _SECRETS):
                for s in _SECRETS:
                    message = message.replace(s, "***")
                record.msg, record.args = message, ()
            return record

        logging.setLogRecordFactory(redacting_factory)
    _SECRETS.add(secret)


def hf_token(secret_block: str, name: str) -> str | None:
    """The Hugging Face token from a Prefect Secret block, else HF_TOKEN; never logged."""
    if name.startswith("builtin:"):
        return None  # built offline: nothing to download
    from prefect.blocks.system import Secret

    try:
        token, source = Secret.load(secret_block).get(), f"Secret block {secret_block!r}"
    except ValueError:  # no such block
        token, source = os.environ.get("HF_TOKEN") or None, "HF_TOKEN"
    if token:
        redact_in_logs(token)
        run_logger().info("Hugging Face token from %s", source)
    return token


class Progress:
    """A Prefect progress artifact that advances as work gets done."""

    def __init__(self, key: str, description: str):
        self.id = create_progress_artifact(0.0, key=key, description=description)

    def __call__(self, done: int, total: int) -> None:
        update_progress_artifact(self.id, round(100.0 * done / max(total, 1), 1))
