"""The train step's compiled layers in the durable store (train.compile_cache="store"): found and
loaded into this worker's caches before training, written and kept after it where the store had
none of use.

The file is code every worker that loads it runs, so two keys open it: the run's setting, and
the worker's FINANCE_QLORA_TRUST_STORE=1 (the work pool's operator knows who can write the
store; whoever can start a run need not).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from finance_qlora import compile_cache
from finance_qlora.config import LoraSettings, ModelConfig, TrainSettings
from tasks.store_access import StoreRef, keep_file, kept_file, staged_file

TRUST_ENV = "FINANCE_QLORA_TRUST_STORE"
WHY = {  # why a worker compiles, by what kept_file found
    "missing": "none in the store for this environment yet",
    "damaged": "the store's copy is damaged",
    "found": "the store's copy is of no use here",
}


def store_trusted() -> bool:
    return os.environ.get(TRUST_ENV, "").strip().lower() in {"1", "true", "yes"}


@dataclass
class SharedLayers:
    store: StoreRef
    key: str
    loaded: int  # artifacts loaded from the store's copy
    replace: bool  # the store's copy is damaged or of no use here: put a new one in its place
    target: Path | None  # where training writes them; None where the store's copy served

    @classmethod
    def open(
        cls,
        store: StoreRef,
        model: ModelConfig,
        lora: LoraSettings,
        train: TrainSettings,
        log: logging.Logger | logging.LoggerAdapter,
        processes: int = 1,
    ) -> SharedLayers | None:
        """None unless the run asks for the store's compiled layers and this worker trusts its
        store; else the store's copy loaded where it has one of use."""
        if not (train.compile and train.compile_cache == "store"):
            return None
        if not store_trusted():
            log.warning(
                "train.compile_cache=store: this worker does not run code from its store; set "
                "%s=1 on the work pool where only trusted writers reach the store. Compiling "
                "here",
                TRUST_ENV,
            )
            return None
        key = compile_cache.entry_key(model, lora, train, processes)
        path, state = kept_file(store, compile_cache.KIND, key, compile_cache.ARTIFACTS)
        loaded = compile_cache.load(path) if path is not None else 0
        if loaded:
            log.info("compiled layers: %d artifacts loaded from the store", loaded)
            return cls(store, key, loaded, replace=False, target=None)
        log.info("compiled layers: %s; compiling, then keeping them there", WHY[state])
        target = staged_file(store, compile_cache.KIND, key, compile_cache.ARTIFACTS)
        return cls(store, key, 0, replace=state != "missing", target=target)

    def keep(self, log: logging.Logger | logging.LoggerAdapter) -> bool:
        """After training: what it wrote, into the store; whether it is kept there. A failure
        costs the next worker a compile, never this run its adapter: one warning."""
        if self.target is None:
            return False
        if not self.target.is_file():  # nothing compiled or found to write
            shutil.rmtree(self.target.parent, ignore_errors=True)
            return False
        try:
            keep_file(self.store, compile_cache.KIND, self.key, self.target, self.replace)
        except Exception as exc:  # every store backend words its failures differently
            log.warning("compiled layers not kept in the store (%s)", exc)
            return False
        log.info("compiled layers kept in the store for the next worker")
        return True
