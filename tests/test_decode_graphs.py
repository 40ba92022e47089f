"""Decode steps replayed as graphs (finance_qlora.decode_graphs), on the CPU: a CUDA graph's
double runs the recorded step again on its recorded input buffers, so what is checked is the
wrapper's own work: fresh inputs copied in for every step, the cache's counters set back after
the warm-up step, a recorder that fails or disagrees leaving the eager step, nothing left
installed after."""

from __future__ import annotations

import pytest
import torch

from finance_qlora.config import GenerationSettings, resolve_config
from finance_qlora.decode_graphs import decode_graphs
from finance_qlora.generation import generate_shard
from finance_qlora.modeling import load_model, load_tokenizer
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


@pytest.fixture(scope="module")
def tiny():
    config = resolve_config("tiny-cpu")
    return load_model(config.model).eval(), load_tokenizer(config.model)


@pytest.fixture(scope="module")
def static():
    prompts = [to_prompt_completion(r)["prompt"] for r in make_rows(7)]
    return prompts, GenerationSettings(max_new_tokens=12, batch_size=3, cache="static")


@pytest.fixture(scope="module")
def eager_answers(tiny, static):
    model, tokenizer = tiny
    prompts, settings = static
    return generate_shard(model, tokenizer, prompts, settings)  # the CPU: no graphs


@pytest.mark.slow
@pytest.mark.parametrize("peft", [False, True], ids=["model", "peft-model"])
def test_replayed_decode_steps_give_the_eager_answers(tiny, static, eager_answers, peft):
    model, tokenizer = tiny
    prompts, settings = static
    if peft:  # the fine-tuned evaluation's model: PEFT calls the base model's forward
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = get_peft_model(model, lora).eval()
        unwrapped = [generate_shard(model, tokenizer, prompts, settings)]
    with decode_graphs(model, True, EagerReplay) as graphs:
        answers = generate_shard(model, tokenizer, prompts, settings)
    if peft:
        eager = unwrapped[0]
        model.unload()  # the module's shared model as it was
    else:
        eager = eager_answers
    assert answers == eager
    assert graphs.eager_reason is None
    # batches of 3, 3 and 1 prompts: at least the last needs its own graph; 11 decode steps
    # a batch, one of them the recorded step
    assert graphs.captures >= 2
    assert graphs.replays == 3 * 11 - graphs.captures
    assert "forward" not in vars(model.get_base_model() if peft else model)  # uninstalled


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
    tiny, static, eager_answers, recorder
):
    model, tokenizer = tiny
    prompts, settings = static
    with decode_graphs(model, True, recorder) as graphs:
        assert generate_shard(model, tokenizer, prompts, settings) == eager_answers
    assert graphs.replays == 0 and graphs.captures == 0
    expected = "differ from the eager" if recorder is Disagrees else "not permitted"
    assert expected in graphs.eager_reason


def test_only_a_static_caches_decode_steps_are_recorded(tiny, static):
    model, tokenizer = tiny
    prompts, settings = static
    dynamic = settings.model_copy(update={"cache": "dynamic"})
    with decode_graphs(model, True, EagerReplay) as graphs:
        generate_shard(
            model, tokenizer, prompts[:2], dynamic.model_copy(update={"max_new_tokens": 3})
        )
    assert graphs.captures == graphs.replays == 0 and graphs.eager_reason is None


def test_graphs_stay_off_unless_enabled(tiny):
    model, _ = tiny
    with decode_graphs(model, False) as graphs:
        assert graphs is None and "forward" not in vars(model)


def test_whether_decode_steps_replay_graphs_is_not_part_of_a_result_key():
    from tasks.identity import identity

    on, off = GenerationSettings(), GenerationSettings(cuda_graphs=False)
    assert identity(on) == identity(off)
    assert identity(on) != identity(GenerationSettings(cache="static"))
