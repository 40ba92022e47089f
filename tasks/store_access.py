"""The durable store as tasks reach it: a reference to it (URL and Secret block name), the
opened store, Prefect's result storage inside it, and moving step folders in and out."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from prefect.filesystems import RemoteFileSystem
from pydantic import BaseModel

from finance_qlora.records import Stored
from finance_qlora.store import StaleOutput, Store, manifest_digest
from tasks.secrets import storage_options

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


def kept_file(ref: StoreRef, kind: str, key: str, name: str) -> tuple[Path | None, str]:
    """A file the store keeps under <kind>/<key> for every worker: (a verified local copy,
    "found"), (None, "missing"), or (None, "damaged") where the store's copy is not what its
    manifest says (`keep_file` with replace=True puts a new one in its place)."""
    store = store_of(ref)
    uri = store.uri(kind, key)
    files = store.manifest(uri)
    if files is None or name not in files:
        return None, "missing"
    try:
        return store.materialize(uri, manifest_digest(files)) / name, "found"
    except StaleOutput:
        return None, "damaged"


def staged_file(ref: StoreRef, kind: str, key: str, name: str) -> Path:
    """Where this process writes a file for `keep_file`: alone in a folder of its own (workers
    and retries staging the same key never share one)."""
    folder = tempfile.mkdtemp(prefix=".tmp-", dir=store_of(ref).staging(kind, key))
    return Path(folder) / name


def keep_file(ref: StoreRef, kind: str, key: str, path: Path, replace: bool = False) -> None:
    """Put a `staged_file` into the store at <kind>/<key>; `replace`: remove the copy there
    first (damaged, or of no use), else a complete copy another worker put first is kept."""
    store = store_of(ref)
    try:
        if replace:
            store.remove(store.uri(kind, key))
        store.publish(path.parent, kind, key)
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)  # published folders moved away already
