"""The decode steps' attention kernel (finance_qlora.decode_kernel) under Triton's interpreter,
on the CPU: what it computes against SDPA (masks, grouped heads, rows that attend to nothing,
strided queries), and its use by generation through transformers' attention interface: the
same answers as SDPA, taken only for decode steps, the model's own attention put back.
tests/test_decode_kernel_cuda.py runs the compiled kernel on a GPU."""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("triton")

from finance_qlora import decode_attention  # noqa: E402
from finance_qlora.config import GenerationSettings  # noqa: E402
from finance_qlora.generation import generate_shard  # noqa: E402
from finance_qlora.prompts import to_prompt_completion  # noqa: E402
from tests.conftest import make_rows  # noqa: E402


@pytest.fixture(scope="module")
def kernel():
    """decode_kernel under Triton's interpreter (conftest chooses it where there is no GPU),
    which generation may use on CPU tensors while this module's tests run."""
    patch = pytest.MonkeyPatch()
    patch.setattr(decode_attention, "INTERPRETER_ON_CPU", True)
    if not decode_attention.interpreted():
        patch.undo()
        pytest.skip("Triton's interpreter is off (a GPU is here: test_decode_kernel_cuda.py)")
    yield importlib.import_module("finance_qlora.decode_kernel")
    patch.undo()


def sdpa_reference(query, key, value, mask):
    groups = query.shape[1] // key.shape[1]
    key, value = (x.float().repeat_interleave(groups, dim=1) for x in (key, value))
    out = torch.nn.functional.scaled_dot_product_attention(
        query.float(), key, value, attn_mask=mask
    )
    # a row with nothing to attend to: NaN from some of SDPA's kernels; 0 from the kernel
    return torch.nan_to_num(out)


def left_padded(rows: int, positions: int, filled: int) -> torch.Tensor:
    """A static cache's mask for one decode step: row r padded by r positions on the left,
    `filled` positions written so far."""
    position = torch.arange(positions)
    pads = torch.arange(rows)[:, None]
    return ((position >= pads) & (position < filled))[:, None, None, :]


