"""cuBLAS's workspace variable: named for the deterministic generation, away while training.

Older torch versions refuse a matrix product under deterministic algorithms
(`generation.reproducible`) unless CUBLAS_WORKSPACE_CONFIG names a reproducible workspace, and
check that once, at the process's first product (a C++ static); torch 2.11 runs it either way
(measured on an H200: benchmarks/workspace_config.py --deterministic-check). So `name()` runs
when `finance_qlora.generation` is imported, before any product.

Yet torch also parses the variable, with a `std::regex`, each time a product takes its cuBLAS
handle (`getChosenWorkspaceSize`, not cached): on an H200 with torch 2.11, 58-77 us of host time
a product in the 7B preset's training while it is named, 17-25 us while it is not, and a
step makes about 830 of them. Where the host is what a step waits on, the training ran 1.26x
faster without it; where the card is, 1.02x (benchmarks/README.md, "The training without
CUBLAS_WORKSPACE_CONFIG"). `unnamed()` takes the variable away for the training's steps, after
one product made while it is named, so an older torch's once-only check has passed and a later
deterministic generation in the process still runs. Unset, torch's workspace is its default:
32 MiB on Hopper, the size `:4096:8` names (every product of a 7B layer's forward and backward
computed the same bits either way), about 8 MiB on other cards (kernels chosen for that size;
the training is not run deterministically anywhere).
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
_depth = 0  # trainings inside `unnamed()` now, in any thread
_taken: str | None = None  # the value the outermost one took away


def first_product(device: torch.device) -> None:
    """One small matrix product on `device`: the process's first, if none came before."""
    probe = torch.ones(8, 8, device=device)
    torch.mm(probe, probe)


def name() -> None:
    """Name the workspace unless the user did (their value is kept)."""
    os.environ.setdefault(VARIABLE, VALUE)


@contextmanager
def unnamed(device: torch.device) -> Iterator[None]:
    """The variable taken away while it lasts (on a CUDA device, where it was named), then
    named again as it was at the outermost entry. Nested and overlapping uses (two trainings
    in threads of one process) take it away once and give it back once, when the last ends."""
    global _depth, _taken
    if not UNNAMED_IN_TRAINING or device.type not in DEVICE_TYPES:
        yield
        return
    with _lock:
        if _depth == 0:
            _taken = os.environ.get(VARIABLE)
            if _taken is not None:
                # torch's once-only check reads the variable at the process's first product:
                # make that product now, while it is named (a no-op check if one came before)
                first_product(device)
                del os.environ[VARIABLE]
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _taken is not None:
                os.environ[VARIABLE] = _taken
                _taken = None
