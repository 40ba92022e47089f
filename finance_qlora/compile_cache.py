"""The compiled decoder layers kept in the durable store, for every worker of one environment.

A worker compiles the layers (train.compile) in 11-18 s on an H200 with empty caches, and in
2-3 s from inductor's and Triton's caches on its own disk; a new container per flow run
(the docker and kubernetes pools) starts with them empty. torch's portable compile cache
(`torch.compiler.save_cache_artifacts`) holds what one process compiled: inductor's graphs
with their Triton kernels built (cubins), AOTAutograd's forward and backward, the autotuning
choices. Loaded in another process it fills that worker's caches before anything compiles,
and the compile is a cache hit.

Those artifacts are code every worker that loads them runs: whoever can write the store could
run code on every such worker. So only a run with `train.compile_cache = "store"` on a worker
that trusts its store reads or writes them (tasks/compiled_layers.py). torch checks each
graph's own key (torch, Triton, the GPU, the graph, the settings) at the lookup: an artifact
of another environment is a miss, never a wrong kernel; the store's key below keeps
environments and the project's code apart, so an entry that would only miss is not kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from importlib import metadata
from pathlib import Path

import torch

from finance_qlora.config import LoraSettings, ModelConfig, TrainSettings

ARTIFACTS = "artifacts.bin"  # the one file of a store entry (<store>/compiled/<key>/)
KIND = "compiled"
# What the compiled graph is made of besides the environment: the model and its LoRA layers,
# and the training settings that change a layer's graph (not the data, the schedule or the
# learning rate, which a weekly retraining changes and the layer's code does not see).
GRAPH_SETTINGS = ("dequantize", "padding_free", "gradient_checkpointing")
LIBRARIES = ("torch", "triton", "transformers", "peft", "bitsandbytes")
PACKAGE = Path(__file__).resolve().parent
log = logging.getLogger(__name__)


def project_code() -> str:
    """The digest of this package's source: its modeling code (packing, kernels, the step)
    is part of the graph, and its version number does not change with it."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def environment() -> dict[str, str]:
    """The libraries, Python and the device the compiled code is for."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "-"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        device = f"{torch.cuda.get_device_name()} sm_{major}{minor} cuda {torch.version.cuda}"
    else:
        device = f"cpu {platform.machine()}"
    return versions | {
        "python": platform.python_version(),
        "device": device,
        "finance_qlora": project_code(),
    }


def entry_key(
    model: ModelConfig, lora: LoraSettings, train: TrainSettings, processes: int = 1
) -> str:
    """The store entry for this environment and this model's compiled layers, trained on
    `processes` GPUs (data-parallel ranks may trace other graphs than one process; kept apart,
    neither is ever an entry that loads but serves nothing)."""
    graph = {
        "environment": environment(),
        "processes": processes,
        "model": model.model_dump(mode="json", exclude={"hf_token_secret", "reuse_quantized"}),
        "lora": lora.model_dump(mode="json"),
        "train": {name: getattr(train, name) for name in GRAPH_SETTINGS},
    }
    return hashlib.sha256(json.dumps(graph, sort_keys=True).encode()).hexdigest()[:32]


def load(path: Path) -> int:
    """Fill this worker's compile caches from `path` (written by `save`); the artifacts'
    count, 0 where there is no file or torch cannot read it (the layers then compile)."""
    if not path.is_file():
        return 0
    # torch logs a damaged file with its traceback and returns None: one line here instead
    torch_log = logging.getLogger("torch.compiler._cache")
    level = torch_log.level
    torch_log.setLevel(logging.ERROR)
    try:
        info = torch.compiler.load_cache_artifacts(path.read_bytes())
    except Exception as exc:  # not every damage is caught inside torch
        log.warning("compiled layers in %s not loaded (%s); compiling them", path, exc)
        return 0
    finally:
        torch_log.setLevel(level)
    if info is None:
        log.warning("compiled layers in %s not readable by this torch; compiling them", path)
        return 0
    return sum(len(keys) for keys in info.artifacts.values())


def save(path: Path) -> int:
    """Write what this process compiled or found in its caches (since it started) to `path`,
    all or nothing; the artifacts' count, 0 where there is none (nothing is written)."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return 0
    blob, info = saved
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        tmp.write_bytes(blob)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return sum(len(keys) for keys in info.artifacts.values())


def graph_lookups() -> dict[str, int]:
    """Inductor's graph cache in this process so far: hits and misses (compiled)."""
    from torch._dynamo.utils import counters

    inductor = counters["inductor"]
    return {"hits": inductor["fxgraph_cache_hit"], "misses": inductor["fxgraph_cache_miss"]}


def after_training(path: Path | None) -> None:
    """After training (rank 0): how this process had the layers' graphs, and, where `path` is
    given, `save` there. A save that fails costs the next worker a compile, never this
    training its adapter: one warning."""
    lookups = graph_lookups()
    log.info(
        "compiled layers: %d graphs from the compile caches, %d compiled (in this process)",
        lookups["hits"],
        lookups["misses"],
    )
    if path is None:
        return
    try:
        count = save(path)
    except OSError as exc:
        log.warning("compiled layers not written to %s (%s)", path, exc)
        return
    if count:
        log.info("compiled layers: %d artifacts written to %s", count, path)
    else:
        log.info("compiled layers: nothing compiled or found in this process to write")
