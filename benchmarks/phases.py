"""Where a process's time goes, call by call: named functions wrapped with a timer wherever a
loaded module holds them (its own module and every `from x import f`), for one measured run.

The wrappers add a clock read per call to functions that run once or a few times a task, so
they cost nothing measurable; they change no argument and no result."""

from __future__ import annotations

import functools
import importlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")

# A flow's steps that a bare worker pays first: loading (and quantizing), keeping the 4-bit
# copy, generating, loading the metric, scoring, building the trainer (TRL's first import),
# training.
FLOW_CALLS = (
    "finance_qlora.evaluation:evaluate_model",
    "finance_qlora.modeling:load_model",
    "finance_qlora.quantized:load_kept",
    "finance_qlora.quantized:save_quantized",
    "finance_qlora.modeling:load_tokenizer",
    "finance_qlora.modeling:maybe_dequantize",
    "finance_qlora.decode_kernel:warm_up",
    "finance_qlora.generation:generate_shard",
    "finance_qlora.rouge:score_pairs",
    "finance_qlora.rouge:rouge_metric",
    "finance_qlora.step_trainer:step_trainer_class",
    "finance_qlora.training:train_in_process",
    "finance_qlora.training:build_trainer",
    "finance_qlora.kernels:compile_layers",
)


def holders(value: object) -> Iterator[tuple[object, str]]:
    """(module, attribute) for every loaded module's attribute that is `value`."""
    for module in list(sys.modules.values()):
        for attribute, held in list(getattr(module, "__dict__", {}).items()):
            if held is value:
                yield module, attribute


@contextmanager
def timed_calls(targets: tuple[str, ...] = FLOW_CALLS) -> Iterator[list[dict]]:
    """Within it, each call of a `module:function` in `targets` appends {name, thread, start,
    seconds} to the yielded list (start: seconds since the block began), in the order the
    calls end. The originals are back on exit, also where a module imported within the block
    took a wrapper (`from x import f`)."""
    origin, calls, wrappers = time.perf_counter(), [], []

    def timer(name: str, function: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(function)
        def timed(*args, **kwargs) -> T:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                ended = time.perf_counter()
                calls.append(
                    {
                        "name": name,
                        "thread": threading.current_thread().name,
                        "start": round(started - origin, 2),
                        "seconds": round(ended - started, 2),
                    }
                )

        return timed

    try:
        for target in targets:
            module_name, name = target.split(":")
            original = getattr(importlib.import_module(module_name), name)
            wrapped = timer(name, original)
            wrappers.append((wrapped, original))
            for module, attribute in holders(original):
                setattr(module, attribute, wrapped)
        yield calls
    finally:
        for wrapped, original in wrappers:
            for module, attribute in holders(wrapped):
                setattr(module, attribute, original)
