"""Training batches by a token budget: rows of similar length together, padded only to the
longest row of their batch, as many rows as fit in `max_tokens` padded tokens (or, for
padding-free batches, `max_tokens` real tokens).

Batch 1 padded to 512 (the reference notebook) spends most of the GPU on padding and on
launching tiny matrix products; here a batch holds e.g. 4,096 tokens of real text.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


def token_budget_batches(
    lengths: list[int], max_tokens: int, padded: bool = True
) -> list[list[int]]:
    """Row indices grouped by length so that rows x longest row <= max_tokens per batch (with
    `padded` False: the sum of the rows' lengths, padding-free batches having no padding).

    A row longer than the budget gets a batch of its own (it is truncated upstream anyway).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0  # real tokens in `current`
    for index in order:
        # sorted: the new row is the batch's longest
        cost = lengths[index] * (len(current) + 1) if padded else real + lengths[index]
        if current and cost > max_tokens:
            batches.append(current)
            current, real = [], 0
        current.append(index)
        real += lengths[index]
    if current:
        batches.append(current)
    return batches


class TokenBudgetSampler(Sampler[list[int]]):
    """A batch sampler: fixed length-grouped batches, visited in a seeded order per epoch."""

    def __init__(self, lengths: list[int], max_tokens: int, seed: int, padded: bool = True):
        self.batches = token_budget_batches(lengths, max_tokens, padded)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        order = np.random.default_rng(self.seed + self.epoch).permutation(len(self.batches))
        for i in order:
            yield list(self.batches[i])
