"""The held-out answer loss of experiments/answer_loss.py: each row's NLL of its answer + EOS,
on the tiny 4-bit model, checked against transformers' own loss of that row alone."""

from __future__ import annotations

import math

import pytest
import torch

from experiments.answer_loss import answer_nll
from finance_qlora.prompts import build_prompt

PROMPTS = [
    build_prompt("What is a bond?"),
    build_prompt("Define the yield of a bond, briefly.", "It pays 5 a year and costs 100."),
    build_prompt("Why diversify?"),
]
ANSWERS = [
    "A loan to an issuer that pays interest.",
    "5%.",
    "Spreading money over assets lowers the risk of one loss taking much of it, at little cost.",
]


def own_loss(model, tokenizer, prompt: str, answer: str) -> float:
    """transformers' loss of one unpadded row with the prompt's labels masked."""
    ids = tokenizer(text=prompt + answer + tokenizer.eos_token)["input_ids"]
    start = len(tokenizer(text=prompt)["input_ids"])
    labels = [-100] * start + ids[start:]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
    return out.loss.item()


def test_each_row_is_its_answers_loss_alone(tiny):
    model, tokenizer = tiny
    batched = answer_nll(model, tokenizer, PROMPTS, ANSWERS, max_length=256, batch_size=3)
    alone = [own_loss(model, tokenizer, p, a) for p, a in zip(PROMPTS, ANSWERS, strict=True)]
    # rows of other lengths padded beside them change nothing (right padding, causal)
    assert batched == pytest.approx(alone, rel=1e-4)
    assert all(math.isfinite(x) and x > 0 for x in batched)


def test_a_prompt_filling_the_limit_is_refused(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="fills all 4 tokens"):
        answer_nll(model, tokenizer, PROMPTS[:1], ANSWERS[:1], max_length=4)
