"""Keep the long-lived heap out of the garbage collector's full collections.

A process that runs the flow tracks hundreds of thousands of objects (modules, classes and
functions of torch, transformers, TRL, Prefect), and almost none of them will ever be garbage.
Yet every full collection walks all of them, about half a second each on the H200 machine's
CPU. `release_memory` asks for one each time a model is let go (after dequantizing, after each
evaluation, after training), the Trainer before its first step (`accelerator.free_memory`),
besides those Python starts by itself. `gc.freeze()` moves every object alive at that moment
out of the collections until `gc.unfreeze()`; a collection then walks only what came after:
the model being let go, a step's objects (benchmarks/README.md, "The heap kept out of garbage
collections").

`frozen()` freezes on entry and unfreezes at the outermost exit. The flow holds one for its
whole run; each model's loading or training (`modeling.loaded`, the training) holds one nested
inside. Each entry first collects what is garbage, so no garbage is ever frozen (a failed
attempt's model, say, after an out-of-memory back-off or before a retried task): the outermost
entry walks the whole heap, once a flow; a nested one only what came since the last freeze.
Nothing computed changes. A library's own `gc.freeze()` (one in the lent machine's stack
freezes a few hundred objects) is undone by the outermost exit: those objects are then
collected as any others.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# The benchmarks turn this off to time the flow with every collection walking the whole heap.
ENABLED = True

_lock = threading.Lock()
_depth = 0  # scopes entered and not yet left, in any thread


@contextmanager
def frozen() -> Iterator[None]:
    """The objects alive now stay out of garbage collections until the outermost scope ends
    (the flow's, then a task's model inside it)."""
    global _depth
    if not ENABLED:
        yield
        return
    with _lock:
        gc.collect()  # nothing that is garbage now is frozen (inside a scope: the young only)
        gc.freeze()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                gc.unfreeze()
