"""What a benchmark process counts while it runs: torch.compile's graph breaks, caches and
phases, and the project's log lines (out-of-memory back-offs, decode graphs)."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collections() -> Iterator[dict]:
    """Python's garbage collections while inside, by generation: how many, and their seconds
    (the dict fills as they happen; "frozen": objects the collections skipped at the end)."""
    seen: dict = {str(g): {"count": 0, "seconds": 0.0} for g in range(3)}
    began = [0.0]

    def note(phase: str, info: dict) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
            return
        entry = seen[str(info["generation"])]
        entry["count"] += 1
        entry["seconds"] = round(entry["seconds"] + time.perf_counter() - began[0], 4)

    gc.callbacks.append(note)
    try:
        yield seen
    finally:
        gc.callbacks.remove(note)
        seen["frozen"] = gc.get_freeze_count()


def graph_breaks() -> dict[str, int]:
    """torch.compile's graph breaks in this process so far, by reason."""
    from torch._dynamo.utils import counters

    return dict(counters["graph_break"])


def compile_caches() -> dict:
    """torch.compile's on-disk caches in this process so far: AOTAutograd's hits, misses and
    bypasses, with the reasons it gave for a bypass (a bypass traces forward and backward
    again however warm the cache), and inductor's FX graph cache."""
    from torch._dynamo.utils import counters

    caches = {k: v for k, v in counters["aot_autograd"].items() if k.startswith("autograd_")}
    caches |= {k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")}
    caches |= {f"dynamo_{k}": v for k, v in counters["stats"].items()}
    return caches | {
        "bypass_reasons": sorted(set(CACHE_BYPASSES.lines)),
        "recompiles": dict(counters["recompiles"]),
        "phase_seconds": compile_phase_seconds(),
    }


def compile_phase_seconds(at_least: float = 0.5) -> dict[str, float]:
    """Where torch.compile's time went in this process (dynamo's `dynamo_timed` phases summed
    over every graph; the phases nest, so they do not add up): those of `at_least` seconds."""
    from torch._dynamo.utils import compile_times

    names, seconds = compile_times(repr="csv", aggregate=True)
    phases = zip(names, map(float, seconds), strict=True)
    return {name: round(s, 2) for name, s in phases if s >= at_least}


class LogLines(logging.Handler):
    """The project's log messages that contain `needle`, from `level` up."""

    def __init__(self, needle: str, level: int):
        super().__init__(level)
        self.needle, self.lines = needle, []

    def emit(self, record):
        if self.needle in record.getMessage():
            self.lines.append(record.getMessage())


# AOTAutograd's reasons for not using its cache (INFO lines: `main` lets them through)
CACHE_BYPASSES = LogLines("Bypassing autograd cache", logging.INFO)


def watch_cache_bypasses() -> None:
    log = logging.getLogger("torch._functorch._aot_autograd.autograd_cache")
    log.addHandler(CACHE_BYPASSES)
    log.setLevel(logging.INFO)


def out_of_memory_watch() -> LogLines:
    """The out-of-memory back-offs, from now on: a profile that needed one did not fit."""
    watch = LogLines("out of GPU memory", logging.WARNING)
    logging.getLogger("finance_qlora").addHandler(watch)
    return watch


def decode_log() -> LogLines:
    """generate_shard's line on decode steps replayed as CUDA graphs, from now on (an INFO
    line: the generation logger lets INFO through from here)."""
    lines = LogLines("decode steps", logging.INFO)
    generation = logging.getLogger("finance_qlora.generation")
    generation.addHandler(lines)
    generation.setLevel(logging.INFO)
    return lines
