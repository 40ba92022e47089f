"""How the card runs a training step: compiled decoder layers, no round trip of the adapters'
inputs through fp32 under mixed precision, and kernels patched in for training only.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

from finance_qlora.errors import ConfigError

# The layers' float attributes (RMSNorm's epsilon, LoRA's scaling and dropout rate, the
# attention's scale) compiled in as constants. Left dynamic (torch's default with dynamic
# shapes), each becomes a 0-d CPU float64 input that the graph converts with a C++ kernel; to
# build that kernel, or even find it in its cache, inductor first test-builds the CPU's vector
# instructions in every process (about 40 s of a warm-cache compile of the 7B layer on the
# H200's host, benchmarks/results/compile-load-NVIDIA-H200-2026-11-29*.json); and six to eight
# scalar tensors are made on the host at every layer call. Dynamo guards each constant: a
# changed value compiles again (never a stale one), and layers whose floats differ (per-layer
# LoRA alphas, which the project's LoRA settings do not make) would each take one of its 8
# recompiles, then run eagerly. benchmarks/variants.py switches it off to compare.
CONSTANT_FLOATS = True


def compile_layers(model, backend: str | Callable = "inductor") -> int:
    """torch.compile every decoder layer in place (regional compilation: the layers share one
    compiled graph, so the compile costs one layer's). Shapes are dynamic: packed and padded
    batches of every length reuse it. Inductor keeps the compiled kernels on the worker's disk
    (TORCHINDUCTOR_CACHE_DIR), where the next run finds them.

    The model's embeddings keep a hook making their output require a gradient (for one graph,
    below): a model compiled for training is for training.

    Dropout draws its masks from the eager random stream (inductor's `fallback_random`), so a
    compiled step computes what the eager one does, up to the rounding of fused arithmetic.
    Both that and CONSTANT_FLOATS hold for every graph compiled later in the process.
    `backend`: torch.compile's (a test records the graphs with its own)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    blocks = set(getattr(base, "_no_split_modules", None) or [])  # the repeated layer classes
    layers = [m for m in model.modules() if type(m).__name__ in blocks]
    if not layers:
        raise ConfigError(
            f"train.compile: {type(base).__name__} names no repeated layer class to compile; "
            "set train.compile=false"
        )
    # The frozen embeddings give the first layer an input without a gradient, the others one
    # with: dynamo would trace the first layer a graph of its own (no input gradient), traced,
    # differentiated and compiled besides the others'. Its input requiring a gradient too,
    # every layer runs one graph; the first layer's input gradient, never used, is under 0.5%
    # of a 7B step's arithmetic and changes no update.
    base.enable_input_require_grads()
    import torch._dynamo.config
    import torch._inductor.config

    # process-wide switches (neither has a per-graph one): eager random numbers, and float
    # attributes as constants, for every graph this process compiles
    torch._inductor.config.fallback_random = True
    torch._dynamo.config.specialize_float = CONSTANT_FLOATS
    for layer in layers:
        layer.compile(backend=backend, dynamic=True)
    return len(layers)


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
