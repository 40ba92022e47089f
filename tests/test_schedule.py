"""The optimizer-step schedule is the recipe's: `train.rows_per_step` rows a step, whatever the
card computes them in (token budgets, padding-free rows, processes, an out-of-memory back-off,
a resume), every row once an epoch, and no step at learning rate 0."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from transformers import TrainerCallback
from transformers.optimization import get_scheduler

from finance_qlora.batching import Empty, StepSampler
from finance_qlora.files import write_jsonl
from finance_qlora.presets import PRESETS, resolve_config
from finance_qlora.prompts import to_prompt_completion
from finance_qlora.schedule import optimizer_steps
from finance_qlora.step_trainer import micro_batching, warmup_that_updates
from finance_qlora.training import smaller_micro_batches, train_adapter
from tests.conftest import make_rows

# Lengths like the real rows' (a long tail up to max_seq_length), 1,000 rows: the default data.
LENGTHS = np.random.default_rng(7).integers(40, 512, size=1000).tolist()


def _samplers(train, processes: int, rows: list[int] = LENGTHS, epochs: int = 1):
    how = micro_batching(train)
    return [
        StepSampler(rows, train.rows_per_step, how, seed=42, epochs=epochs, rank=r, processes=n)
        for n in [processes]
        for r in range(n)
    ]


def _rows_by_step(samplers: list[StepSampler], epoch: int = 0) -> list[list[int]]:
    """Every process's micro-batches of each step, empty work left out, rows in a list."""
    steps = None
    for sampler in samplers:
        plan = sampler.plan(epoch)
        steps = steps or [[] for _ in plan]
        assert len(plan) == len(steps)
        for k, step in enumerate(plan):
            assert len(step) == sampler.micro_batches_per_step  # the Trainer's fixed count
            steps[k] += [i for batch in step if not isinstance(batch, Empty) for i in batch]
    return steps


@pytest.mark.parametrize("processes", [1, 2, 3, 4])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_steps_hold_the_recipes_rows_on_any_process_count(preset, processes):
    train = resolve_config(preset).train
    assert train.rows_per_step == (4 if preset == "tiny-cpu" else 16)
    samplers = _samplers(train, processes)
    steps = _rows_by_step(samplers)
    assert len(steps) == math.ceil(1000 / train.rows_per_step)
    assert [sorted(s) for s in steps] == [sorted(s) for s in samplers[0].steps(0)]
    visits = [i for step in steps for i in step]
    assert sorted(visits) == list(range(1000))  # every row once, none repeated
    assert len({len(s) for s in samplers}) == 1  # every process runs the same micro-batches


def test_the_schedule_does_not_depend_on_the_micro_batches():
    base = resolve_config("llama2-7b-t4").train
    variants = [
        base,
        base.model_copy(update={"max_tokens_per_batch": None, "batch_size": 1}),
        base.model_copy(update={"max_tokens_per_batch": 16384, "padding_free": True}),
        base.model_copy(update={"max_tokens_per_batch": 600}),
    ]
    plans = [[sorted(s) for s in _rows_by_step(_samplers(t, 1))] for t in variants]
    assert all(plan == plans[0] for plan in plans)
    assert [_samplers(t, 1)[0].micro_batches_per_step for t in variants[1:3]] == [16, 1]
    assert optimizer_steps(1000, 16, 1) == 63


def test_an_out_of_memory_back_off_splits_steps_finer_and_keeps_their_rows():
    train = resolve_config("llama2-7b-h100").train
    before = _samplers(train, 2)
    smaller = train
    for _ in range(4):  # 16,384 -> 1,024 real tokens
        smaller = smaller_micro_batches(smaller)
    after = _samplers(smaller, 2)
    assert after[0].micro_batches_per_step > before[0].micro_batches_per_step
    assert [sorted(s) for s in _rows_by_step(after)] == [sorted(s) for s in _rows_by_step(before)]


def test_uneven_steps_are_padded_with_empty_work_never_repeated_rows():
    train = resolve_config("smollm2-135m").train  # 16 rows a step
    samplers = _samplers(train, 2, rows=LENGTHS[:17])  # the last step holds one row
    last = [list(s.plan(0)[-1]) for s in samplers]
    assert sum(isinstance(b, Empty) for step in last for b in step) == 1
    assert sorted(i for step in _rows_by_step(samplers) for i in step) == list(range(17))
    assert [len(list(s)) for s in samplers] == [2, 2]  # both processes take part in both steps


def test_each_epoch_has_its_own_order():
    sampler = _samplers(resolve_config("llama2-7b-t4").train, 1, epochs=2)[0]
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and second == list(sampler)
    assert sorted(i for b in second for i in b) == sorted(i for b in first for i in b)


@pytest.mark.parametrize("name", ["constant_with_warmup", "cosine", "linear"])
def test_warmup_updates_from_its_first_step_and_leaves_the_rest(name):
    import torch

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    schedule = get_scheduler(name, optimizer, num_warmup_steps=2, num_training_steps=63)
    base = schedule.lr_lambdas[0]
    factor = warmup_that_updates(base, 2)
    assert base(0) == 0.0  # transformers' own: a whole step at lr 0
    assert [factor(0), factor(1)] == [0.5, 1.0]
    assert all(factor(s) == base(s) > 0 for s in range(2, 62))


# ---- through the real trainer (tiny model, CPU) ------------------------------------------


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("schedule") / "train.jsonl"
    rows = make_rows(40)
    for i, row in enumerate(rows):  # answers of very different lengths
        row["output"] = " ".join([row["output"]] * (1 + i % 5))
    write_jsonl(path, [to_prompt_completion(r) for r in rows])
    return path


