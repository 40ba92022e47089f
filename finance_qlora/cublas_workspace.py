"""cuBLAS's workspace variable: named for the deterministic generation, away while training.

Older torch versions refuse a matrix product under deterministic algorithms
(`generation.reproducible`) unless CUBLAS_WORKSPACE_CONFIG names a reproducible workspace, and
check that once, at the process's first product (a C++ static); torch 2.11 runs it either way
(measured on an H200: benchmarks/workspace_config.py --deterministic-check). So `name()` runs
when `finance_qlora.generation` is imported, before any product of that process (processes it
starts, such as torchrun's ranks, inherit the variable).

Yet torch also parses the variable, with a `std::regex`, each time a product takes its cuBLAS
handle (`getChosenWorkspaceSize`, not cached): on an H200 with torch 2.11, in the 7B preset's
training, a product cost the host 58-77 us with it named and 17-25 us without, and a step makes
832 of them. Without it the training ran 1.26x as fast on one machine and 1.02x on another,
runs in turn (benchmarks/README.md, "The training without CUBLAS_WORKSPACE_CONFIG").

`unnamed()` takes the variable away for the training's steps and names it again after. Only
where that leaves torch's workspace the same size: torch sizes each (handle, stream)'s buffer
once, at its first product, but tells cuBLAS the size the variable gives at every product, so
a size that changed could let cuBLAS write past a buffer. That is our `:4096:8` (32 MiB) on a
compute capability 9.0 card (H100, H200), where torch's default has been 32 MiB since 2.0
(pytorch PR 91564); on other cards, under ROCm, or with a value of the user's own, the variable
stays named. Before
taking it away it makes one product while it is named, so an older torch's once-only check has
passed and a later deterministic generation in the process still runs. Every product shape of
a 7B layer's QLoRA forward and backward, at four token counts, computed the same bits with and
without it (an H200, in a bare process).

os.environ's changes (setenv, unsetenv) are not atomic for a thread reading the environment at
that moment; they happen once at a training's start and end.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

VARIABLE = "CUBLAS_WORKSPACE_CONFIG"
VALUE = ":4096:8"  # 8 x 4 MiB: the size of torch's own default on an H100/H200
# The benchmarks turn this off to train with the variable named (as until 2026-11-30).
UNNAMED_IN_TRAINING = True
# where torch reads the variable (the tests add the CPU to train through `unnamed` there)
DEVICE_TYPES: tuple[str, ...] = ("cuda",)

_lock = threading.Lock()
_depth = 0  # trainings inside `unnamed()` with the variable away, in any thread
_taken: str | None = None  # the value the outermost one took away


def default_is_named_size(device: torch.device) -> bool:
    """Is torch's default workspace on `device` the size `VALUE` names (32 MiB)? On CUDA cards
    of compute capability 9.0; Blackwell's default changed between torch versions."""
    return torch.version.hip is None and torch.cuda.get_device_capability(device) == (9, 0)


def first_product(device: torch.device) -> None:
    """One small matrix product on `device`: the process's first, if none came before."""
    probe = torch.ones(8, 8, device=device)
    torch.mm(probe, probe)


def name() -> None:
    """Name the workspace unless the user did (their value is kept). While a training has it
    away, that training names it again when it ends."""
    with _lock:
        if _depth == 0:
            os.environ.setdefault(VARIABLE, VALUE)


@contextmanager
def unnamed(device: torch.device) -> Iterator[None]:
    """The variable taken away while it lasts, where `VALUE` names it and the device's default
    workspace is that size, then named again. Nested and overlapping uses (trainings in threads
    of one process) take it away once and give it back once, when the last one ends."""
    global _depth, _taken
    if not UNNAMED_IN_TRAINING or device.type not in DEVICE_TYPES:
        yield
        return
    with _lock:
        away = _depth > 0 or (os.environ.get(VARIABLE) == VALUE and default_is_named_size(device))
        if away:
            if _depth == 0:
                # an older torch's once-only check reads the variable at the process's first
                # product: make that product now, while it is named
                first_product(device)
                _taken = os.environ.pop(VARIABLE)
            _depth += 1
    if not away:
        yield
        return
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                os.environ[VARIABLE] = _taken
                _taken = None
