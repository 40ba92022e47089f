"""Generation on the tiny 4-bit model: where answers stop, and what repeats are blocked."""

from __future__ import annotations

import os

import pytest
import torch

from finance_qlora.config import GenerationSettings
from finance_qlora.generation import (
    GeneratedNgramBlocker,
    cache_positions,
    generate_shard,
    prompt_batches,
    shard_batches,
)
from finance_qlora.prompts import to_prompt_completion
from tests.conftest import generate, make_rows


@pytest.fixture(scope="module")
def prompts():
    return [to_prompt_completion(r)["prompt"] for r in make_rows(3)]


@pytest.mark.slow
def test_generation_stops_at_a_second_end_of_turn_id(tiny, prompts):
    model, tokenizer = tiny
    free = generate(model, tokenizer, prompts[:1], 10, batch_size=1)[0]
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
        cut = generate(model, tokenizer, prompts[:1], 10, batch_size=1)[0]
    finally:
        handle.remove()
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    assert free.new_tokens == len(ids) == 10 and tokenizer.eos_token_id not in ids
    assert cut.new_tokens == 3
    assert cut.text == tokenizer.decode(ids[:3])  # cut at the second id, which is not shown


def _banned(processor, prompt: list[int], generated: list[int], vocab: int = 12) -> set[int]:
    scores = processor(torch.tensor([prompt + generated]), torch.zeros(1, vocab))
    return set(torch.nonzero(scores[0] == float("-inf")).flatten().tolist())


def test_an_ngram_only_in_the_prompt_is_never_banned():
    from transformers import NoRepeatNGramLogitsProcessor

    prompt, generated = [5, 6, 7, 9], [5, 6]  # the prompt holds (5, 6, 7); the answer not
    assert _banned(GeneratedNgramBlocker(3, len(prompt)), prompt, generated) == set()
    # what transformers' no_repeat_ngram_size does instead: the prompt's 7 is banned
    assert _banned(NoRepeatNGramLogitsProcessor(3), prompt, generated) == {7}
    # an n-gram across the prompt/answer boundary is not the answer's either
    prompt, generated = [9, 5], [6, 7, 5, 6]  # (5, 6, 7) starts in the prompt
    assert _banned(GeneratedNgramBlocker(3, len(prompt)), prompt, generated) == set()


def test_an_ngram_generated_once_is_banned_from_coming_again():
    prompt = [1, 1]
    blocker = GeneratedNgramBlocker(3, len(prompt))
    assert _banned(blocker, prompt, [5, 6, 7, 8, 5, 6]) == {7}
    assert _banned(blocker, prompt, [5, 6, 7, 5, 6, 8, 5, 6]) == {7, 8}
    assert _banned(blocker, prompt, [5, 6]) == set()  # no complete n-gram yet
    assert _banned(GeneratedNgramBlocker(1, 2), prompt, [3, 4]) == {3, 4}


def _repeated_ngrams(ids: list[int], n: int) -> int:
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) - len(set(grams))


@pytest.mark.slow
def test_greedy_answers_with_the_blocker_repeat_no_generated_ngram(tiny, prompts):
    from transformers import LogitsProcessorList

    model, tokenizer = tiny
    n, new = 3, 40
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    width = encoded["input_ids"].shape[1]

    def answers(processors) -> list[list[int]]:
        with torch.no_grad():
            output = model.generate(
                **encoded,
                max_new_tokens=new,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                logits_processor=LogitsProcessorList(processors),
            )
        return output[:, width:].tolist()

    free, blocked = answers([]), answers([GeneratedNgramBlocker(n, width)])
    assert all(_repeated_ngrams(ids, n) > 0 for ids in free)  # the random model loops
    assert all(_repeated_ngrams(ids, n) == 0 for ids in blocked)
    # the configured path: generation.block_repeat_ngram gives the same answers
    raw = generate(model, tokenizer, prompts, new, batch_size=3, block_repeat_ngram=n)
    assert [g.text for g in raw] == [
        tokenizer.decode(ids, skip_special_tokens=True) for ids in blocked
    ]


