"""Faults: resume after a crash, atomic saves, out-of-memory back-off, non-finite loss."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from finance_qlora.errors import FinanceQLoRAError, TrainingError
from finance_qlora.files import atomic_dir, read_jsonl, write_jsonl
from finance_qlora.modeling import loaded
from finance_qlora.presets import resolve_config
from finance_qlora.prompts import to_prompt_completion
from finance_qlora.training import latest_checkpoint, train_adapter
from tests.conftest import generate_cut, make_rows

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


class FailAtStep(TrainerCallback):
    """An injected crash (a preempted GPU, say) once training reaches `step`."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError(f"injected fault at step {self.step}")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "train.jsonl"
    write_jsonl(path, [to_prompt_completion(r) for r in make_rows(24)])
    return path


def _config(**train):
    return resolve_config("tiny-cpu", {"train": {"checkpoint_steps": 2, "epochs": 1, **train}})


def test_training_resumes_from_the_newest_checkpoint_and_matches(prompts, tmp_path):
    config = _config()
    args = (config.model, config.lora, config.train)
    whole = train_adapter(prompts, *args, tmp_path / "whole")

    out = tmp_path / "interrupted"
    with pytest.raises(RuntimeError, match="injected fault at step 5"):
        train_adapter(prompts, *args, out, callbacks=[FailAtStep(5)])
    assert latest_checkpoint(out).name == "checkpoint-4"
    assert not (out / "final").exists()

    resumed = train_adapter(prompts, *args, out)
    assert resumed.resumed_from == 4
    assert resumed.steps == whole.steps == 6
    assert len(resumed.losses) == len(whole.losses)  # the log carries on from the checkpoint
    assert resumed.losses == pytest.approx(whole.losses, rel=1e-4)
    a = load_file(whole.path / "adapter_model.safetensors")
    b = load_file(resumed.path / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)


