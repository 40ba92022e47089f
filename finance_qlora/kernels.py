"""How the card runs a training step: compiled decoder layers, no round trip of the adapters'
inputs through fp32 under mixed precision, and kernels patched in for training only.
"""

from __future__ import annotations

from types import ModuleType

from finance_qlora.errors import ConfigError


def compile_layers(model) -> int:
    """torch.compile every decoder layer in place (regional compilation: the layers share one
    compiled graph, so the compile costs one layer's). Shapes are dynamic: packed and padded
    batches of every length reuse it. Inductor keeps the compiled kernels on the worker's disk
    (TORCHINDUCTOR_CACHE_DIR), where the next run finds them.

    Dropout draws its masks from the eager random stream (inductor's `fallback_random`), so a
    compiled step computes what the eager one does, up to the rounding of fused arithmetic."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    blocks = set(getattr(base, "_no_split_modules", None) or [])  # the repeated layer classes
    layers = [m for m in model.modules() if type(m).__name__ in blocks]
    if not layers:
        raise ConfigError(
            f"train.compile: {type(base).__name__} names no repeated layer class to compile; "
            "set train.compile=false"
        )
    import torch._inductor.config

    # a process-wide switch (inductor has no per-graph one); eager random numbers for every
    # graph this process compiles
    torch._inductor.config.fallback_random = True
    for layer in layers:
        layer.compile(dynamic=True)
    warm_compile_workers(wait=True)  # started before the model loaded (build_trainer)
    return len(layers)


def warm_compile_workers(wait: bool = False) -> None:
    """Start inductor's compile worker processes now (`maybe_warm_pool`, which inductor itself
    calls only at the first compiled call); `wait` blocks until they answer. Where the workers
    are not ready when a graph loads from inductor's cache, its Triton kernels load in this
    process one after the other: about 45 s of a warm-cache compile of the 7B layer on the
    H200 (benchmarks/compile_load.py). CPU builds compile C++ here and have no workers."""
    from torch.utils._triton import has_triton_package

    if not has_triton_package():
        return
    from torch._inductor.async_compile import AsyncCompile, maybe_warm_pool

    maybe_warm_pool()
    if wait:
        AsyncCompile.wait_pool_ready()


def uncast_adapter_inputs(trainer):
    """Under mixed precision PEFT casts each adapter's 16-bit input up to the adapters' fp32 and
    autocast casts it straight back for the matmul: a cast and its backward per adapter and
    micro-batch for the same values (every 16-bit number is exact in fp32). Skips PEFT's cast
    (peft.helpers.disable_input_dtype_casting) where autocast runs; elsewhere changes nothing.

    One thing changes: LoRA's dropout then draws its mask on the 16-bit tensor, and CUDA draws
    a different mask for a bf16 tensor than for its fp32 copy from the same seed (H200,
    2026-11-29, experiments/results/determinism-probe-h200.json): another draw from the same
    distribution, as another seed gives. The recipe's quality with it:
    benchmarks/results/recipe-quality-NVIDIA-H200-2026-11-29-compiled.json."""
    from contextlib import nullcontext

    from peft.helpers import disable_input_dtype_casting

    if not (trainer.args.bf16 or trainer.args.fp16):
        return nullcontext()
    return disable_input_dtype_casting(trainer.model)


class ModuleNames:
    """A module's names as they are now; `restore()` sets back any replaced since. Names added
    since stay: torch.compile adds its compiled functions to the module it traces, and later
    calls of those functions need them."""

    def __init__(self, module: ModuleType):
        self.module, self.saved = module, dict(vars(module))

    def restore(self) -> None:
        names = vars(self.module)
        for key, value in self.saved.items():
            if names.get(key) is not value:
                setattr(self.module, key, value)