@pytest.mark.slow
def test_a_static_cache_gives_the_dynamic_caches_answers(tiny):
    """The static cache (written in place, allocated once) changes speed, not answers: the same
    greedy tokens for prompts of different lengths in one left-padded batch."""
    model, tokenizer = tiny
    prompts = [to_prompt_completion(r)["prompt"] for r in make_rows(7)]
    dynamic = GenerationSettings(max_new_tokens=20, batch_size=3)
    static = dynamic.model_copy(update={"cache": "static"})
    calls = []
    original = model.generate

    def spy(*args, **kwargs):
        calls.append((kwargs["cache_implementation"], kwargs["disable_compile"]))
        return original(*args, **kwargs)

    model.generate = spy
    try:
        answers = generate_shard(model, tokenizer, prompts, dynamic)
        assert generate_shard(model, tokenizer, prompts, static) == answers
    finally:
        del model.generate
    assert set(calls) == {("dynamic", True), ("static", True)}  # never compiled
    assert [answers[i].new_tokens for i in range(7)] == [20] * 7  # random weights: no EOS


def deterministic_state() -> tuple[bool, bool]:
    return (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )


def test_gpu_generation_runs_torchs_strict_deterministic_algorithms(monkeypatch):
    from finance_qlora.generation import reproducible

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.use_deterministic_algorithms(True, warn_only=True)  # the process's own setting
    try:
        with reproducible(True, torch.device("cuda", 0)):
            # strict: memory-efficient attention takes its reproducible kernel only then
            assert deterministic_state() == (True, False)
            assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert deterministic_state() == (True, True)  # set back
        for enabled, device in ((False, "cuda"), (True, "cpu")):  # off, or the CPU: untouched
            with reproducible(enabled, torch.device(device)):
                assert deterministic_state() == (True, True)
    finally:
        torch.use_deterministic_algorithms(False)


def test_each_batch_is_generated_under_the_settings_determinism(tiny, prompts, monkeypatch):
    from contextlib import nullcontext

    from finance_qlora import generation as module

    seen = []
    monkeypatch.setattr(module, "reproducible", lambda *args: seen.append(args) or nullcontext())
    model, tokenizer = tiny
    for deterministic in (True, False):
        settings = GenerationSettings(max_new_tokens=2, batch_size=2, deterministic=deterministic)
        generate_shard(model, tokenizer, prompts, settings)
    cpu = torch.device("cpu")
    assert seen == [(True, cpu)] * 2 + [(False, cpu)] * 2  # 3 prompts: 2 batches each


def test_an_op_without_a_deterministic_kernel_is_one_line_naming_the_setting(tiny, prompts):
    from finance_qlora.errors import FinanceQLoRAError

    model, tokenizer = tiny
    refusal = (
        "scatter_add_cuda_kernel does not have a deterministic implementation, but you set "
        "'torch.use_deterministic_algorithms(True)'."
    )

    def refuse(*args, **kwargs):
        raise RuntimeError(refusal)

    settings = GenerationSettings(max_new_tokens=2, batch_size=2)
    original = model.generate
    model.generate = refuse
    try:
        with pytest.raises(FinanceQLoRAError, match=r"generation\.deterministic: .*=false"):
            generate_shard(model, tokenizer, prompts, settings)
        off = settings.model_copy(update={"deterministic": False})
        with pytest.raises(RuntimeError, match="scatter_add"):  # not this setting's doing
            generate_shard(model, tokenizer, prompts, off)
    finally:
        model.generate = original


def test_without_a_budget_batches_are_runs_of_batch_size_prompts():
    order = [4, 2, 0, 1, 3]
    assert prompt_batches(order, 2) == [[4, 2], [0, 1], [3]]
    # the positions change nothing without a budget (the presets that set none)
    assert prompt_batches(order, 2, positions=[900] * 5) == [[4, 2], [0, 1], [3]]


