"""Batched greedy generation: left padding, prompts sorted by length, only new tokens decoded."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import torch

from finance_qlora.errors import FinanceQLoRAError
from finance_qlora.modeling import release_memory, stop_token_ids
from finance_qlora.prompts import cut_answer

log = logging.getLogger(__name__)


class Generated(NamedTuple):
    """One answer as generated, before the cut at the next '### ' section."""

    text: str  # the new tokens up to the first end-of-turn id, decoded
    new_tokens: int  # tokens before that id; == max_new_tokens: the answer hit the limit


def _until_stop(ids: list[int], stop: set[int]) -> list[int]:
    """The tokens before the first end-of-turn id (the rest is that id and padding)."""
    for i, token in enumerate(ids):
        if token in stop:
            return ids[:i]
    return ids


@torch.inference_mode()
def generate_raw(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    on_progress: Callable[[int, int], None] | None = None,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
) -> list[Generated]:
    """One greedy answer per prompt, in the order given, uncut, with its token count.

    Sorting by length keeps padding low; left padding puts every prompt's last token at the
    same position so all rows continue from the right place. Generation stops at every
    end-of-turn id of the model (its generation config may list several) and the tokenizer's EOS.
    """
    tokenizer.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[Generated] = [Generated("", 0)] * len(prompts)
    device = next(model.parameters()).device
    stop = stop_token_ids(model, tokenizer)
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
        "eos_token_id": stop,
    }
    start, size = 0, batch_size
    while start < len(order):
        batch = order[start : start + size]
        encoded = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True)
        encoded = {k: v.to(device) for k, v in encoded.items()}
        try:
            output = model.generate(**encoded, **settings)
        except torch.OutOfMemoryError:
            # Halve the batch and try the same rows again. Greedy answers can change with the
            # batch's composition (padding changes the kernels' shapes and so the rounding; in
            # fp16/bf16 a near-tie between two tokens can flip), so a run that backed off is
            # not bit-identical to one that did not.
            release_memory()
            if size == 1:
                raise FinanceQLoRAError(
                    "generation.batch_size: out of GPU memory even at 1 prompt; lower "
                    "generation.max_new_tokens or data sizes, or use a larger GPU"
                ) from None
            size //= 2
            log.warning("out of GPU memory: generating %d prompts at a time", size)
            continue
        new_tokens = output[:, encoded["input_ids"].shape[1] :].tolist()
        for i, ids in zip(batch, new_tokens, strict=True):
            ids = _until_stop(ids, set(stop))
            answers[i] = Generated(tokenizer.decode(ids, skip_special_tokens=True), len(ids))
        start += len(batch)
        if on_progress is not None:
            on_progress(start, len(order))
    return answers


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
    """One greedy answer per prompt, cut at the next '### ' section (see `generate_raw`)."""
    generated = generate_raw(
        model,
        tokenizer,
        prompts,
        max_new_tokens,
        batch_size,
        on_progress,
        repetition_penalty,
        no_repeat_ngram_size,
    )
    return [cut_answer(g.text) for g in generated]