class LearningRates(TrainerCallback):
    def __init__(self):
        self.rates: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "learning_rate" in logs:
            self.rates.append(logs["learning_rate"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "micro",
    [
        {"batch_size": 3},
        {"max_tokens_per_batch": 400},
        {"max_tokens_per_batch": 400, "padding_free": True},
    ],
)
def test_the_trainer_runs_the_recipes_steps_and_updates_from_the_first(prompts, tmp_path, micro):
    train = {"rows_per_step": 16, "epochs": 2, "warmup_ratio": 0.2, "logging_steps": 1, **micro}
    config = resolve_config("tiny-cpu", {"train": train})
    rates = LearningRates()
    record = train_adapter(
        prompts, config.model, config.lora, config.train, tmp_path, callbacks=[rates]
    )
    assert (record.rows, record.steps) == (40, 2 * math.ceil(40 / 16))
    assert record.rows_per_step == 16 and record.micro_batches_per_step > 1
    # ceil(0.2 x 6) = 2 warm-up steps: 1/2 and 1 of the rate, never 0
    assert rates.rates[:3] == pytest.approx([1e-3, 2e-3, 2e-3])


@pytest.mark.slow
def test_a_run_resumed_in_its_second_epoch_trains_that_epochs_order(prompts, tmp_path):
    from tests.test_reliability import FailAtStep

    config = resolve_config(
        "tiny-cpu",
        {"train": {"rows_per_step": 8, "epochs": 2, "checkpoint_steps": 2, "logging_steps": 1}},
    )
    args = (config.model, config.lora, config.train)
    whole = train_adapter(prompts, *args, tmp_path / "whole")
    out = tmp_path / "interrupted"
    with pytest.raises(RuntimeError, match="injected fault at step 7"):
        train_adapter(prompts, *args, out, callbacks=[FailAtStep(7)])  # epoch 2 of 5-step ones
    resumed = train_adapter(prompts, *args, out)
    assert resumed.resumed_from == 6 and resumed.steps == whole.steps == 10
    assert resumed.losses == pytest.approx(whole.losses, rel=1e-4)


@pytest.mark.slow
def test_two_processes_resumed_in_their_second_epoch_train_that_epochs_order(prompts, tmp_path):
    """The run on 2 processes stops after a checkpoint in its second epoch: that checkpoint,
    alone in a folder of its own (what a run stopped there leaves, without a race to kill the
    ranks in time), resumes to the losses the run went on to log."""
    config = resolve_config(
        "tiny-cpu",
        {"train": {"rows_per_step": 8, "epochs": 2, "checkpoint_steps": 2, "logging_steps": 1}},
    )
    args = (config.model, config.lora, config.train)
    whole = train_adapter(prompts, *args, tmp_path / "whole", processes=2)
    assert whole.steps == 10  # 5-step epochs; the last 2 checkpoints kept: steps 8 and 10
    stopped = tmp_path / "stopped" / "checkpoint-8"
    shutil.copytree(tmp_path / "whole" / "checkpoint-8", stopped)
    assert json.loads((stopped / "trainer_state.json").read_text())["epoch"] == pytest.approx(1.6)
    resumed = train_adapter(prompts, *args, stopped.parent, processes=2)
    assert resumed.resumed_from == 8 and resumed.steps == 10
    # steps 9 and 10 trained again: each rank's share of epoch 2's steps 4 and 5
    assert resumed.losses == pytest.approx(whole.losses, rel=1e-4)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("rows_per_step", 65_537, "train.rows_per_step"),
        ("batch_size", 1025, "train.batch_size"),
        ("max_tokens_per_batch", 2**20 + 1, "train.max_tokens_per_batch"),
        ("pad_to_multiple_of", 1024, "pad_to_multiple_of 1024 is above max_seq_length 512"),
    ],
)
def test_fields_that_size_memory_or_time_have_upper_bounds(field, value, message):
    from finance_qlora.errors import ConfigError

    resolve_config(
        "llama2-7b-t4", {"train": {field: value - 1 if field != "pad_to_multiple_of" else 512}}
    )
    with pytest.raises(ConfigError, match=message):
        resolve_config("llama2-7b-t4", {"train": {field: value}})


def test_every_benchmark_variant_is_a_configuration_at_the_recipes_schedule():
    """benchmarks/gpu_throughput.py resolves each variant against llama2-7b-h100, so a variant
    inherits what it does not set: each sets what it compares (the preset's compiled layers
    would otherwise reach the padded variants, and refuse the Liger ones)."""
    from benchmarks.variants import TRAIN_VARIANTS

    compiled = set()
    for name, train in TRAIN_VARIANTS.items():
        config = resolve_config("llama2-7b-h100", {"train": train}).train
        assert config.rows_per_step == 16, name
        if config.compile:
            compiled.add(name)
    # the preset's own train section: as shipped, and with the heap (finance_qlora.heap) or the
    # optimizer registry (step_trainer.forget_optimizer_overrides) as before
    preset = {
        "llama2-7b-h100",
        "llama2-7b-h100-heap-as-before",
        "llama2-7b-h100-registry-as-before",
        "llama2-7b-h100-guards-skipped",  # a diagnostic of dynamo's guards
        "llama2-7b-h100-mm-timed",  # diagnostics of the matrix products' host time
        "llama2-7b-h100-heuristics-65536",
        "llama2-7b-h100-workspace-named",  # the workspace variable named while it trains
        "llama2-7b-h100-mm-timed-workspace-named",
    }
    assert compiled == {n for n in TRAIN_VARIANTS if "compiled" in n or n in preset}
