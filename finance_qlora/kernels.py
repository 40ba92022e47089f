"""How the card runs a training step faster without changing what it computes: compiled
decoder layers, and no round trip of the adapters' inputs through fp32 under mixed precision.
"""

from __future__ import annotations

import os

from finance_qlora.builtin_models import cache_root
from finance_qlora.errors import ConfigError


def compile_layers(model) -> int:
    """torch.compile every decoder layer in place (regional compilation: the layers share one
    compiled graph, so the compile costs one layer's). Shapes are dynamic: packed and padded
    batches of every length reuse it. Compiled kernels go to $FINANCE_QLORA_CACHE/inductor
    (unless TORCHINDUCTOR_CACHE_DIR names a folder), where the next run on this worker finds
    them."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    blocks = set(getattr(base, "_no_split_modules", None) or [])  # the repeated layer classes
    layers = [m for m in model.modules() if type(m).__name__ in blocks]
    if not layers:
        raise ConfigError(
            f"train.compile: {type(base).__name__} names no repeated layer class to compile; "
            "set train.compile=false"
        )
    import torch._inductor.config

    torch._inductor.config.fallback_random = True
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def mixed_precision_inputs(trainer):
    """Under mixed precision PEFT casts each adapter's 16-bit input up to the adapters' fp32 and
    autocast casts it straight back for the matmul: the same values (every 16-bit number is
    exact in fp32), a cast and its backward per adapter and micro-batch. Skips PEFT's cast
    (peft.helpers.disable_input_dtype_casting) where autocast runs; elsewhere changes nothing."""
    from contextlib import nullcontext

    from peft.helpers import disable_input_dtype_casting

    if not (trainer.args.bf16 or trainer.args.fp16):
        return nullcontext()
    return disable_input_dtype_casting(trainer.model)
