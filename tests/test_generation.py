"""Generation on the tiny 4-bit model: where answers stop, and what repeats are blocked."""

from __future__ import annotations

import pytest
import torch

from finance_qlora.config import resolve_config
from finance_qlora.generation import generate_raw
from finance_qlora.modeling import load_model, load_tokenizer
from finance_qlora.prompts import to_prompt_completion
from tests.conftest import make_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny():
    config = resolve_config("tiny-cpu")
    return load_model(config.model).eval(), load_tokenizer(config.model)


@pytest.fixture(scope="module")
def prompts():
    return [to_prompt_completion(r)["prompt"] for r in make_rows(3)]


def test_generation_stops_at_a_second_end_of_turn_id(tiny, prompts):
    model, tokenizer = tiny
    free = generate_raw(model, tokenizer, prompts[:1], 10, batch_size=1)[0]
    encoded = tokenizer(prompts[:1], return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**encoded, max_new_tokens=10, do_sample=False)
    ids = output[0, encoded["input_ids"].shape[1] :].tolist()
    # a plain token the free answer never uses becomes the model's second end-of-turn id
    second = next(t for t in range(100, len(tokenizer)) if t not in ids)
    calls = []

    def force_after_three_tokens(module, args, logits):
        calls.append(1)
        if len(calls) > 3:  # the prompt, then two decoding steps: three answer tokens
            logits[..., second] += 1e4
        return logits

    handle = model.lm_head.register_forward_hook(force_after_three_tokens)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, second]
    try:
        cut = generate_raw(model, tokenizer, prompts[:1], 10, batch_size=1)[0]
    finally:
        handle.remove()
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    assert free.new_tokens == len(ids) == 10 and tokenizer.eos_token_id not in ids
    assert cut.new_tokens == 3
    assert cut.text == tokenizer.decode(ids[:3])  # cut at the second id, which is not shown
