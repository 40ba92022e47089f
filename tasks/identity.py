"""One identity per step, and its persisted result: the cache key (= the name of the step's
folder in the store and of its result), and results kept as plain JSON of the project's
records."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.serializers import Serializer
from prefect.transactions import get_transaction
from pydantic import BaseModel, Field

from finance_qlora.records import RECORD_TYPES, Stored
from tasks.progress import run_logger
from tasks.store_access import RESULTS, StoreRef, store_of


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
        """A record, or ValueError for anything else (never unpickled, never run)."""
        try:
            payload = json.loads(blob)
            return RECORD_TYPES[payload["record"]].model_validate(payload["data"])
        except (ValueError, KeyError, TypeError) as exc:  # ValidationError is a ValueError
            raise ValueError(
                f"not a persisted finance-qlora record ({type(exc).__name__})"
            ) from None


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
class StepIdentity(CachePolicy):
    """The cache policy of a step: a key from the inputs that change its result (configuration
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
    that is not plain JSON of our records, text or binary (a pickle planted in a shared
    bucket): read as data only, never run; the step then recomputes."""
    store = store_of(ref)
    path = store.path(RESULTS, key)
    try:
        blob = store.fs.cat_file(path)
    except FileNotFoundError:
        return
    try:
        saved = json.loads(blob)
        if saved["metadata"]["serializer"]["type"] != RecordSerializer().type:
            raise ValueError("another serializer")
        record = RecordSerializer().loads(saved["result"].encode())
    except (ValueError, KeyError, TypeError, AttributeError):
        why = "is not plain JSON of the project's records; removed"
    else:
        if store.intact(record.folder, record.fingerprint):
            return
        why = f"points at files gone or changed ({record.folder}); removed"
    run_logger().warning(
        "%s: the cached result %s %s, recomputing", kind, store.uri(RESULTS, key), why
    )
    store.fs.rm_file(path)


def step_key() -> str:
    """The running step's key (its Prefect cache key)."""
    transaction = get_transaction()
    if transaction is None or not transaction.key:
        raise RuntimeError("a step runs as a Prefect task with a StepIdentity cache policy")
    return transaction.key
