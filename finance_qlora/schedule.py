"""What a configuration plans, in numbers and words: the optimizer-step schedule (rows a
step, steps an epoch, how the card computes a step) and the GPUs that devices.num_gpus "auto"
gives each step.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from finance_qlora.config import (
    AUTO_MIN_PROMPTS,
    AUTO_MIN_ROW_EPOCHS,
    AUTO_MIN_ROWS_PER_GPU,
    FinetuneConfig,
    GenerationSettings,
    TrainSettings,
)


def steps_per_epoch(rows: int, rows_per_step: int) -> int:
    return math.ceil(rows / rows_per_step)


def generation_batches(prompts: int, generation: GenerationSettings) -> int:
    """How many batches `prompts` prompts make at least (`generation.prompt_batches` forms
    them; generation.max_tokens_per_batch can split off more where prompts are long)."""
    return math.ceil(prompts / generation.batch_size)


def generation_batches_words(batches: int, generation: GenerationSettings) -> str:
    """`generation_batches`' count in words: a lower bound where a budget can split more."""
    bound = "at least " if generation.max_tokens_per_batch else ""
    return f"{bound}{batches} batch(es) of prompts"


def optimizer_steps(rows: int, rows_per_step: int, epochs: float) -> int:
    """What the Trainer runs: ceil(epochs x steps per epoch)."""
    return math.ceil(epochs * steps_per_epoch(rows, rows_per_step))


def micro_batch_words(train: TrainSettings) -> str:
    """How one step's rows are computed on the card, in words."""
    if train.max_tokens_per_batch:
        kind = "real" if train.padding_free else "padded"
        return f"at most {train.max_tokens_per_batch} {kind} tokens"
    return f"{train.batch_size} rows"


def schedule_line(config: FinetuneConfig) -> str:
    """The optimizer-step schedule in words (--show-config)."""
    train, rows = config.train, config.data.train_size
    return (
        f"schedule: {train.rows_per_step} rows an optimizer step, "
        f"{steps_per_epoch(rows, train.rows_per_step)} steps an epoch of {rows} training rows, "
        f"{optimizer_steps(rows, train.rows_per_step, train.epochs)} steps in "
        f"{train.epochs:g} epoch(s) at lr {train.learning_rate:g} ({train.lr_scheduler}); "
        f"computed in micro-batches of {micro_batch_words(train)}"
    )


class StepWork(NamedTuple):
    """A step's work, the amount from which devices.num_gpus "auto" spreads it over several
    GPUs, the unit both are counted in, and the most GPUs its work divides over with each
    GPU's share still worth a process (the limit in words)."""

    work: float
    auto_from: float
    unit: str
    most_gpus: int
    limit: str

    def auto_gpus(self, visible: int) -> int:
        """GPUs "auto" gives this step on a host with `visible` of them."""
        if self.work < self.auto_from:
            return 1
        return max(1, min(visible, self.most_gpus))


def work_per_step(config: FinetuneConfig) -> dict[str, StepWork]:
    """What "auto" decides each multi-GPU step by: training by rows x epochs, split no finer
    than AUTO_MIN_ROWS_PER_GPU rows of a step a GPU; evaluation by the prompts evaluated (the
    test rows, or a sweep's validation rows), at least one batch of them a GPU."""
    train, rows, prompts = config.train, config.data.train_size, config.data.evaluated_rows
    step_rows = min(train.rows_per_step, rows)  # a step never holds more than the split
    batches = generation_batches(prompts, config.generation)
    return {
        "training": StepWork(
            rows * train.epochs,
            AUTO_MIN_ROW_EPOCHS,
            "row-epochs",
            step_rows // AUTO_MIN_ROWS_PER_GPU,
            f"{step_rows} rows a step, at least {AUTO_MIN_ROWS_PER_GPU} a GPU",
        ),
        "evaluation": StepWork(
            prompts,
            AUTO_MIN_PROMPTS,
            "prompts",
            batches,
            generation_batches_words(batches, config.generation),
        ),
    }


def devices_line(config: FinetuneConfig) -> str:
    """What devices.num_gpus asks for, in words (--show-config; the flow logs its choice)."""
    asked = config.devices.num_gpus
    if asked is None:
        return "devices: every GPU the worker sees (devices.num_gpus unset)"
    if asked != "auto":
        return f"devices: {asked} GPU(s) (devices.num_gpus)"
    training, evaluation = work_per_step(config).values()

    def gpus(step: StepWork) -> str:
        most = step.auto_gpus(step.most_gpus)  # on a host with GPUs enough
        return "one GPU" if most == 1 else f"up to {most} GPUs"

    return (
        f"devices: auto: training on {gpus(training)} for {config.data.train_size} rows x "
        f"{config.train.epochs:g} epoch(s) = {training.work:g} row-epochs (several from "
        f"{AUTO_MIN_ROW_EPOCHS}; {training.limit}), evaluating on {gpus(evaluation)} for "
        f"{evaluation.work} prompts (several from {AUTO_MIN_PROMPTS}; {evaluation.limit}): "
        "more GPUs only where they repay their per-process start-up"
    )
