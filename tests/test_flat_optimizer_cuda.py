"""On a CUDA card: bitsandbytes' 8-bit AdamW kernel gives the same weights, bit for bit, when
the q/v adapters of a LLaMA-2-7B-shaped model are updated in one call (finance_qlora.
flat_optimizer) as when they are updated one by one. Skipped elsewhere. On a lent GPU machine:
`bash benchmarks/device_steps.sh flat` (pytest among the carried wheels).
"""

from __future__ import annotations

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from finance_qlora import sync_free
from finance_qlora.flat_optimizer import flatten_adapters

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA card")


def adapters(layers: int = 32, hidden: int = 4096, rank: int = 16):
    """lora_A (rank x hidden) and lora_B (hidden x rank) of q and v on each layer, fp32."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(rank, hidden), (hidden, rank)] * 2 * layers
    return [
        torch.nn.Parameter(torch.randn(*s, device="cuda", generator=generator) * 0.02)
        for s in shapes
    ]


def trained(flat: bool, steps: int = 5) -> list[torch.Tensor]:
    import bitsandbytes as bnb

    params = adapters()
    optimizer = bnb.optim.PagedAdamW8bit(params, lr=2e-4, weight_decay=0.01)
    sync_free.without_parameter_syncs(optimizer)
    if flat:
        assert flatten_adapters(optimizer) == len(params)
    schedule = LambdaLR(optimizer, lambda step: (step + 1) / 3 if step < 2 else 1.0)
    generator = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, device="cuda", generator=generator) * 1e-3
        optimizer.step()
        schedule.step()
        for p in params:
            p.grad = None
    torch.cuda.synchronize()
    return params


def test_one_update_for_all_adapters_equals_one_per_adapter_on_the_gpu():
    each, flat = trained(False), trained(True)
    assert all(torch.equal(a, b) for a, b in zip(each, flat, strict=True))
    moved = trained(False, steps=0)
    assert not any(torch.equal(a, b) for a, b in zip(each, moved, strict=True))  # they moved


if __name__ == "__main__":
    test_one_update_for_all_adapters_equals_one_per_adapter_on_the_gpu()
    print("ok")