@pytest.mark.parametrize(
    "heads,kv_heads,dim,positions",
    [(4, 4, 16, 37), (9, 3, 64, 130), (8, 2, 32, 64)],
    ids=["heads", "grouped-heads", "whole-blocks"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_kernel_attends_as_sdpa_with_a_mask(kernel, heads, kv_heads, dim, positions, dtype):
    torch.manual_seed(0)
    rows = 5
    # a query as transformers hands it over: (rows, heads, 1, dim) transposed, not contiguous
    query = torch.randn(rows, 1, heads, dim, dtype=dtype).transpose(1, 2)
    key, value = (torch.randn(rows, kv_heads, positions, dim, dtype=dtype) for _ in range(2))
    mask = left_padded(rows, positions, filled=positions - 3)
    mask[3] = False  # a row that attends to nothing
    out = kernel.masked_decode(query, key, value, mask, dim**-0.5)
    assert out.shape == query.shape and out.dtype == dtype
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(
        out.float(), sdpa_reference(query, key, value, mask), atol=tolerance, rtol=0
    )
    assert not out[3].any()


def test_without_a_mask_every_position_is_attended(kernel):
    torch.manual_seed(1)
    query = torch.randn(3, 4, 1, 16)
    key, value = torch.randn(3, 2, 70, 16), torch.randn(3, 2, 70, 16)
    out = kernel.masked_decode(query, key, value, None, 0.25)
    expected = sdpa_reference(query * 0.25 / 16**-0.5, key, value, None)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_masked_positions_are_never_read(kernel):
    """What the kernel is for: a masked position's key and value do not reach the answer,
    however large (NaN there would poison a kernel that reads and then discards them)."""
    torch.manual_seed(2)
    query = torch.randn(2, 4, 1, 16)
    key, value = torch.randn(2, 4, 40, 16), torch.randn(2, 4, 40, 16)
    mask = left_padded(2, 40, filled=30)
    kept = mask.transpose(2, 3)  # (rows, 1, positions, 1): against (rows, heads, positions, dim)
    poisoned_key, poisoned_value = (torch.where(kept, x, float("nan")) for x in (key, value))
    clean = kernel.masked_decode(query, key, value, mask, 0.25)
    assert torch.equal(kernel.masked_decode(query, poisoned_key, poisoned_value, mask, 0.25), clean)


@pytest.fixture(scope="module")
def prompts():
    return [to_prompt_completion(r)["prompt"] for r in make_rows(7)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "cache,peft", [("static", False), ("dynamic", False), ("static", True)], ids=str
)
def test_generation_through_the_kernel_gives_sdpas_answers(
    kernel, tiny, prompts, cache, peft, monkeypatch
):
    model, tokenizer = tiny
    if peft:  # the fine-tuned evaluation's model: the attention is switched through PEFT
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = get_peft_model(model, lora).eval()
    try:
        check_answers_through_the_kernel(kernel, model, tokenizer, prompts, cache, monkeypatch)
    finally:
        if peft:
            model.unload()  # the module's shared model as it was


def check_answers_through_the_kernel(kernel, model, tokenizer, prompts, cache, monkeypatch):
    settings = GenerationSettings(max_new_tokens=10, batch_size=3, cache=cache)
    expected = generate_shard(model, tokenizer, prompts, settings)
    calls, masked_decode = [], kernel.masked_decode

    def counted(query, *args):
        calls.append(query.shape)
        return masked_decode(query, *args)

    monkeypatch.setattr(kernel, "masked_decode", counted)
    triton = settings.model_copy(update={"decode_kernel": "triton"})
    assert generate_shard(model, tokenizer, prompts, triton) == expected
    # every decode step of every layer, none of the prefills: batches of 3, 3 and 1, 9 decode
    # steps each (the first new token comes from the prefill), 2 layers
    assert len(calls) == 3 * 9 * 2
    assert all(shape[2] == 1 for shape in calls)
    assert model.config._attn_implementation == "sdpa"  # put back


def test_the_models_own_attention_is_kept_where_the_kernel_cannot_run(
    kernel, tiny, monkeypatch, caplog
):
    model, _ = tiny
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = torch.device("cpu")
    with decode_attention.decode_kernel(model, True, cpu) as used:
        assert not used and model.config._attn_implementation == "sdpa"
    assert "the kernel needs a GPU" in caplog.text
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with decode_attention.decode_kernel(model, False, cpu) as used:  # not asked for
        assert not used
    with pytest.raises(RuntimeError), decode_attention.decode_kernel(model, True, cpu) as used:
        assert used and model.config._attn_implementation == decode_attention.ATTENTION
        raise RuntimeError("a generation that fails")
    assert model.config._attn_implementation == "sdpa"
    # a model whose attention transformers cannot swap (it only warns): SDPA, said so
    monkeypatch.setattr(model, "set_attn_implementation", lambda name: None)
    with decode_attention.decode_kernel(model, True, cpu) as used:
        assert not used
    assert "attention cannot be swapped" in caplog.text
    monkeypatch.undo()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    # a user's TRITON_INTERPRET alone never sends a CPU generation through the interpreter
    monkeypatch.setattr(decode_attention, "INTERPRETER_ON_CPU", False)
    with decode_attention.decode_kernel(model, True, cpu) as used:
        assert not used


def test_only_decode_steps_that_the_kernel_computes_as_sdpa_are_taken(kernel):
    module = torch.nn.Module().eval()
    query, key = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 9, 16)
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)

    def applies(query=query, key=key, mask=mask, dropout=0.0, **kwargs):
        return decode_attention.kernel_applies(module, query, key, key, mask, dropout, kwargs)

    assert applies() and applies(mask=None)
    assert not applies(query=torch.randn(2, 4, 3, 16))  # a prefill
    assert not applies(mask=torch.zeros(2, 1, 1, 9))  # an additive float mask
    assert not applies(dropout=0.1)
    assert not applies(softcap=30.0)
    assert not applies(query=torch.randn(2, 3, 1, 16))  # heads not a multiple of kv heads
    assert not applies(query=torch.randn(2, 4, 1, 24), key=torch.randn(2, 2, 9, 24))
    assert not applies(key=torch.randn(1, 2, 9, 16))  # SDPA broadcasts a batch of one
    value = torch.randn(2, 2, 9, 8)  # value heads narrower than the query's
    assert not decode_attention.kernel_applies(module, query, key, value, mask, 0.0, {})
    module.train()
    assert not applies()


def specialisation(kernel_fn, args: tuple, kwargs: dict) -> tuple:
    """What Triton compiles a launch of `_masked_decode` for, by Triton's rules (3.x, as its
    JIT binder applies them): each tensor's dtype and 16-byte alignment, each integer not in
    NOT_SPECIALISED as "1", "a multiple of 16" or neither, the constants. Two launches alike
    here run one compiled kernel (tests/test_decode_kernel_cuda.py counts Triton's own)."""
    import inspect

    from finance_qlora.decode_kernel import NOT_SPECIALISED

    names = list(inspect.signature(kernel_fn.fn).parameters)
    key = []
    for name, value in zip(names, args, strict=False):
        if isinstance(value, torch.Tensor):
            key.append((name, value.dtype, value.data_ptr() % 16 == 0))
        elif isinstance(value, int) and name not in NOT_SPECIALISED:
            key.append((name, "1" if value == 1 else "16k" if value % 16 == 0 else "-"))
    return (*key, *sorted((k, v) for k, v in kwargs.items()))


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    """A 2-layer Llama (random weights) with grouped heads and a head size of its own (4 heads,
    2 key/value heads of 32, 64 wide) and the tiny preset's tokenizer, loaded in bf16: what the
    warm-up must read from a model's config rather than assume."""
    from transformers import LlamaForCausalLM

    from finance_qlora.builtin_models import tiny_llama_config
    from finance_qlora.modeling import load_tokenizer
    from finance_qlora.presets import resolve_config

    folder = tmp_path_factory.mktemp("grouped-llama")
    tokenizer = load_tokenizer(resolve_config("tiny-cpu").model)
    tokenizer.save_pretrained(folder)
    config = tiny_llama_config(tokenizer, num_key_value_heads=2, head_dim=32)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    overrides = {"name": str(folder), "load_in_4bit": False, "compute_dtype": "bfloat16"}
    return resolve_config("tiny-cpu", {"model": overrides}).model


