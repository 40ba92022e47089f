"""On a CUDA card with FlashAttention (Ampere or newer): `packing.flash_varlen` gives exactly
what torch's public `varlen_attn` gives, forward and backward, and never lets one packed row see
another. Skipped elsewhere. On a lent GPU machine: `bash benchmarks/device_steps.sh packing`
(pytest among the carried wheels), or as a plain script from the repository root:

    PYTHONPATH=. python tests/test_packing_cuda.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

CAPABLE = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
pytestmark = pytest.mark.skipif(not CAPABLE, reason="needs a CUDA card with FlashAttention")

LENGTHS = [37, 5, 128, 64, 1, 300]  # packed rows of uneven lengths, one of a single token


def _seeded(seed: int):
    return torch.Generator(device="cuda").manual_seed(seed)


def packed(heads: int = 8, dim: int = 64, seed: int = 0):
    generator = _seeded(seed)
    tokens = sum(LENGTHS)
    q, k, v = (
        torch.randn(tokens, heads, dim, device="cuda", dtype=torch.bfloat16, generator=generator)
        for _ in range(3)
    )
    bounds = torch.tensor([0, *LENGTHS], device="cuda").cumsum(0).to(torch.int32)
    return q, k, v, bounds


def attend(fn, q, k, v, bounds):
    """Output and q/k/v gradients of sum(out * weights), weights fixed by a seed."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, bounds)
    weights = torch.randn(out.shape, device="cuda", generator=_seeded(1))
    (out.float() * weights).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def ours(q, k, v, bounds):
    from finance_qlora.packing import flash_varlen

    return flash_varlen(q, k, v, bounds, max(LENGTHS), None)


def torchs(q, k, v, bounds):
    from torch.nn.attention.varlen import varlen_attn

    longest = max(LENGTHS)
    return varlen_attn(q, k, v, bounds, bounds, longest, longest, window_size=(-1, 0))


def test_flash_varlen_is_varlen_attn_bit_for_bit():
    q, k, v, bounds = packed()
    pairs = zip(attend(ours, q, k, v, bounds), attend(torchs, q, k, v, bounds), strict=True)
    for mine, theirs in pairs:  # output, then the gradients of q, k and v
        assert torch.equal(mine, theirs)


def rowwise(q, k, v, bounds):
    """Each row attended alone: plain causal attention in fp32, the rows put back end to end."""
    rows = []
    for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        x = [t[start:end].float().transpose(0, 1) for t in (q, k, v)]  # (heads, len, dim)
        rows.append(F.scaled_dot_product_attention(*x, is_causal=True).transpose(0, 1))
    return torch.cat(rows)


def test_rows_attend_only_to_themselves_causally():
    """Output and gradients as if each row were attended alone: no row reads another, none
    reads its own future (bf16 kernels against fp32 arithmetic)."""
    q, k, v, bounds = packed(seed=2)
    pairs = zip(attend(ours, q, k, v, bounds), attend(rowwise, q, k, v, bounds), strict=True)
    for mine, yardstick in pairs:
        torch.testing.assert_close(mine.float(), yardstick.float(), atol=2e-2, rtol=2e-2)


if __name__ == "__main__":
    test_flash_varlen_is_varlen_attn_bit_for_bit()
    test_rows_attend_only_to_themselves_causally()
    print("flash_varlen: bit for bit as varlen_attn; rows attend only to themselves, causally")