def test_a_long_prompt_gets_a_batch_of_its_own_within_the_budget():
    # five short prompts and one long one, sorted by length as generate_shard sorts them
    positions = [10, 12, 11, 10, 12, 60]
    order = [0, 3, 2, 1, 4, 5]
    assert prompt_batches(order, 6) == [order]  # 6 rows x 60 = 360 positions
    batches = prompt_batches(order, 6, positions, budget=100)
    assert batches == [[0, 3, 2, 1, 4], [5]]  # 5 x 12 = 60, then 60
    for batch in batches:
        assert len(batch) * max(positions[i] for i in batch) <= 100
    # a prompt over the budget alone is still a batch; batch_size still caps the rows
    assert prompt_batches(order, 6, positions, budget=50) == [[0, 3, 2, 1], [4], [5]]
    assert prompt_batches(order, 2, positions, budget=1000) == [[0, 3], [2, 1], [4, 5]]
    with pytest.raises(ValueError, match="positions"):
        prompt_batches(order, 6, budget=100)


def test_a_batch_is_as_wide_as_its_widest_row_wherever_it_falls():
    # prompts are ordered by characters; a shorter one can hold more tokens than the next
    assert prompt_batches([0, 1, 2], 6, [100, 10, 10], budget=150) == [[0], [1, 2]]
    assert prompt_batches([0, 1, 2], 6, [10, 100, 10], budget=150) == [[0], [1], [2]]


def test_no_prompts_make_no_batches_with_or_without_a_budget(tiny):
    model, tokenizer = tiny
    for budget in (None, 1000):
        settings = GenerationSettings(max_new_tokens=4, max_tokens_per_batch=budget)
        assert generate_shard(model, tokenizer, [], settings) == {}


def test_a_budget_must_hold_one_prompt_and_its_answer():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="cannot hold one prompt and max_new_tokens 24"):
        GenerationSettings(max_new_tokens=24, max_tokens_per_batch=24)
    assert GenerationSettings(max_new_tokens=24, max_tokens_per_batch=25).max_tokens_per_batch


def test_shards_with_a_budget_together_are_the_batches_of_one_process():
    positions = [10, 12, 11, 10, 12, 60, 13, 14]
    order = sorted(range(8), key=lambda i: positions[i])
    whole = shard_batches(order, 4, positions=positions, budget=52)
    assert whole == [[0, 3, 2, 1], [4, 6, 7], [5]]  # 4 x 12; 3 x 14; 60 alone
    shards = [shard_batches(order, 4, rank, 2, positions, 52) for rank in range(2)]
    assert sorted(b for shard in shards for b in shard) == sorted(whole)
    assert shards == [whole[0::2], whole[1::2]]


@pytest.mark.slow
def test_a_budget_splits_off_a_long_prompt_with_the_same_answers(tiny):
    """generation.max_tokens_per_batch: the long prompt is generated alone, the short ones
    together, and every answer is the one a batch of one gives."""
    model, tokenizer = tiny
    short = [to_prompt_completion(r)["prompt"] for r in make_rows(4)]
    long = to_prompt_completion(
        {
            "instruction": " ".join(["What is the discounted cash flow of a bond?"] * 12),
            "input": "",
            "output": "",
        }
    )["prompt"]
    prompts = [short[0], long, *short[1:]]
    widths = cache_positions(tokenizer, prompts, 4)
    budget = len(short) * max(widths[i] for i in (0, 2, 3, 4))  # the short ones fit together
    assert widths[1] * 2 > budget  # the long one with any other does not
    settings = GenerationSettings(max_new_tokens=4, batch_size=8, max_tokens_per_batch=budget)
    rows, original = [], model.generate

    def spy(**kwargs):
        rows.append(kwargs["input_ids"].shape[0])
        return original(**kwargs)

    model.generate = spy
    try:
        split = generate_shard(model, tokenizer, prompts, settings)
    finally:
        model.generate = original
    assert sorted(rows) == [1, 4]
    alone = generate_shard(
        model, tokenizer, prompts, GenerationSettings(max_new_tokens=4, batch_size=1)
    )
    assert split == alone