def test_the_kernel_is_compiled_in_a_thread_while_the_model_loads(kernel, grouped, monkeypatch):
    """`loaded` with the kernel ahead runs it twice (with a mask and without), in a thread,
    for the model's heads, key/value heads, head size and compute dtype, and hands the model
    over only after; without, never."""
    import threading

    from finance_qlora.modeling import loaded

    calls, masked_decode = [], kernel.masked_decode

    def recorded(query, key, value, mask, scale):
        calls.append((threading.current_thread().name, query.shape, key.shape, query.dtype))
        return masked_decode(query, key, value, mask, scale)

    monkeypatch.setattr(kernel, "masked_decode", recorded)
    with loaded(grouped, decode_kernel_ahead=True):
        thread_heads_dtype = [(name, q[1], q[3], k[1], dtype) for name, q, k, dtype in calls]
        assert thread_heads_dtype == [("decode-kernel-ahead", 4, 32, 2, torch.bfloat16)] * 2
    calls.clear()
    with loaded(grouped):
        assert calls == []


def test_the_kernels_compiled_ahead_are_the_ones_the_decode_steps_launch(
    kernel, grouped, prompts, monkeypatch
):
    """What the thread launches while the model loads specialises as every decode step of a
    generation with that model does (so Triton compiles nothing more): the static cache, and
    the dynamic one, whose last batch (one prompt, no padding) has no mask."""
    from finance_qlora.modeling import loaded

    launches, launch = [], kernel._masked_decode

    class Recorded:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                launches.append(specialisation(launch, args, kwargs))
                return launch[grid](*args, **kwargs)

            return run

    monkeypatch.setattr(kernel, "_masked_decode", Recorded())
    with loaded(grouped, decode_kernel_ahead=True) as (model, tokenizer):
        ahead, launches[:] = set(launches), []
        settings = GenerationSettings(max_new_tokens=6, batch_size=3, decode_kernel="triton")
        for cache in ("static", "dynamic"):
            generate_shard(model, tokenizer, prompts, settings.model_copy(update={"cache": cache}))
    assert len(ahead) == 2 and len(launches) > 10 and set(launches) == ahead


def test_a_kernel_that_cannot_be_compiled_ahead_is_said_and_not_fatal(kernel, monkeypatch, caplog):
    def fails(*args):
        raise RuntimeError("PassManager::run failed\nmore")

    monkeypatch.setattr(kernel, "warm_up", fails)
    with decode_attention.compiled_ahead(4, 4, 16, torch.float32, torch.device("cpu")):
        pass
    assert "decode kernel was not compiled ahead (PassManager::run failed)" in caplog.text


def test_no_thread_where_the_kernel_would_not_run(kernel, tiny, monkeypatch, caplog):
    """On a GPU without what Triton needs to build (a C compiler, Python's headers:
    `toolchain.triton_missing`) the decode steps keep SDPA, said in one line, rather than
    failing inside Triton at the first step, and nothing compiles ahead; nor for heads the
    kernel does not take (a head size not a power of two)."""
    from types import SimpleNamespace

    from finance_qlora import toolchain

    started = []

    class Thread:
        def __init__(self, **kwargs):
            started.append(kwargs["name"])

        def start(self):
            pass

        def join(self):
            pass

    monkeypatch.setattr(decode_attention, "threading", SimpleNamespace(Thread=Thread))
    cpu = torch.device("cpu")
    with decode_attention.compiled_ahead(4, 4, 80, torch.bfloat16, cpu):
        pass
    with decode_attention.compiled_ahead(4, 4, 64, torch.bfloat16, cpu):  # taken
        pass
    assert started == ["decode-kernel-ahead"]
    model, _ = tiny
    missing = "Triton needs a C compiler (gcc or clang, or $CC) and finds none"
    monkeypatch.setattr(toolchain, "triton_missing", lambda: missing)
    gpu = torch.device("cuda")
    with decode_attention.decode_kernel(model, True, gpu) as used:
        assert not used and model.config._attn_implementation == "sdpa"
    assert f"decode steps attend with SDPA ({missing})" in caplog.text
    with decode_attention.compiled_ahead(4, 4, 64, torch.bfloat16, gpu):
        pass
    assert started == ["decode-kernel-ahead"]
