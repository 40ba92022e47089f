"""Batched greedy generation: left padding, prompts sorted by length, only new tokens decoded."""

from __future__ import annotations

import inspect
import logging
import math
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import NamedTuple

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from finance_qlora import cublas_workspace
from finance_qlora.config import GenerationSettings
from finance_qlora.decode_attention import decode_kernel
from finance_qlora.decode_graphs import decode_graphs
from finance_qlora.errors import FinanceQLoRAError
from finance_qlora.modeling import release_memory, stop_token_ids

log = logging.getLogger(__name__)
# cuBLAS's workspace for reproducible matmuls (`reproducible`), named before the process's first
# matmul, when older torch versions check it once (finance_qlora.cublas_workspace; training
# takes it away)
cublas_workspace.name()


class Generated(NamedTuple):
    """One answer as generated, before the cut at the next '### ' section."""

    text: str  # the new tokens up to the first end-of-turn id, decoded
    new_tokens: int  # tokens before that id; == max_new_tokens: the answer hit the limit


class GeneratedNgramBlocker(LogitsProcessor):
    """Ban every token that would repeat an n-gram of the answer generated so far.

    Only generated tokens count: transformers' `no_repeat_ngram_size` also bans the prompt's
    n-grams, so an answer could not quote the question or the template. With left padding
    every row's answer starts at `prompt_length`.
    """

    def __init__(self, n: int, prompt_length: int):
        if n < 1:
            raise ValueError(f"n-gram size must be at least 1, got {n}")
        self.n, self.prompt_length = n, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        n = self.n
        generated = input_ids[:, self.prompt_length :].tolist()
        for row, ids in enumerate(generated):
            if len(ids) < n:
                continue  # no complete n-gram yet
            prefix = ids[len(ids) - n + 1 :]  # what the next token would complete
            banned = {
                ids[i + n - 1] for i in range(len(ids) - n + 1) if ids[i : i + n - 1] == prefix
            }
            scores[row, list(banned)] = float("-inf")
        return scores


def _until_stop(ids: list[int], stop: set[int]) -> list[int]:
    """The tokens before the first end-of-turn id (the rest is that id and padding)."""
    for i, token in enumerate(ids):
        if token in stop:
            return ids[:i]
    return ids


def length_order(prompts: list[str]) -> list[int]:
    """The prompts' indexes, shortest first: batches of similar lengths pad little."""
    return sorted(range(len(prompts)), key=lambda i: len(prompts[i]))


def prompt_batches(
    order: list[int], size: int, positions: list[int] | None = None, budget: int | None = None
) -> list[list[int]]:
    """Consecutive runs of `order` of at most `size` prompts and, with a `budget`, at most that
    many cache positions: rows x the longest row's `positions` (its prompt tokens plus the new
    tokens), what a left-padded batch's cache holds. One long prompt then gets a batch of its
    own instead of padding every other prompt to its length; a prompt over the budget alone
    is still a batch. `order` is by characters (`length_order`, as without a budget, so the
    same batches where the budget cuts none), tokens may not follow it: a batch's width is its
    widest row's, wherever that row falls in it."""
    if budget is not None and positions is None:
        raise ValueError("a budget of cache positions needs each prompt's positions")
    # without a budget every row is of width 0 and no batch is too wide
    limit = budget if budget is not None else math.inf
    row_width = positions.__getitem__ if budget is not None else (lambda i: 0)
    batches: list[list[int]] = []
    batch: list[int] = []
    widest = 0  # the current batch's widest row, in positions
    for i in order:
        width = max(widest, row_width(i))
        if batch and (len(batch) == size or (len(batch) + 1) * width > limit):
            batches.append(batch)
            batch, width = [], row_width(i)
        batch.append(i)
        widest = width
    return [*batches, batch] if batch else batches


def shard_batches(
    order: list[int],
    size: int,
    rank: int = 0,
    world: int = 1,
    positions: list[int] | None = None,
    budget: int | None = None,
) -> list[list[int]]:
    """The batches of `order` (`prompt_batches`), and of those every `world`-th from `rank`: N
    processes together form exactly the batches of one, so they give the same answers."""
    return prompt_batches(order, size, positions, budget)[rank::world]


def cache_positions(tokenizer, prompts: list[str], new_tokens: int) -> list[int]:
    """Each prompt's positions in a cache: its tokens as generation encodes them, plus the new
    tokens."""
    if not prompts:  # the tokenizer takes no empty list
        return []
    return [len(ids) + new_tokens for ids in tokenizer(prompts)["input_ids"]]