def test_a_half_written_checkpoint_is_not_resumed(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-4").mkdir()  # killed before trainer_state.json was written
    assert latest_checkpoint(tmp_path).name == "checkpoint-2"


def test_training_out_of_memory_halves_the_micro_batches_and_keeps_the_steps(prompts, tmp_path):
    class OutOfMemoryAboveBatch(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if args.per_device_train_batch_size > 1:
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    config = _config(batch_size=4, rows_per_step=4, checkpoint_steps=0)
    record = train_adapter(
        prompts,
        config.model,
        config.lora,
        config.train,
        tmp_path,
        callbacks=[OutOfMemoryAboveBatch()],
    )
    # micro-batches of 1 row, 4 of them a step: the same optimizer steps
    assert (record.steps, record.micro_batches_per_step) == (24 // 4, 4)

    # Token-budget micro-batches: the budget halves too, down to one row of max_seq_length.
    import finance_qlora.training as training

    tried, real_build = [], training.build_trainer

    def build(prompts_path, model_cfg, lora, train, *args, **kwargs):
        tried.append((train.max_tokens_per_batch, train.batch_size, train.rows_per_step))
        if len(tried) > 4:
            raise AssertionError(f"no back-off to a budget that fits: {tried}")
        return real_build(prompts_path, model_cfg, lora, train, *args, **kwargs)

    class OutOfMemoryAboveBudget(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if tried[-1][0] > 256:
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "build_trainer", build)
        config = _config(
            max_tokens_per_batch=1024,
            max_seq_length=256,
            rows_per_step=4,
            checkpoint_steps=0,
        )
        budget = train_adapter(
            prompts,
            config.model,
            config.lora,
            config.train,
            tmp_path / "budget",
            callbacks=[OutOfMemoryAboveBudget()],
        )
    assert tried == [(1024, 4, 4), (512, 2, 4), (256, 1, 4)]
    assert budget.steps == 24 // 4

    config = _config(batch_size=1, checkpoint_steps=0)
    with pytest.raises(
        TrainingError, match="train.batch_size: out of GPU memory even at one row a micro-batch"
    ):
        train_adapter(
            prompts,
            config.model,
            config.lora,
            config.train,
            tmp_path / "b1",
            callbacks=[OutOfMemoryAboveBatch(), _AlwaysOutOfMemory()],
        )


class _AlwaysOutOfMemory(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")


def test_non_finite_loss_stops_training_naming_the_step(prompts, tmp_path):
    class PoisonWeights(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                for name, param in model.named_parameters():
                    if "lora_B" in name:
                        param.data.fill_(float("nan"))

    config = _config(logging_steps=1, checkpoint_steps=0)
    with pytest.raises(TrainingError, match="training loss is nan at step 3"):
        train_adapter(
            prompts, config.model, config.lora, config.train, tmp_path, callbacks=[PoisonWeights()]
        )


def out_of_memory_above(generate, rows: int, tried: list[int]):
    """`generate` that runs out of memory for a batch of more than `rows` prompts, each try's
    rows recorded in `tried`."""

    def small_memory(**kwargs):
        tried.append(kwargs["input_ids"].shape[0])
        if tried[-1] > rows:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return generate(**kwargs)

    return small_memory


def test_generation_out_of_memory_halves_the_batch_with_the_same_answers(prompts):
    config = resolve_config("tiny-cpu")
    texts = [r["prompt"] for r in read_jsonl(prompts)][:6]
    with loaded(config.model) as (model, tokenizer):
        expected = generate_cut(model, tokenizer, texts, 8, batch_size=1)
        sizes = []
        model.generate = out_of_memory_above(model.generate, 2, sizes)
        assert generate_cut(model, tokenizer, texts, 8, batch_size=8) == expected
        assert sizes[:3] == [6, 4, 2]  # halved twice, then it fits

        model.generate = out_of_memory_above(model.generate, 0, [])
        with pytest.raises(FinanceQLoRAError, match="out of GPU memory even at 1 prompt"):
            generate_cut(model, tokenizer, texts, 8, batch_size=2)


def test_generation_out_of_memory_halves_the_position_budget_too(prompts):
    """Where generation.max_tokens_per_batch, not batch_size, decided a batch's rows, halving
    batch_size alone would try the same batch again: the budget is halved with it."""
    from finance_qlora.config import GenerationSettings
    from finance_qlora.generation import cache_positions, generate_shard

    config = resolve_config("tiny-cpu")
    texts = [r["prompt"] for r in read_jsonl(prompts)][:6]
    with loaded(config.model) as (model, tokenizer):
        budget = 4 * max(cache_positions(tokenizer, texts, 8))  # 4 rows a batch, whatever lengths
        settings = GenerationSettings(max_new_tokens=8, batch_size=8, max_tokens_per_batch=budget)
        sizes = []
        model.generate = out_of_memory_above(model.generate, 2, sizes)
        generate_shard(model, tokenizer, texts, settings)
    assert sizes == [4, 2, 2, 2]  # the first batch of 4 once, then batches of 2


def test_generation_out_of_memory_at_a_batch_of_one_prompt_stops_at_once(prompts):
    """A prompt the budget already gave a batch of its own cannot be halved: one try, then the
    error, however large batch_size is."""
    from finance_qlora.config import GenerationSettings
    from finance_qlora.generation import (
        cache_positions,
        generate_shard,
        length_order,
        prompt_batches,
    )

    config = resolve_config("tiny-cpu")
    texts = [r["prompt"] for r in read_jsonl(prompts)][:6]
    with loaded(config.model) as (model, tokenizer):
        positions = cache_positions(tokenizer, texts, 8)
        budget = max(positions)  # rows of similar length: one a batch
        assert len(prompt_batches(length_order(texts), 64, positions, budget)[0]) == 1
        settings = GenerationSettings(max_new_tokens=8, batch_size=64, max_tokens_per_batch=budget)
        tries = []
        model.generate = out_of_memory_above(model.generate, 0, tries)  # never enough
        with pytest.raises(FinanceQLoRAError, match="out of GPU memory even at 1 prompt"):
            generate_shard(model, tokenizer, texts, settings)
    assert tries == [1]


def test_failed_save_leaves_no_folder_under_the_final_name(tmp_path):
    final = tmp_path / "adapter"
    with pytest.raises(OSError), atomic_dir(final) as tmp:
        (tmp / "adapter_config.json").write_text("{}")
        raise OSError("disk full (injected)")
    assert not final.exists() and not list(tmp_path.iterdir())


def test_killed_adapter_save_leaves_no_folder_under_the_final_name(tmp_path):
    """SIGKILL in the middle of save_adapter: no cleanup code runs, and still no final folder."""
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "adapter_config.json").write_text("{}")
    (trained / "adapter_model.safetensors").write_bytes(b"x" * 1024)
    script = f"""
import shutil, time
from pathlib import Path
import finance_qlora.adapter as adapter
from finance_qlora.presets import resolve_config
from finance_qlora.records import TrainRecord
real_copy = shutil.copy2
def slow_copy(src, dst):
    real_copy(src, dst)
    print("copied", flush=True)
    time.sleep(60)
adapter.shutil.copy2 = slow_copy
record = TrainRecord(folder=Path({str(trained)!r}), fingerprint="x", losses=[1.0], steps=1,
                     seconds=1.0)
config = resolve_config("tiny-cpu")
adapter.save_adapter(record, config.model, {{}}, Path({str(tmp_path / "adapter")!r}))
"""
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline().strip() == "copied"  # midway: one file written
        staged = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-adapter-")]
        assert len(staged) == 1 and (staged[0] / "adapter_model.safetensors").exists()
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    time.sleep(0.1)
    assert not (tmp_path / "adapter").exists()
