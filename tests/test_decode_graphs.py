"""Decode steps replayed as graphs (finance_qlora.decode_graphs), on the CPU: a CUDA graph's
double runs the recorded step again on its recorded input buffers, so what is checked is the
wrapper's own work and generate_shard's use of it: fresh inputs copied in for every step, the
model's signature kept, the cache's counter set back after the warm-up step, a recorder that
fails or disagrees leaving the eager step, out of memory while recording backing off like any
other, steps it cannot follow left eager, nothing left installed after."""

from __future__ import annotations

import functools
import gc
import weakref

import pytest
import torch

from finance_qlora import generation as generation_module
from finance_qlora.config import GenerationSettings
from finance_qlora.decode_graphs import decode_graphs
from finance_qlora.generation import generate_shard, graphs_wanted
from finance_qlora.prompts import to_prompt_completion
from tests.conftest import make_rows


class EagerReplay:
    """A CUDA graph's CPU double. Recording runs the step here (on a GPU it runs nothing); a
    replay runs it again on the same input buffers and writes its logits where the recorded
    output's are, as a replayed graph writes into its recorded memory."""

    def warm_up(self, step):
        return step()

    def capture(self, step):
        self.step, self.output = step, step()
        return self.output

    def replay(self):
        self.output.logits.copy_(self.step().logits)


class Disagrees(EagerReplay):
    """A recorder whose replays give other logits than the eager step."""

    def replay(self):
        self.output.logits.copy_(self.step().logits.flip(-1))


class Refuses(EagerReplay):
    """A step that cannot be recorded (a GPU refuses a step that waits for it)."""

    def warm_up(self, step):
        step()  # half-way work done: the counters moved
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")


class KeepsTrack(EagerReplay):
    """Keeps a weak reference to the cache of each step it records."""

    caches: list = []

    @staticmethod
    def alive() -> int:
        gc.collect()
        return sum(ref() is not None for ref in KeepsTrack.caches)

    def capture(self, step):
        output = super().capture(step)
        cache = output.get("past_key_values", output.get("cache"))
        KeepsTrack.caches.append(weakref.ref(cache))
        return output


class OutOfMemoryOnce(EagerReplay):
    """The first recording runs out of memory (as torch reports it, or as a capture does)."""

    raised = False

    def __init__(self, error: Exception):
        self.error = error

    def warm_up(self, step):
        if not OutOfMemoryOnce.raised:
            OutOfMemoryOnce.raised = True
            raise self.error
        return step()


@pytest.fixture(scope="module")
def static():
    prompts = [to_prompt_completion(r)["prompt"] for r in make_rows(7)]
    return prompts, GenerationSettings(max_new_tokens=12, batch_size=3, cache="static")


@pytest.fixture(scope="module")
def eager_answers(tiny, static):
    model, tokenizer = tiny
    prompts, settings = static
    return generate_shard(model, tokenizer, prompts, settings)  # the CPU: no graphs


@pytest.fixture
def recording(monkeypatch):
    """generate_shard on the CPU as on a GPU: graphs wanted, recorded by `recorder()`; the
    DecodeGraphs it used are appended to the returned list."""
    used = []

    def use(recorder):
        def graphs(model, enabled):
            context = decode_graphs(model, enabled, recorder)
            return _Kept(context, used)

        monkeypatch.setattr(generation_module, "graphs_wanted", lambda *args: True)
        monkeypatch.setattr(generation_module, "decode_graphs", graphs)
        return used

    return use


class _Kept:
    """A context manager that keeps what the wrapped one yields."""

    def __init__(self, context, kept: list):
        self.context, self.kept = context, kept

    def __enter__(self):
        value = self.context.__enter__()
        self.kept.append(value)
        return value

    def __exit__(self, *exc):
        return self.context.__exit__(*exc)


@pytest.mark.slow
@pytest.mark.parametrize("peft", [False, True], ids=["model", "peft-model"])
def test_replayed_decode_steps_give_the_eager_answers(tiny, static, eager_answers, peft, recording):
    model, tokenizer = tiny
    prompts, settings = static
    if peft:  # the fine-tuned evaluation's model: PEFT calls the base model's forward
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = get_peft_model(model, lora).eval()
        eager = generate_shard(model, tokenizer, prompts, settings)
    else:
        eager = eager_answers
    used = recording(EagerReplay)
    try:
        answers = generate_shard(model, tokenizer, prompts, settings)
    finally:
        if peft:
            model.unload()  # the module's shared model as it was
    assert answers == eager
    (graphs,) = used
    assert graphs.eager_reason is None
    # batches of 3, 3 and 1 prompts, each its own recording at its first of 11 decode steps
    assert (graphs.captures, graphs.replays) == (3, 3 * 10)
    assert graphs.graph is None and graphs.output is None  # dropped with the last batch
    base = model.get_base_model() if peft else model
    assert "forward" not in vars(base)  # uninstalled


