"""Decode steps' attention through `decode_kernel` while generating (`generation.decode_kernel`).

Half the GPU time of the preset's 300 x 128 generation of LLaMA-2-7B went to one kernel: torch's
memory-efficient attention over the whole static cache at each decode step, masked positions
read and discarded (benchmarks/README.md, "The first generation"). `decode_kernel` reads only
the positions a row attends to. It is registered with transformers' attention interface under
`ATTENTION` and takes the decode steps it can (one query position on a GPU, a boolean mask or
none); every other call (the prefill, an additive mask, a model with attention extras) goes to
transformers' SDPA attention unchanged.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from finance_qlora import toolchain

log = logging.getLogger(__name__)

ATTENTION = "finance_qlora_decode"
# arguments of transformers' attention calls that change what is computed; with any of them
# set the call goes to SDPA's path (which refuses or handles them as it does)
EXTRAS = ("softcap", "s_aux", "position_bias", "sinks")


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


# The tests' switch: with it on and Triton's interpreter chosen (TRITON_INTERPRET=1 before
# Triton is imported), the kernel runs on CPU tensors. Off, a CPU always attends with SDPA,
# whatever a user's environment says.
INTERPRETER_ON_CPU = False


def interpreted() -> bool:
    return INTERPRETER_ON_CPU and os.environ.get("TRITON_INTERPRET") == "1"


def kernel_takes(heads: int, kv_heads: int, dim: int, dtype: torch.dtype) -> bool:
    """Whether the kernel computes attention with these heads, head size and dtype."""
    return (
        dtype in (torch.float16, torch.bfloat16, torch.float32)
        and heads % kv_heads == 0
        and 16 <= dim <= 256
        and dim & (dim - 1) == 0  # a power of two: the kernel's vectors
    )


def kernel_applies(module, query, key, value, attention_mask, dropout, kwargs) -> bool:
    """Whether `decode_kernel.masked_decode` computes this call as SDPA would."""
    heads, dim = query.shape[1], query.shape[-1]
    return (
        (query.is_cuda or interpreted())
        and query.shape[2] == 1
        and not dropout
        and not module.training
        and kernel_takes(heads, key.shape[1], dim, query.dtype)
        and key.dtype == value.dtype == query.dtype
        # one key/value per query row and head size (SDPA would broadcast a batch of one)
        and key.shape == value.shape
        and key.shape[0] == query.shape[0]
        and key.shape[-1] == dim
        and all(x.stride(-1) == 1 for x in (query, key, value))
        and all(kwargs.get(name) is None for name in EXTRAS)
        and (
            attention_mask is None
            or (
                attention_mask.dtype == torch.bool
                and attention_mask.dim() == 4
                and attention_mask.shape[-2] == 1
                and attention_mask.shape[-1] == key.shape[2]
            )
        )
    )


def decode_attention_forward(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query (rows, heads, positions, dim), key and value
    (rows, kv_heads, cache positions, dim); returns (rows, positions, heads, dim)."""
    if not kernel_applies(module, query, key, value, attention_mask, dropout, kwargs):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    from finance_qlora.decode_kernel import masked_decode

    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = masked_decode(query, key, value, attention_mask, scale)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make `ATTENTION` known to transformers: the attention above, SDPA's boolean masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, decode_attention_forward)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def unavailable(device: torch.device) -> str | None:
    """Why the kernel cannot run on `device`, or None."""
    if device.type != "cuda":
        if not interpreted():
            return f"the model is on {device.type}, the kernel needs a GPU"
        return None if triton_installed() else "Triton is not installed (pip install triton)"
    return toolchain.triton_missing()


@contextmanager
def decode_kernel(model, wanted: bool, device: torch.device) -> Iterator[bool]:
    """While it lasts, `model`'s attention is `ATTENTION` (yields True), where it is wanted, the
    kernel can run on `device` (a GPU with Triton, its C compiler and Python's headers) and the
    model attends with SDPA (the kernel's fallback, so every call it does not take is computed
    as before); otherwise as it was (yields False)."""
    if not wanted:
        yield False
        return
    before = getattr(model.config, "_attn_implementation", None)
    reason = unavailable(device)
    if reason is None and before != "sdpa":
        reason = f"the model attends with {before!r}, not 'sdpa'"
    elif reason is None:
        register()
        model.set_attn_implementation(ATTENTION)
        # transformers only warns where a model's attention cannot be swapped
        if model.config._attn_implementation != ATTENTION:
            reason = f"{type(model).__name__}'s attention cannot be swapped"
    if reason:
        log.warning("generation: decode steps attend with SDPA (%s)", reason)
        yield False
        return
    try:
        yield True
    finally:
        model.set_attn_implementation(before)


def head_layout(model_config) -> tuple[int, int, int]:
    """(heads, key/value heads, head size) of a model's config."""
    text = model_config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return heads, kv_heads, getattr(text, "head_dim", None) or text.hidden_size // heads


@contextmanager
def compiled_ahead(
    heads: int, kv_heads: int, dim: int, dtype: torch.dtype, device: torch.device
) -> Iterator[None]:
    """While it lasts (the model's load), Triton compiles the kernel for these heads in a
    thread, or reads it from its disk cache, so that the first generation does not wait for it
    (H200: the first 300 x 128 generation 4.5-4.7 s against 6.0-6.5 s). Left when the thread is
    done; a thread that fails says so, and the first decode step compiles the kernel as before.
    Nothing where the kernel cannot run or would not take these heads."""
    if unavailable(device) is not None or not kernel_takes(heads, kv_heads, dim, dtype):
        yield
        return

    def compile_kernel() -> None:
        started = time.perf_counter()
        try:
            from finance_qlora.decode_kernel import warm_up

            # Triton compiles for, and caches under, the current device: the model's
            with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
                warm_up(heads, kv_heads, dim, dtype, device)
        except Exception as exc:  # the generation compiles it, or meets the error itself
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            log.warning("generation: the decode kernel was not compiled ahead (%s)", first)
            return
        log.debug("generation: decode kernel ready in %.1f s", time.perf_counter() - started)

    thread = threading.Thread(target=compile_kernel, name="decode-kernel-ahead", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()
