"""Batched greedy generation: left padding, prompts sorted by length, only new tokens decoded."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from finance_qlora.errors import FinanceQLoRAError
from finance_qlora.modeling import release_memory
from finance_qlora.prompts import cut_answer

log = logging.getLogger(__name__)


@torch.inference_mode()
def generate_answers(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    on_progress: Callable[[int, int], None] | None = None,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
) -> list[str]:
    """One greedy answer per prompt, in the order given.

    Sorting by length keeps padding low; left padding puts every prompt's last token at the
    same position so all rows continue from the right place.
    """
    tokenizer.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    device = next(model.parameters()).device
    settings = {
        "max_new_tokens": max_new_tokens,
        "do_sample": False,  # greedy: the same answer every time, for both models
        "num_beams": 1,
        "temperature": None,
        "top_p": None,
        "top_k": None,
        "repetition_penalty": repetition_penalty,
        "no_repeat_ngram_size": no_repeat_ngram_size,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    start, size = 0, batch_size
    while start < len(order):
        batch = order[start : start + size]
        encoded = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True)
        encoded = {k: v.to(device) for k, v in encoded.items()}
        try:
            output = model.generate(**encoded, **settings)
        except torch.OutOfMemoryError:
            # Halve the batch and try the same rows again (greedy answers do not depend on it).
            release_memory()
            if size == 1:
                raise FinanceQLoRAError(
                    "generation.batch_size: out of GPU memory even at 1 prompt; lower "
                    "generation.max_new_tokens or data sizes, or use a larger GPU"
                ) from None
            size //= 2
            log.warning("out of GPU memory: generating %d prompts at a time", size)
            continue
        new_tokens = output[:, encoded["input_ids"].shape[1] :]
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        for i, text in zip(batch, texts, strict=True):
            answers[i] = cut_answer(text)
        start += len(batch)
        if on_progress is not None:
            on_progress(start, len(order))
    return answers