@pytest.mark.slow
def test_each_batchs_graph_and_cache_go_when_its_generation_ends(tiny, static, recording):
    """A graph keeps its cache's memory: kept past its batch, the next batch's cache would be
    allocated beside it (a 300-prompt cache of a 7B model is about 40 GiB)."""
    model, tokenizer = tiny
    prompts, settings = static
    KeepsTrack.caches, alive = [], []
    recording(KeepsTrack)
    original = model.generate

    def generate(*args, **kwargs):  # each batch's cache is allocated in here
        alive.append(KeepsTrack.alive())
        return original(*args, **kwargs)

    model.generate = generate
    try:
        generate_shard(model, tokenizer, prompts, settings)
    finally:
        del model.generate
    assert len(KeepsTrack.caches) == 3 and alive == [0, 0, 0]


def test_generate_passes_the_models_own_arguments_through_the_graphs(tiny, static):
    """`generate` reads the forward's signature to decide what to pass (left-padded rows'
    position ids among it): every step's logits the same with the graphs as without."""
    model, tokenizer = tiny
    prompts, _ = static
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts[:3], return_tensors="pt", padding=True)
    assert not encoded["attention_mask"].all()  # rows of different lengths: left padding
    settings = dict(
        max_new_tokens=6,
        do_sample=False,
        cache_implementation="static",
        disable_compile=True,
        return_dict_in_generate=True,
        output_logits=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    eager = model.generate(**encoded, **settings).logits
    with decode_graphs(model, True, EagerReplay) as graphs:
        replayed = model.generate(**encoded, **settings).logits
    assert graphs.replays == 4  # 5 decode steps, the first of them recorded
    assert all(torch.equal(a, b) for a, b in zip(eager, replayed, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("recorder", [Disagrees, Refuses])
def test_a_step_that_cannot_be_recorded_faithfully_runs_eagerly(
    tiny, static, eager_answers, recorder, recording
):
    model, tokenizer = tiny
    prompts, settings = static
    used = recording(recorder)
    assert generate_shard(model, tokenizer, prompts, settings) == eager_answers
    (graphs,) = used
    assert graphs.replays == 0 and graphs.captures == 0
    expected = "differ from the eager" if recorder is Disagrees else "not permitted"
    assert expected in graphs.eager_reason


@pytest.mark.slow
@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: out of memory (capture invalidated)"),
    ],
    ids=["out-of-memory", "as-a-capture-reports-it"],
)
def test_out_of_memory_while_recording_halves_the_batch(tiny, static, recording, error, caplog):
    model, tokenizer = tiny
    prompts, settings = static
    OutOfMemoryOnce.raised = False
    used = recording(functools.partial(OutOfMemoryOnce, error))
    answers = generate_shard(model, tokenizer, prompts, settings)
    assert sorted(answers) == list(range(7))
    assert "generating at most 1 at a time" in caplog.text  # 3 halved
    (graphs,) = used
    assert graphs.eager_reason is None and graphs.captures == 7  # then one a prompt


def test_steps_it_cannot_follow_run_eagerly(tiny, static, eager_answers, recording):
    """A dynamic cache, and a model whose masks come as a dict (a model with sliding-window
    layer types): nothing recorded, the eager answers."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model, tokenizer = tiny
    prompts, settings = static
    used = recording(EagerReplay)
    dynamic = settings.model_copy(update={"cache": "dynamic", "max_new_tokens": 3})
    generate_shard(model, tokenizer, prompts[:2], dynamic)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    qwen = Qwen2ForCausalLM(config).eval()
    short = settings.model_copy(update={"max_new_tokens": 4})
    eager = generate_shard(qwen, tokenizer, prompts[:3], short)
    assert generate_shard(qwen, tokenizer, prompts[:3], short) == eager
    assert [(g.captures, g.replays, g.eager_reason) for g in used] == [(0, 0, None)] * 3


def test_graphs_are_wanted_only_for_a_reproducible_static_cache_on_a_gpu():
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    static = GenerationSettings(cache="static")
    assert graphs_wanted(static, gpu)
    assert not graphs_wanted(static, cpu)
    assert not graphs_wanted(GenerationSettings(), gpu)  # the dynamic cache
    assert not graphs_wanted(static.model_copy(update={"deterministic": False}), gpu)
    assert not graphs_wanted(static.model_copy(update={"cuda_graphs": False}), gpu)


def test_the_models_own_forward_is_put_back(tiny):
    model, _ = tiny
    with decode_graphs(model, False) as graphs:
        assert graphs is None and "forward" not in vars(model)
    own = functools.partial(type(model).forward, model)  # as accelerate's hooks set one
    model.forward = own
    try:
        with decode_graphs(model, True, EagerReplay):
            assert model.forward is not own
        assert model.forward is own
    finally:
        del model.forward


def test_whether_decode_steps_replay_graphs_is_not_part_of_a_result_key():
    from tasks.identity import identity

    on, off = GenerationSettings(), GenerationSettings(cuda_graphs=False)
    assert identity(on) == identity(off)
    assert identity(on) != identity(GenerationSettings(cache="static"))


def test_the_decode_steps_attention_kernel_is_part_of_a_result_key():
    """Another kernel rounds differently, and greedy answers follow rounding at near-ties
    (benchmarks/README.md, "The decode steps' attention kernel"): not the same evaluation."""
    from tasks.identity import identity

    assert identity(GenerationSettings()) != identity(GenerationSettings(decode_kernel="triton"))