def decoding(generation: GenerationSettings) -> dict:
    """generate()'s sampling arguments: greedy (the same answer every time, for every model)
    unless `do_sample`."""
    if not generation.do_sample:
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {
        "do_sample": True,
        "temperature": generation.temperature,
        "top_p": generation.top_p,
        "top_k": generation.top_k,  # 0: no cut
    }


@contextmanager
def reproducible(enabled: bool, device: torch.device) -> Iterator[None]:
    """torch's deterministic algorithms on a CUDA device while it lasts, then the process's
    own setting again. Strict, not warn-only: memory-efficient attention (the kernel for
    left-padded batches) takes its reproducible path only then. Older torch versions refuse a
    matmul in this mode unless cuBLAS's workspace is named (finance_qlora.cublas_workspace)."""
    if not enabled or device.type != "cuda":
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cublas_workspace.name()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


# generate() reads whether every row has finished one decode step late on these devices (see
# `stop_checks_deferred`); empty: at every step, as transformers does on them (benchmarks)
DEFERRED_STOP_DEVICES: tuple[str, ...] = ("cuda",)
# inside `stop_checks_deferred` (per thread and task, so overlapping uses cannot undo another's)
_LATE_STOP: ContextVar[bool] = ContextVar("late_stop", default=False)


def _late_stop_rule(original: staticmethod):
    """transformers' rule for deferring the stop, extended to `DEFERRED_STOP_DEVICES` inside
    `stop_checks_deferred`, where the cache is not handed back and no assistant model runs."""

    def is_supported(device, cache, cache_is_returned, is_assistant) -> bool:
        if (
            _LATE_STOP.get()
            and device.type in DEFERRED_STOP_DEVICES
            and not is_assistant
            and not cache_is_returned
        ):
            return True
        return original.__func__(device, cache, cache_is_returned, is_assistant)

    is_supported.transformers_rule = original
    return staticmethod(is_supported)


@contextmanager
def stop_checks_deferred(device: torch.device) -> Iterator[None]:
    """While it lasts, generate() on a CUDA device (`DEFERRED_STOP_DEVICES`) decides to stop
    one decode step late.

    Deciding at once (`unfinished_sequences.max() == 0`) makes the host wait for the card
    every step, and the card then waits while the host prepares the next step (the logits'
    copy, the token choice, the next inputs). transformers' `DeferredStopCheck` reads the flag
    a step late, so the host queues step t + 1 while the card computes step t; it undoes the
    one extra step it may run, so the answers are the same. transformers enables it on Apple
    GPUs only; this enables it on CUDA, where the cache is not returned to the caller (ours
    never is), as transformers itself requires. The rule is installed once, and applies only
    inside this context. A logits processor that reads tokens on the host (the n-gram
    blockers) still waits every step. A 300 x 128 generation of LLaMA-2-7B on an H200: about
    0.1 s less, within the spread between processes (benchmarks/README.md)."""
    from transformers.generation import utils

    deferred = getattr(utils, "DeferredStopCheck", None)  # None in older transformers: as is
    rule = deferred and inspect.getattr_static(deferred, "is_supported", None)
    expected = ["device", "cache", "cache_is_returned", "is_assistant"]
    if (
        device.type not in DEFERRED_STOP_DEVICES
        or not isinstance(rule, staticmethod)
        or list(inspect.signature(rule.__func__).parameters) != expected
    ):
        yield
        return
    if not hasattr(rule.__func__, "transformers_rule"):
        deferred.is_supported = _late_stop_rule(rule)
    token = _LATE_STOP.set(True)
    try:
        yield
    finally:
        _LATE_STOP.reset(token)


def graphs_wanted(generation: GenerationSettings, device: torch.device) -> bool:
    """Decode steps as CUDA graphs: with a static cache on a GPU, and only where the eager
    step is reproducible (`generation.deterministic`), so that a recording can be checked
    against it."""
    return (
        generation.cuda_graphs
        and generation.deterministic
        and generation.cache == "static"
        and device.type == "cuda"
    )


