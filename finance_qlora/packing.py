"""Padding-free batches: the rows of a batch laid end to end in one sequence, each row's
position ids starting again at 0, and attention that never crosses from one row into another.

TRL's `padding_free` collator builds such a batch (with the row boundaries as `cu_seq_lens_q`);
this module gives the model an attention function that reads those boundaries:

- on CUDA from Ampere on, torch's variable-length FlashAttention (the aten op that
  `torch.nn.attention.varlen.varlen_attn` wraps, called directly: see `flash_varlen`);
- elsewhere (the CPU, a T4), or where that is missing, each row padded on the right to the
  longest and run through `scaled_dot_product_attention` with `is_causal=True`. Right padding
  needs no mask: a causal row never looks at the padding after it, so its outputs are exact.

Every linear layer then sees only real tokens, and attention costs the sum of the rows'
squared lengths, not one long sequence's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finance_qlora.errors import ConfigError

ATTENTION = "finance_qlora_varlen"


# torch's FlashAttention kernels for packed rows, with their autograd formula (the backward
# kernel); missing from builds without FlashAttention
try:
    _flash_forward = torch.ops.aten._flash_attention_forward
except AttributeError:
    _flash_forward = None

# The CUDA devices where it runs, found when the attention is registered: the forward (compiled
# with train.compile) then reads a set instead of asking the driver.
_FLASH_DEVICES: set[int] = set()


def find_flash_devices() -> None:
    """FlashAttention needs Ampere or newer (not the T4) and not to be turned off."""
    _FLASH_DEVICES.clear()
    if _flash_forward is None or not torch.cuda.is_available():
        return
    if torch.backends.cuda.flash_sdp_enabled():
        devices = range(torch.cuda.device_count())
        _FLASH_DEVICES.update(d for d in devices if torch.cuda.get_device_capability(d) >= (8, 0))


def _flash_capable(q: torch.Tensor) -> bool:
    """q on such a device, in fp16/bf16."""
    return (
        q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and (q.device.index or 0) in _FLASH_DEVICES
    )


def flash_varlen(q, k, v, cu_seq_lens: torch.Tensor, longest: int, scaling: float | None):
    """Causal FlashAttention of each row on its own; q/k/v: (tokens, heads, dim).

    The aten op that `varlen_attn` calls, no dropout, causal (`varlen_attn`'s window (-1, 0)
    is what FlashAttention makes of is_causal), so the same kernels forward and backward
    (tests/test_packing_cuda.py compares them); called directly because `varlen_attn` is a
    custom op with a list argument, which inductor's C++ wrapper cannot compile.
    """
    out, *_ = _flash_forward(
        q, k, v, cu_seq_lens, cu_seq_lens, longest, longest, 0.0, True, False, scale=scaling
    )
    return out


def padded_rows_attention(q, k, v, cu_seq_lens: torch.Tensor, scaling: float | None):
    """Causal attention of each row on its own; q/k/v: (tokens, heads, dim), rows end to end.

    Rows are gathered into a right-padded (rows, heads, longest, dim) batch, attended with
    is_causal, and scattered back; the padding's outputs are dropped.
    """
    bounds = cu_seq_lens.tolist()
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
    longest = max(lengths)
    # Row r, position p of the padded batch reads token bounds[r] + p (clamped: padding reads
    # the row's own last token, whose outputs are dropped).
    starts = cu_seq_lens[:-1].to(q.device, torch.long)
    ends = cu_seq_lens[1:].to(q.device, torch.long)
    index = starts[:, None] + torch.arange(longest, device=q.device)[None, :]
    index = torch.minimum(index, (ends - 1)[:, None])

    def gather(x):  # (tokens, heads, dim) -> (rows, heads, longest, dim)
        return x[index].transpose(1, 2)

    out = F.scaled_dot_product_attention(
        gather(q), gather(k), gather(v), is_causal=True, scale=scaling
    ).transpose(1, 2)  # (rows, longest, heads, dim)
    valid = torch.arange(longest, device=q.device)[None, :] < (ends - starts)[:, None]
    return out[valid]  # rows back to back: (tokens, heads, dim)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface for packed rows: query (1, heads, tokens, dim) with the
    rows' boundaries in `cu_seq_lens_q`; returns (1, tokens, heads, dim)."""
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    if cu_seq_lens is None or attention_mask is not None or query.shape[0] != 1:
        raise ValueError(
            f"{ATTENTION} attends padding-free batches only (TRL's padding_free collator); "
            "this batch has no row boundaries"
        )
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (tokens, heads, dim)
    if k.shape[1] != q.shape[1]:  # grouped-query attention: share each key/value head
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    if _flash_capable(q):
        cu = cu_seq_lens.to(q.device, torch.int32)
        longest = int(kwargs.get("max_length_q") or (cu[1:] - cu[:-1]).max())
        out = flash_varlen(q, k, v, cu, longest, scaling)
    else:
        out = padded_rows_attention(q, k, v, cu_seq_lens, scaling)
    return out.unsqueeze(0), None


def use_varlen_attention(model, model_name: str) -> None:
    """Register the packed-rows attention with transformers and switch `model` to it.

    A model whose code does not go through transformers' attention interface keeps its own
    attention, which would let packed rows attend to each other: refused.
    """
    from transformers import AttentionInterface

    find_flash_devices()
    AttentionInterface.register(ATTENTION, varlen_attention_forward)
    model.set_attn_implementation(ATTENTION)
    # the config's private field is where transformers records what set_attn_implementation
    # did (a model class without the pluggable interface keeps its own)
    if model.config._attn_implementation != ATTENTION:
        raise not_pluggable(model_name, type(model).__name__)


def not_pluggable(model_name: str, class_name: str) -> ConfigError:
    """The refusal for a model whose attention cannot be replaced (preflight and build)."""
    return ConfigError(
        f"train.padding_free: {model_name} ({class_name}) cannot keep packed rows apart (its "
        "attention is not transformers' pluggable kind); set train.padding_free=false"
    )
