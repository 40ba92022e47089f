"""Switches around the compiled layers' matrix products, for benchmarks/variants.py: their host
time recorded, cuBLASLt's heuristics cache resized, CUBLAS_WORKSPACE_CONFIG taken away (each a
context manager around one training run)."""

from __future__ import annotations

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
def workspace_unnamed():
    """CUBLAS_WORKSPACE_CONFIG taken away for a run, then named again as it was. torch reads the
    variable once for its deterministic algorithms, at the process's first matrix product (a
    C++ static): one product is made first while it is named, so a deterministic generation
    later in the process still finds it was. Something reads it at every product (the host's
    time a product follows it: workspace_config.py --named-later), so the runs' products do not
    pay for it. Does nothing where it is unset. Where the variable sets the size of torch's cuBLAS
    workspace, taking it away leaves torch's default: the same 32 MiB as `:4096:8` on Hopper and
    later cards, less on older ones."""
    import os

    value = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if value is None:
        yield
        return
    if torch.cuda.is_available():
        probe = torch.ones(8, 8, device="cuda", dtype=torch.bfloat16)
        torch.mm(probe, probe)
    del os.environ["CUBLAS_WORKSPACE_CONFIG"]
    try:
        with mm_timed():
            yield
    finally:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = value
