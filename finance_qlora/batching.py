"""Optimizer steps and micro-batches: the schedule is the recipe's, the micro-batches the card's.

One optimizer step holds `train.rows_per_step` rows (16 by default: 63 steps for 1,000 rows),
drawn in a seeded order per epoch, whatever the card, the token budget, padding-free packing or
the number of processes. How one step's rows are computed is a separate choice: split over the
processes (each takes a share of similar length), then into micro-batches of `batch_size` rows,
or of at most `max_tokens` tokens (padded: rows x longest row; padding-free: the sum of the
rows' lengths). Gradients accumulate over a step's micro-batches and the loss is the
token-weighted mean over all of them, so the split never changes what a step computes.

The Trainer accumulates a fixed number of micro-batches per step, so every share is cut into
exactly `micro_batches_per_step` of them: a share that needs fewer is split further, and a
share with fewer rows than that (the last step, several processes) is padded with empty work:
a row whose labels are all masked, which adds nothing to the loss or the gradients.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from torch.utils.data import Dataset, Sampler

from finance_qlora.schedule import steps_per_epoch

IGNORE = -100  # the label the loss skips


@dataclass(frozen=True)
class MicroBatching:
    """How one process computes its share of a step: `batch_rows` rows a micro-batch, or, with
    `max_tokens`, as many rows as fit that many tokens (`padded`: rows x longest row)."""

    batch_rows: int = 1
    max_tokens: int | None = None
    padded: bool = True


@dataclass(frozen=True)
class Empty:
    """Empty work: row `index` with every label masked (keeps the processes in step)."""

    index: int


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


def shares(rows: list[int], lengths: list[int], processes: int) -> list[list[int]]:
    """A step's rows dealt to the processes, longest first, each to the process with the fewest
    tokens so far: every process gets rows, and about the same work, whenever it can."""
    dealt: list[list[int]] = [[] for _ in range(processes)]
    tokens = [0] * processes
    for row in sorted(rows, key=lambda i: (-lengths[i], i)):
        rank = min(range(processes), key=lambda r: (len(dealt[r]) > 0, tokens[r], r))
        dealt[rank].append(row)
        tokens[rank] += lengths[row]
    return dealt


def micro_batches(rows: list[int], lengths: list[int], how: MicroBatching) -> list[list[int]]:
    """One process's share of a step, grouped by length into micro-batches."""
    if not rows:
        return []
    if how.max_tokens:
        local = token_budget_batches([lengths[i] for i in rows], how.max_tokens, how.padded)
        return [[rows[j] for j in batch] for batch in local]
    ordered = sorted(rows, key=lambda i: (lengths[i], i))
    return [ordered[i : i + how.batch_rows] for i in range(0, len(ordered), how.batch_rows)]


def exactly(batches: list[list[int]], count: int, spare: int) -> list[list[int] | Empty]:
    """`batches` made exactly `count` micro-batches: the one with most rows split in two while
    any has two rows, then empty work on row `spare`."""
    out = [list(b) for b in batches]
    while len(out) < count and any(len(b) > 1 for b in out):
        largest = max(range(len(out)), key=lambda i: len(out[i]))
        batch = out.pop(largest)
        half = len(batch) // 2
        out[largest:largest] = [batch[:half], batch[half:]]
    return [*out, *[Empty(spare)] * (count - len(out))]


class StepSampler(Sampler[list]):
    """A batch sampler over one process's micro-batches: step after step, each step exactly
    `micro_batches_per_step` of them, in an order seeded per epoch (`set_epoch`).

    `epochs` (whole epochs planned, >= the run's) fixes `micro_batches_per_step` up front: the
    Trainer accumulates a fixed number, the largest any step of any epoch on any process needs.
    """

    def __init__(
        self,
        lengths: list[int],
        rows_per_step: int,
        how: MicroBatching,
        seed: int,
        epochs: int = 1,
        rank: int = 0,
        processes: int = 1,
    ):
        if not lengths:
            raise ValueError("no rows to sample")
        self.lengths, self.rows_per_step, self.how = list(lengths), rows_per_step, how
        self.seed, self.rank, self.processes = seed, rank, processes
        self.epoch = 0
        # Each epoch's steps as (a row of the step, this process's micro-batches before
        # padding), split once: the fixed micro-batch count needs every epoch's split anyway.
        splits = {epoch: self.split(epoch) for epoch in range(max(epochs, 1))}
        self.planned = {epoch: own for epoch, (own, _) in splits.items()}
        self.micro_batches_per_step = max(most for _, most in splits.values())

    def steps(self, epoch: int) -> list[list[int]]:
        """The epoch's optimizer steps: a seeded permutation cut every `rows_per_step` rows."""
        order = np.random.default_rng(self.seed + epoch).permutation(len(self.lengths)).tolist()
        return [order[i : i + self.rows_per_step] for i in range(0, len(order), self.rows_per_step)]

    def split(self, epoch: int) -> tuple[list[tuple[int, list[list[int]]]], int]:
        """Every step of `epoch` split over the processes and into micro-batches: this
        process's, and the most micro-batches any process needs for a step."""
        own, most = [], 1
        for step in self.steps(epoch):
            every = [
                micro_batches(share, self.lengths, self.how)
                for share in shares(step, self.lengths, self.processes)
            ]
            most = max(most, *map(len, every))
            own.append((step[0], every[self.rank]))
        return own, most

    def plan(self, epoch: int) -> list[list[list[int] | Empty]]:
        """This process's micro-batches, step by step, exactly `micro_batches_per_step` each."""
        if epoch not in self.planned:  # past the epochs planned for
            self.planned[epoch] = self.split(epoch)[0]
        return [
            exactly(batches, self.micro_batches_per_step, spare=row)
            for row, batches in self.planned[epoch]
        ]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return steps_per_epoch(len(self.lengths), self.rows_per_step) * self.micro_batches_per_step

    def __iter__(self) -> Iterator[list]:
        for step in self.plan(self.epoch):
            for batch in step:
                yield [batch] if isinstance(batch, Empty) else list(batch)


class MaskableRows(Dataset):
    """The training rows, where `Empty(i)` reads row i with every label masked."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | Empty) -> dict:
        if isinstance(key, Empty):
            row = dict(self.rows[key.index])
            row["labels"] = [IGNORE] * len(row["input_ids"])
            return row
        return self.rows[int(key)]
