"""One identity per step, and its persisted result: the cache key (= the name of the step's
folder in the store and of its result), and results kept as plain JSON of the project's
records."""

from __future__ import annotations

import ast
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from importlib import metadata
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
# same weights), how often checkpoints are written, where compiled layers are kept, whether
# decode steps replay CUDA graphs (the same kernels).
NOT_IDENTITY: dict[str, set[str]] = {
    "DataConfig": {"dataset", "revision"},
    "DataVersion": {"source"},
    "ModelConfig": {"hf_token_secret", "reuse_quantized"},
    "TrainSettings": {"checkpoint_steps", "loader_workers", "compile_cache"},
    "GenerationSettings": {"cuda_graphs"},
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
    return module_file(name).read_bytes()


PACKAGE = "finance_qlora"  # the library whose code decides results
ROOT = Path(__file__).resolve().parents[1]
# Libraries whose version can change a step's result (numbers, kernels, tokenization, ROUGE):
# import name -> distribution. A step's key holds those its code imports that are installed.
RESULT_LIBRARIES = {
    "torch": "torch",
    "transformers": "transformers",
    "trl": "trl",
    "peft": "peft",
    "bitsandbytes": "bitsandbytes",
    "liger_kernel": "liger-kernel",
    "rouge_score": "rouge-score",
}


def module_file(name: str) -> Path | None:
    """The source file of a module of this project, without importing it; None otherwise."""
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(name: str) -> tuple[set[str], set[str]]:
    """(project modules, top-level third-party names) a module imports anywhere in its code,
    function-level imports included; files of the package it names by path (`*.py` strings,
    such as an evaluate module loaded from its file) count as imported. A glob pattern
    ("*.py") names no file: a module that reads every source file (to digest it) loads none."""
    path = module_file(name)
    tree = ast.parse(path.read_text(), str(path))
    named: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            named |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            named.add(node.module)
            named |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            name = node.value
            if name.endswith(".py") and "/" not in name and not any(c in name for c in "*?["):
                for found in (ROOT / PACKAGE).rglob(name):
                    named.add(".".join(found.relative_to(ROOT).with_suffix("").parts))
    ours = {m for m in named if m.split(".")[0] == PACKAGE and module_file(m) is not None}
    # importing a module runs its packages' __init__ first
    parents = {m.rsplit(".", i)[0] for m in ours for i in range(1, m.count(".") + 1)}
    ours |= {m for m in parents if module_file(m) is not None}  # not a namespace package
    return ours, {m.split(".")[0] for m in named if m.split(".")[0] != PACKAGE}


@cache
def code_modules(entry: str) -> tuple[str, ...]:
    """The project modules whose code a step's entry module reaches, transitively."""
    seen: set[str] = set()
    todo = [entry]
    while todo:
        for found in _imports(todo.pop())[0] - seen:
            seen.add(found)
            todo.append(found)
    return tuple(sorted(seen))


@cache
def result_libraries(entry: str) -> dict[str, str]:
    """Versions of the RESULT_LIBRARIES that the step's code imports and that are installed."""
    imported: set[str] = set()
    for name in (entry, *code_modules(entry)):
        imported |= _imports(name)[1]
    versions = {}
    for module, dist in sorted(RESULT_LIBRARIES.items()):
        if module in imported:
            try:
                versions[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                pass  # not installed here: the code runs without it
    return versions


def runtime(entry: str, model: Any = None) -> dict[str, Any]:
    """What a step's result depends on beyond its inputs and code: the library versions, and
    for a step that runs a model, the GPU class and the compute dtype "auto" resolves to."""
    found: dict[str, Any] = {"libraries": result_libraries(entry)}
    if "torch" in found["libraries"]:
        import torch

        found["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        if model is not None:
            from finance_qlora.modeling import compute_dtype

            found["dtype"] = str(compute_dtype(model.compute_dtype)).removeprefix("torch.")
    return found


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
    source of the project modules its entry module reaches (`code_modules`, function-level
    imports included) and the `runtime` they run on (library versions, GPU class, resolved
    dtype). The key is Prefect's cache key, the name of the step's
    folder in the store (`<store>/<kind>/<key>`) and of its persisted result. A cached result
    whose folder is gone or changed is dropped before Prefect looks it up, so it is recomputed.
    """

    kind: str = ""
    entry: str = ""  # the task's module: its code is what the project modules it reaches
    uses: dict[str, Callable[[Any], Any]] = field(default_factory=dict)

    @property
    def code(self) -> tuple[str, ...]:
        return code_modules(self.entry)

    def key(self, inputs: dict[str, Any]) -> str:
        keyed = {
            name: identity(self.uses[name](value) if name in self.uses else value)
            for name, value in inputs.items()
            if name not in NOT_KEYED
        }
        payload = {
            "step": self.kind,
            "code": code_digest(self.code),
            "runtime": runtime(self.entry, inputs.get("model")),
            "inputs": keyed,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

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
