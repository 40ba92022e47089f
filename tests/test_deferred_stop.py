"""generate() deciding to stop one decode step late (finance_qlora.generation.
stop_checks_deferred), run on the CPU: the devices it is enabled for include the CPU here, and
torch's device events (which the CPU lacks) are a double that records nothing: on the CPU every
op has finished when it returns, so waiting on one is waiting on nothing. What is checked is
the path transformers takes: the same answers, the extra step it runs and undoes, and the
check put back after."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from transformers.generation import utils

from finance_qlora import generation as generation_module
from finance_qlora.generation import stop_checks_deferred
from finance_qlora.prompts import to_prompt_completion
from tests.conftest import generate, make_rows


class NoEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args) -> None:
        pass

    def synchronize(self) -> None:
        pass


@pytest.fixture
def deferred_on_cpu(monkeypatch):
    monkeypatch.setattr(generation_module, "DEFERRED_STOP_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(torch, "Event", NoEvent)


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
@pytest.mark.parametrize("stop_early", [False, True])
def test_a_late_stop_gives_the_same_answers_and_undoes_its_extra_step(
    tiny, deferred_on_cpu, monkeypatch, stop_early
):
    model, tokenizer = tiny
    prompts = [to_prompt_completion(r)["prompt"] for r in make_rows(3)]
    runs = {}
    for devices in [(), ("cuda", "cpu")]:
        monkeypatch.setattr(generation_module, "DEFERRED_STOP_DEVICES", devices)
        hook = None
        if stop_early:  # every row ends at its fourth token: the loop stops before the limit

            def end_at_fourth(module, args, logits, calls=[]):  # noqa: B006 - one run's count
                calls.append(1)
                if len(calls) == 4:
                    logits[..., tokenizer.eos_token_id] += 1e4
                return logits

            hook = model.lm_head.register_forward_hook(end_at_fourth)
        try:
            with watched(model) as (forwards, checks):
                answers = generate(model, tokenizer, prompts, 8, batch_size=3)
        finally:
            if hook is not None:
                hook.remove()
        runs[devices] = (answers, len(forwards), set(checks))
    (now, steps_now, checks_now), (late, steps_late, checks_late) = runs.values()
    assert checks_now == {"StopCheck"} and checks_late == {"DeferredStopCheck"}
    assert late == now  # text and token counts
    if stop_early:
        assert {a.new_tokens for a in now} == {3}
        assert steps_late == steps_now + 1  # the step run while the stop was being read
    else:
        assert {a.new_tokens for a in now} == {8}
        assert steps_late == steps_now  # at the length limit it stops at once


def test_only_the_listed_devices_defer_and_the_check_is_put_back():
    supported = utils.DeferredStopCheck.is_supported
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert not supported(cuda, None, False, False)  # transformers: Apple GPUs only
    with stop_checks_deferred(cuda):
        assert utils.DeferredStopCheck.is_supported(cuda, None, False, False)
        # a cache handed back to the caller, or an assistant model: transformers' own rule
        assert not utils.DeferredStopCheck.is_supported(cuda, None, True, False)
        assert not utils.DeferredStopCheck.is_supported(cuda, None, False, True)
    assert utils.DeferredStopCheck.is_supported is supported
    with stop_checks_deferred(cpu):  # not listed: left as it is
        assert utils.DeferredStopCheck.is_supported is supported