@torch.inference_mode()
def generate_shard(
    model,
    tokenizer,
    prompts: list[str],
    generation: GenerationSettings,
    rank: int = 0,
    world: int = 1,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[int, Generated]:
    """The answers of process `rank` of `world` (see `shard_batches`), by prompt index: uncut,
    with their token counts.

    Sorting by length keeps padding low; left padding puts every prompt's last token at the
    same position so all rows continue from the right place. Generation stops at every
    end-of-turn id of the model (its generation config may list several) and the tokenizer's
    EOS. `generation.block_repeat_ngram` > 0 bans repeating an n-gram of the answer
    (`GeneratedNgramBlocker`).
    """
    tokenizer.padding_side = "left"
    order = length_order(prompts)
    size, budget = generation.batch_size, generation.max_tokens_per_batch
    positions = None
    if budget is not None:
        positions = cache_positions(tokenizer, prompts, generation.max_new_tokens)
    pending = deque(shard_batches(order, size, rank, world, positions, budget))
    total = sum(map(len, pending))
    answers: dict[int, Generated] = {}
    device = next(model.parameters()).device
    stop = stop_token_ids(model, tokenizer)
    settings = {
        "max_new_tokens": generation.max_new_tokens,
        **decoding(generation),
        "num_beams": 1,
        "repetition_penalty": generation.repetition_penalty,
        "no_repeat_ngram_size": generation.no_repeat_ngram_size,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": stop,
        "cache_implementation": generation.cache,
        # transformers compiles the forward for a static cache; that costs more time than a
        # whole evaluation here, so never
        "disable_compile": True,
    }
    with (
        decode_kernel(model, generation.decode_kernel == "triton", device),
        decode_graphs(model, graphs_wanted(generation, device)) as graphs,
        stop_checks_deferred(device),
    ):
        while pending:
            batch = pending.popleft()
            encoded = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True)
            encoded = {k: v.to(device) for k, v in encoded.items()}
            try:
                output = generate_batch(model, encoded, settings, generation, batch[0])
            except torch.OutOfMemoryError:
                # Halve the batches and try the same rows again. Greedy answers can change with
                # the batch's composition (padding changes the kernels' shapes and so the
                # rounding; in fp16/bf16 a near-tie between two tokens can flip), so a run that
                # backed off is not bit-identical to one that did not.
                release_memory()
                if len(batch) == 1:  # nothing left to halve (batches never exceed size)
                    raise FinanceQLoRAError(
                        "generation.batch_size: out of GPU memory even at 1 prompt; lower "
                        "generation.max_new_tokens or data sizes, or use a larger GPU"
                    ) from None
                size //= 2  # the configured size halved, not this (maybe short) batch's
                if budget is not None:
                    budget = max(budget // 2, 1)
                rest = [i for b in (batch, *pending) for i in b]
                pending = deque(shard_batches(rest, size, positions=positions, budget=budget))
                log.warning(
                    "out of GPU memory at %d prompts: generating at most %d at a time%s",
                    len(batch),
                    size,
                    f" within {budget} cache positions" if budget is not None else "",
                )
                continue
            finally:
                if graphs is not None:
                    graphs.drop()  # the batch's graph and, with it, its key/value cache
            new_tokens = output[:, encoded["input_ids"].shape[1] :].tolist()
            for i, ids in zip(batch, new_tokens, strict=True):
                ids = _until_stop(ids, set(stop))
                answers[i] = Generated(tokenizer.decode(ids, skip_special_tokens=True), len(ids))
            if on_progress is not None:
                on_progress(len(answers), total)
    if graphs is not None:
        log.info(
            "generation: %d decode steps replayed as CUDA graphs (%d recorded)%s",
            graphs.replays,
            graphs.captures,
            f"; then eager: {graphs.eager_reason}" if graphs.eager_reason else "",
        )
    return answers


def generate_batch(
    model, encoded: dict, settings: dict, generation: GenerationSettings, first: int
):
    """One batch's `generate`, under the setting's determinism; sampling seeded by the batch's
    first prompt (`first`), so one process or several give the same answers."""
    if generation.do_sample:
        torch.manual_seed(generation.seed + first)
    blockers = LogitsProcessorList()
    if generation.block_repeat_ngram:
        prompt_length = encoded["input_ids"].shape[1]
        blockers.append(GeneratedNgramBlocker(generation.block_repeat_ngram, prompt_length))
    device = encoded["input_ids"].device
    try:
        with reproducible(generation.deterministic, device):
            return model.generate(**encoded, **settings, logits_processor=blockers)
    except RuntimeError as exc:  # out of memory (a subclass) goes on to the caller's back-off
        if not generation.deterministic or "deterministic" not in str(exc):
            raise
        # torch refuses an op without a deterministic kernel on this GPU and torch version
        raise FinanceQLoRAError(
            "generation.deterministic: this GPU or torch version has no deterministic "
            f"kernel for an op of generation ({str(exc).splitlines()[0][:160]}); set "
            "generation.deterministic=false (answers may then differ run to run)"
        ) from None
