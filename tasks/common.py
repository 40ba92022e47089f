"""What every task shares: the store, one identity per step (cache key = folder name), plain-JSON
results, the retry rule, the HF token and progress artifacts."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import CachePolicy
from prefect.exceptions import MissingContextError
from prefect.filesystems import RemoteFileSystem
from prefect.logging import get_run_logger
from prefect.serializers import Serializer
from prefect.transactions import get_transaction
from pydantic import BaseModel, Field

from finance_qlora.errors import ConfigError, FinanceQLoRAError
from finance_qlora.records import RECORD_TYPES, Stored
from finance_qlora.store import StaleOutput, Store

# Transient failures (hub downloads, a preempted GPU, CUDA hiccups) get retried after a pause;
# bad input never is (see `retry_unless_bad_input`).
HUB_RETRIES, HUB_RETRY_DELAY_S = 3, [10, 30, 90]
GPU_RETRIES, GPU_RETRY_DELAY_S = 2, [30, 120]
RESULTS = "prefect-results"  # Prefect's persisted task results, inside the store


class StoreRef(BaseModel):
    """Where the durable store is, as tasks receive it: the URL and the name of the Prefect
    Secret block holding its fsspec options (credentials), never the options themselves."""

    url: str
    secret: str | None = None


@lru_cache(maxsize=8)
def open_store(url: str, secret: str | None = None) -> Store:
    return Store(url, storage_options(secret))


def store_of(ref: StoreRef) -> Store:
    return open_store(ref.url, ref.secret)


def storage_options(secret: str | None) -> dict[str, Any]:
    """fsspec options (key, secret, endpoint...) from a Prefect Secret block holding a JSON
    object; without a block, the library reads the environment (AWS_*, GOOGLE_*, AZURE_*)."""
    if not secret:
        return {}
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(secret).get()
    except ValueError:
        raise ConfigError(
            f"output_dir_secret: no Prefect Secret block named {secret!r}; create it with the "
            "store's options as JSON (see README: the durable store)"
        ) from None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    if not isinstance(value, dict):
        raise ConfigError(
            f"output_dir_secret: the Secret block {secret!r} must hold a JSON object of "
            'fsspec options, e.g. {"key": ..., "secret": ...}'
        )
    for credential in value.values():
        if isinstance(credential, str) and len(credential) >= 8:
            redact_in_logs(credential)
    return value


def result_storage(ref: StoreRef) -> Path | RemoteFileSystem:
    """Prefect's result storage inside the store, so the cache works across containers.

    Prefect wants a remote one saved as a block: saved without credentials (those stay in the
    environment or the Secret block); this process's copy gets the store's options."""
    store = store_of(ref)
    if store.is_local:
        return Path(store.path(RESULTS))
    name = "finance-qlora-results-" + hashlib.sha256(store.url.encode()).hexdigest()[:12]
    block = RemoteFileSystem(basepath=store.uri(RESULTS))
    block.save(name, overwrite=True)
    block.settings = store.options
    return block


class RecordSerializer(Serializer):
    """Persisted results as plain JSON of the project's records: on a shared bucket, a pickle
    would be code that every worker reading the cache runs. Only known record types load."""

    type: str = Field(default="finance-qlora-records", frozen=True)

    def dumps(self, obj: Any) -> bytes:
        name = type(obj).__name__
        if RECORD_TYPES.get(name) is not type(obj):
            raise TypeError(f"only finance-qlora records are persisted, not {name}")
        return json.dumps({"record": name, "data": obj.model_dump(mode="json")}).encode()

    def loads(self, blob: bytes) -> Any:
        payload = json.loads(blob)
        return RECORD_TYPES[payload["record"]].model_validate(payload["data"])


# Fields that do not change a step's result: where the data came from once its version is
# known, which Secret block holds the token, whether 4-bit weights are reused from disk (the
# same weights), how often checkpoints are written.
NOT_IDENTITY: dict[str, set[str]] = {
    "DataConfig": {"dataset", "revision"},
    "DataVersion": {"source"},
    "ModelConfig": {"hf_token_secret", "reuse_quantized"},
    "TrainSettings": {"checkpoint_steps"},
}
# Task parameters that name where or how, never what: never part of a key. On how many GPUs
# a step ran is "how": an adapter trained on 4 GPUs serves a run on 1, as one from a T4
# serves an H100.
NOT_KEYED = {"store", "label", "token_block", "devices"}


def identity(value: Any) -> Any:
    """The part of a task input that changes its result, as plain JSON."""
    if isinstance(value, Stored):
        return value.fingerprint  # the content, wherever it lies
    if isinstance(value, BaseModel):
        exclude = NOT_IDENTITY.get(type(value).__name__, set())
        return value.model_dump(mode="json", exclude=exclude)
    if isinstance(value, dict):
        return {k: identity(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [identity(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def module_source(name: str) -> bytes:
    return Path(importlib.util.find_spec(name).origin).read_bytes()


def code_digest(modules: tuple[str, ...]) -> str:
    """sha256 of the source of the modules whose code decides a step's result."""
    digest = hashlib.sha256()
    for name in modules:
        digest.update(name.encode() + b"\0" + module_source(name))
    return digest.hexdigest()


