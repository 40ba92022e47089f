"""Batched greedy generation: left padding, prompts sorted by length, only new tokens decoded."""

from __future__ import annotations

from collections.abc import Callable

import torch

from finance_qlora.prompts import cut_answer


@torch.inference_mode()
def generate_answers(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """One greedy answer per prompt, in the order given.

    Sorting by length keeps padding low; left padding puts every prompt's last token at the
    same position so all rows continue from the right place.
    """
    tokenizer.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        encoded = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True)
        encoded = {k: v.to(device) for k, v in encoded.items()}
        output = model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            do_sample=False,  # greedy: the same answer every time, for both models
            num_beams=1,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = output[:, encoded["input_ids"].shape[1] :]
        for i, text in zip(
            batch, tokenizer.batch_decode(new_tokens, skip_special_tokens=True), strict=True
        ):
            answers[i] = cut_answer(text)
        if on_progress is not None:
            on_progress(min(start + batch_size, len(order)), len(order))
    return answers
