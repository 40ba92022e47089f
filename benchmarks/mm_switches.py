"""Switches around the compiled layers' matrix products, for benchmarks/variants.py: their host
time recorded, cuBLASLt's heuristics cache resized, CUBLAS_WORKSPACE_CONFIG left named in the
training as before (each a context manager around one training run)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from functools import cache

import torch


@contextmanager
def mm_timed():
    """A diagnostic: the host's time of every `extern_kernels.mm` the compiled layers' code calls
    (forward and backward), printed after the run with how many shapes it met. The wrapper adds
    a timer pair and a set insertion to each call (its own cost not measured): compare runs
    that both have it."""
    import time
    from statistics import median

    from torch._inductor.select_algorithm import extern_kernels

    original, seconds, shapes = extern_kernels.mm, [], set()

    def timed(a, b, *args, **kwargs):
        start = time.perf_counter()
        out = original(a, b, *args, **kwargs)
        seconds.append(time.perf_counter() - start)
        shapes.add((tuple(a.shape), a.stride(), tuple(b.shape), b.stride()))
        return out

    extern_kernels.mm = timed
    try:
        yield
    finally:
        extern_kernels.mm = original
        if seconds:
            us = sorted(1e6 * x for x in seconds)
            print(
                f"  mm host: {len(us)} calls, median {median(us):.1f} us, mean "
                f"{sum(us) / len(us):.1f} us, p90 {us[int(0.9 * len(us))]:.1f} us, "
                f"over 60 us {sum(x > 60 for x in us) / len(us):.1%}, {len(shapes)} shapes",
                flush=True,
            )


@cache
def cublaslt():
    """The cuBLASLt library this process loaded (ctypes), loading it first if needed."""
    import ctypes
    from pathlib import Path

    torch.mm(torch.ones(8, 8, device="cuda"), torch.ones(8, 8, device="cuda"))
    for line in Path("/proc/self/maps").read_text().splitlines():
        if "libcublasLt" in line:
            return ctypes.CDLL(line.split()[-1])
    raise RuntimeError("libcublasLt is not loaded")


def heuristics_cache_capacity() -> int:
    """cuBLASLt's heuristics cache capacity (cublasLtHeuristicsCacheGetCapacity)."""
    import ctypes

    capacity = ctypes.c_size_t()
    cublaslt().cublasLtHeuristicsCacheGetCapacity(ctypes.byref(capacity))
    return capacity.value


@contextmanager
def heuristics_capacity(capacity: int = 65536):
    """cuBLASLt's heuristics cache (each matrix product's kernel choice, kept by shape; 8,192
    shapes by default) set to `capacity` for a run, then set back; with mm_timed."""
    import ctypes

    before = heuristics_cache_capacity()
    cublaslt().cublasLtHeuristicsCacheSetCapacity(ctypes.c_size_t(capacity))
    now = heuristics_cache_capacity()
    assert now == capacity, f"cuBLASLt kept its heuristics cache at {now}"
    try:
        with mm_timed():
            yield
    finally:
        cublaslt().cublasLtHeuristicsCacheSetCapacity(ctypes.c_size_t(before))


@contextmanager
def workspace_named(timed: bool = False):
    """The training with CUBLAS_WORKSPACE_CONFIG left named (as until 2026-11-30: each of its
    products then parses it, finance_qlora.cublas_workspace), its products' host time recorded
    where `timed`; then as it was."""
    from contextlib import nullcontext

    from finance_qlora import cublas_workspace

    before, value = cublas_workspace.UNNAMED_IN_TRAINING, os.environ.get(cublas_workspace.VARIABLE)
    cublas_workspace.UNNAMED_IN_TRAINING = False
    cublas_workspace.name()
    try:
        with mm_timed() if timed else nullcontext():
            yield
    finally:
        cublas_workspace.UNNAMED_IN_TRAINING = before
        if value is None:
            os.environ.pop(cublas_workspace.VARIABLE, None)
