"""Keep the long-lived heap out of the garbage collector's full collections.

A process that runs the flow holds about a million objects the collector tracks (torch,
transformers, TRL, Prefect: modules, classes, functions), and none of them will ever be
garbage. Yet every full collection walks all of them: about 0.4 s on this project's CPUs, and
`release_memory` asks for one each time a model is let go (after dequantizing, after each
evaluation, after training), besides the ones Python starts by itself in the middle of a
training's steps or a generation. `gc.freeze()` moves every object alive at that moment out of
the collections until `gc.unfreeze()`; a collection then walks only what came after: the model
being let go, a step's objects.

`settled()` freezes on entry and unfreezes at the outermost exit; the flow holds one for its
whole run, and each model's loading or training (`modeling.loaded`, the training) holds one
nested inside, whose entry also freezes what the tasks before it imported and kept. Nothing
computed changes; garbage that already existed at an entry (never a model: each is let go and
collected inside its own scope) waits until the outermost exit to be collected.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# The benchmarks turn this off to time the flow with every collection walking the whole heap.
ENABLED = True

_lock = threading.Lock()
_depth = 0


@contextmanager
def settled() -> Iterator[None]:
    """The objects alive now stay out of garbage collections until the outermost scope ends
    (scopes nest, also across threads: the flow's, then a task's model)."""
    global _depth
    if not ENABLED:
        yield
        return
    with _lock:
        _depth += 1
        gc.freeze()
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                gc.unfreeze()
