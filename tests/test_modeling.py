"""Model loading choices that decide correctness on each card: dtype, special tokens."""

from __future__ import annotations

import pytest
import torch

from finance_qlora.modeling import compute_dtype


@pytest.mark.parametrize(
    "capability, expected",
    [((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)],
)
def test_auto_dtype_follows_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    # a T4 reports bf16 support (emulated): it must not decide
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert compute_dtype("auto") == expected


def test_auto_dtype_on_the_cpu_and_explicit_names(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert compute_dtype("auto") == torch.float32
    assert compute_dtype("float16") == torch.float16
