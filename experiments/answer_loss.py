"""Held-out answer loss: how likely a model finds each test row's reference answer.

Each row's mean negative log-likelihood of its reference answer and EOS (what training
teaches, tokenized as TRL tokenizes a training row: prompt + completion + EOS, the loss on the
completion), teacher-forced, so no sampled or greedy answer is involved. ROUGE of greedy
answers moves in steps where one argmax flips (a 135M model answers several prompts otherwise
after a numerically different but equivalent training run); this loss moves smoothly, so two
recipes that teach alike show alike here even where their ROUGE differs by that noise.
"""

from __future__ import annotations

from pathlib import Path

import torch

from finance_qlora.batching import IGNORE


def answer_nll(
    model, tokenizer, prompts: list[str], answers: list[str], max_length: int, batch_size: int = 16
) -> list[float]:
    """Each row's mean NLL (nats a token) of answer + EOS given its prompt; a row longer than
    `max_length` tokens is cut at the end, as training cuts it."""
    eos = tokenizer.eos_token or ""
    rows = []
    for prompt, answer in zip(prompts, answers, strict=True):
        ids = tokenizer(text=prompt + answer + eos)["input_ids"][:max_length]
        start = len(tokenizer(text=prompt)["input_ids"])
        if start >= len(ids):
            raise ValueError(f"answer_nll: a prompt fills all {max_length} tokens; no answer left")
        rows.append((ids, start))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    losses: list[float] = []
    for first in range(0, len(rows), batch_size):
        batch = rows[first : first + batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (ids, start) in enumerate(batch):  # right padding: causal rows never see it
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, start : len(ids)] = torch.tensor(ids[start:])
            mask[i, : len(ids)] = 1
        with torch.no_grad():
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        # position t predicts token t + 1
        shifted = labels[:, 1:].to(device)
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), shifted, ignore_index=IGNORE, reduction="none"
        )
        counts = (shifted != IGNORE).sum(dim=1)
        losses.extend((nll.sum(dim=1) / counts).tolist())
    return losses


def rows_nll(
    model_cfg, examples: Path, adapter_dir: Path | None, max_length: int, dequantize: str
) -> list[float]:
    """`answer_nll` over an evaluation's examples (its prompts and references, in order), the
    model loaded as the project loads it, with the adapter at `adapter_dir` if given."""
    import pandas as pd

    from finance_qlora.modeling import loaded

    table = pd.read_parquet(examples)
    with loaded(model_cfg, adapter_dir=adapter_dir, dequantize=dequantize) as (model, tokenizer):
        return answer_nll(
            model, tokenizer, table["prompt"].tolist(), table["reference"].tolist(), max_length
        )