@dataclass
class Step(CachePolicy):
    """One identity per step: a key from the inputs that change its result (configuration
    fields, the fingerprints of upstream records, `uses` for a narrower part of one) and the
    source of the modules in `code`. The key is Prefect's cache key, the name of the step's
    folder in the store (`<store>/<kind>/<key>`) and of its persisted result. A cached result
    whose folder is gone or changed is dropped before Prefect looks it up, so it is recomputed.
    """

    kind: str = ""
    code: tuple[str, ...] = ()
    uses: dict[str, Callable[[Any], Any]] = field(default_factory=dict)

    def key(self, inputs: dict[str, Any]) -> str:
        keyed = {
            name: identity(self.uses[name](value) if name in self.uses else value)
            for name, value in inputs.items()
            if name not in NOT_KEYED
        }
        payload = json.dumps(
            {"step": self.kind, "code": code_digest(self.code), "inputs": keyed}, sort_keys=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str:
        key = self.key(inputs)
        drop_stale_result(StoreRef.model_validate(inputs["store"]), self.kind, key)
        return key


def drop_stale_result(ref: StoreRef, kind: str, key: str) -> None:
    """Remove a persisted result that would hand back a folder no longer in the store, or
    that is not plain JSON of our records (a pickle planted in a shared bucket)."""
    store = store_of(ref)
    text = store.read_text(RESULTS, key)
    if text is None:
        return
    try:
        saved = json.loads(text)
        serializer = saved["metadata"]["serializer"]["type"]
        record = RecordSerializer().loads(saved["result"].encode())
        fresh = serializer == RecordSerializer().type and store.intact(
            record.folder, record.fingerprint
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        fresh = False
    if not fresh:
        run_logger().warning(
            "%s: the cached result's files at %s are gone or changed; recomputing",
            kind,
            store.uri(kind, key),
        )
        store.fs.rm_file(store.path(RESULTS, key))


def step_key() -> str:
    """The running step's key (its Prefect cache key)."""
    transaction = get_transaction()
    if transaction is None or not transaction.key:
        raise RuntimeError("a step runs as a Prefect task with a Step cache policy")
    return transaction.key


def publish(ref: StoreRef, record: Stored, kind: str, key: str) -> Stored:
    """Put a record's local folder into the store; the record then names the store's copy."""
    store = store_of(ref)
    uri, digest = store.publish(record.path, kind, key)
    clear_staging(store.staging(kind, key))  # what is left there served only this try
    return record.model_copy(update={"folder": uri, "fingerprint": digest})


def local(ref: StoreRef, record: Stored) -> Stored:
    """The record with `folder` on this machine: the store's folder itself, or a verified
    download. Files that vanished or changed raise StaleOutput (retried: the upstream step's
    next cache lookup recomputes them)."""
    path = store_of(ref).materialize(record.folder, record.fingerprint)
    return record.model_copy(update={"folder": str(path)})


def clear_staging(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def retry_unless_bad_input(task, task_run, state) -> bool:
    """Prefect retry condition: retry what can heal (a dropped connection, a timeout, a 5xx,
    CUDA out-of-memory or a CUDA error, an output that vanished); never bad input or a bug."""
    try:
        state.result()
    except FinanceQLoRAError:
        return False
    except Exception as exc:  # noqa: BLE001 - classified below
        return is_transient(exc)
    return False


def is_transient(exc: BaseException) -> bool:
    import torch

    from finance_qlora.parallel import RankFailed

    transient = (torch.OutOfMemoryError, StaleOutput, RankFailed, ConnectionError, TimeoutError)
    if isinstance(exc, transient):
        return True
    if isinstance(exc, RuntimeError):
        return str(exc).startswith("CUDA error")
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError):
        return False
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status is not None:
        return status >= 500 or status == 429
    return isinstance(exc, OSError)


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
    if name.startswith("builtin:") or "://" in name:
        return None  # built offline or on a store: nothing to download from the Hub
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
