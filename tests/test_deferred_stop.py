"""generate() deciding to stop one decode step late (finance_qlora.generation.
stop_checks_deferred), run on the CPU: the devices it is enabled for include the CPU here, and
torch's device events (which the CPU lacks) are a double that records nothing: on the CPU every
op has finished when it returns, so waiting on one is waiting on nothing. What is checked is
the path transformers takes, with the dynamic cache and with the static cache's decode steps
replayed (the CPU double of a CUDA graph): the same answers, the extra step run and undone, and
the rule applying only inside the context."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from transformers.generation import utils

from finance_qlora import generation as generation_module
from finance_qlora.config import GenerationSettings
from finance_qlora.decode_graphs import decode_graphs
from finance_qlora.generation import generate_shard, stop_checks_deferred
from finance_qlora.prompts import to_prompt_completion
from tests.conftest import make_rows
from tests.test_decode_graphs import EagerReplay

pytestmark = pytest.mark.skipif(
    not hasattr(utils, "DeferredStopCheck"), reason="this transformers has no DeferredStopCheck"
)
LATE = ("cuda", "cpu")


class CountedReplay(EagerReplay):
    replays: list[int] = []

    def replay(self):
        CountedReplay.replays.append(1)
        super().replay()


class NoEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args) -> None:
        pass

    def synchronize(self) -> None:
        pass


@pytest.fixture
def deferred_on_cpu(monkeypatch):
    monkeypatch.setattr(generation_module, "DEFERRED_STOP_DEVICES", LATE)
    monkeypatch.setattr(torch, "Event", NoEvent)


class EndAt:
    """A forward hook on the model: its `n`-th call in a generation makes every row's next
    token the end of the answer (`n` = 4: three answer tokens, then the end). On the model,
    not a layer: a replayed step's recording runs the layers again, but calls the model once."""

    def __init__(self, model, eos: int, n: int = 4):
        self.eos, self.n, self.calls = eos, n, 0
        self.handle = model.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.calls += 1
        if self.calls == self.n:
            output.logits[..., self.eos] += 1e4
        return output


@contextmanager
def watched(model) -> Iterator[tuple[list[int], list[str]]]:
    """Count the forwards, and name the stop check generate() consults at each step."""
    forwards: list[int] = []
    checks: list[str] = []
    handle = model.register_forward_hook(lambda *_: forwards.append(1))
    kinds = {kind: kind.__call__ for kind in (utils.StopCheck, utils.DeferredStopCheck)}
    for kind, own in kinds.items():

        def call(self, *args, _own=own):
            checks.append(type(self).__name__)
            return _own(self, *args)

        kind.__call__ = call
    try:
        yield forwards, checks
    finally:
        handle.remove()
        for kind, own in kinds.items():
            kind.__call__ = own


@pytest.mark.slow
@pytest.mark.parametrize("stop_early", [False, True], ids=["to-the-limit", "all-end-early"])
@pytest.mark.parametrize("cache", ["dynamic", "static"], ids=["dynamic", "static-replayed"])
def test_a_late_stop_gives_the_same_answers_and_undoes_its_extra_step(
    tiny, deferred_on_cpu, monkeypatch, caplog, stop_early, cache
):
    model, tokenizer = tiny
    prompts = [to_prompt_completion(r)["prompt"] for r in make_rows(3)]
    settings = GenerationSettings(max_new_tokens=8, batch_size=3, cache=cache)
    CountedReplay.replays.clear()
    if cache == "static":  # decode steps replayed as on a GPU (tests/test_decode_graphs.py)
        graphs = lambda model, enabled: decode_graphs(model, True, CountedReplay)  # noqa: E731
        monkeypatch.setattr(generation_module, "decode_graphs", graphs)
    runs = {}
    for devices in [(), LATE]:
        monkeypatch.setattr(generation_module, "DEFERRED_STOP_DEVICES", devices)
        hook = EndAt(model, tokenizer.eos_token_id) if stop_early else None
        try:
            with watched(model) as (forwards, checks):
                answers = generate_shard(model, tokenizer, prompts, settings)
        finally:
            if hook is not None:
                hook.handle.remove()
        runs[devices] = (answers, len(forwards), set(checks))
    (now, steps_now, checks_now), (late, steps_late, checks_late) = runs.values()
    assert checks_now == {"StopCheck"} and checks_late == {"DeferredStopCheck"}
    assert late == now  # text and token counts
    if cache == "static":  # every forward but the prefill a replay (the first as recorded)
        assert "eagerly" not in caplog.text
        assert len(CountedReplay.replays) == (steps_now - 1) + (steps_late - 1)
    if stop_early:
        assert {a.new_tokens for a in now.values()} == {3}
        assert steps_late == steps_now + 1  # the step run while the stop was being read
    else:
        assert {a.new_tokens for a in now.values()} == {8}
        assert steps_late == steps_now  # at the length limit it stops at once


@pytest.mark.slow
def test_the_extra_step_is_undone_in_what_generate_returns(tiny, deferred_on_cpu):
    # generate_shard cuts each answer at its end, which would hide an extra token: here the
    # output of generate() itself, whose rows all end early
    model, tokenizer = tiny
    prompts = [to_prompt_completion(r)["prompt"] for r in make_rows(2)]
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    outputs = []
    for context in (torch.device("meta"), torch.device("cpu")):  # at every step, then late
        hook = EndAt(model, tokenizer.eos_token_id)
        try:
            with stop_checks_deferred(context), torch.no_grad():
                outputs.append(
                    model.generate(
                        **encoded,
                        max_new_tokens=8,
                        do_sample=False,
                        pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id,
                    )
                )
        finally:
            hook.handle.remove()
        assert hook.calls == (4 if context.type == "meta" else 5)
    now, late = outputs
    assert now.shape[1] == encoded["input_ids"].shape[1] + 4  # three tokens and the end
    assert torch.equal(late, now)


def test_the_rule_applies_inside_the_context_only():
    cuda = torch.device("cuda")

    def supported() -> bool:
        return utils.DeferredStopCheck.is_supported(cuda, None, False, False)

    assert not supported()  # transformers: Apple GPUs only
    with stop_checks_deferred(cuda):
        assert supported()
        # a cache handed back to the caller, or an assistant model: transformers' own rule
        assert not utils.DeferredStopCheck.is_supported(cuda, None, True, False)
        assert not utils.DeferredStopCheck.is_supported(cuda, None, False, True)
    assert not supported()
    with stop_checks_deferred(torch.device("cpu")):  # not listed: as transformers decides
        assert not supported()


def test_overlapping_uses_in_two_threads_leave_each_other_alone():
    cuda = torch.device("cuda")
    entered, leave = threading.Event(), threading.Event()
    seen = {}

    def other():
        with stop_checks_deferred(cuda):
            entered.set()
            leave.wait(10)
        seen["other after"] = utils.DeferredStopCheck.is_supported(cuda, None, False, False)

    thread = threading.Thread(target=other)
    with stop_checks_deferred(cuda):
        thread.start()
        entered.wait(10)
    # this thread left first; the other is still inside: only it defers
    seen["this after"] = utils.DeferredStopCheck.is_supported(cuda, None, False, False)
    leave.set()
    thread.join(10)
    assert seen == {"this after": False, "other after": False}
