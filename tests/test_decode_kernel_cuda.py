"""On a CUDA card: the decode steps' Triton kernel (finance_qlora.decode_kernel) compiled, at the
generation's shapes: what it computes against SDPA, the same output every call, the same output
replayed from a CUDA graph (decode steps are), and generation through it giving SDPA's answers
with a small model. Skipped elsewhere (tests/test_decode_kernel.py runs the kernel in Triton's
interpreter on the CPU). On a lent GPU machine: `bash benchmarks/device_steps.sh decode-kernel`.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA card")


def inputs(rows, heads, kv_heads, dim, positions, dtype, step):
    """A decode step of a left-padded batch over a static cache: row r padded by up to 80
    positions, `step` tokens generated after a prompt ending at position 100."""
    generator = torch.Generator(device="cuda").manual_seed(step)
    like = {"device": "cuda", "dtype": dtype, "generator": generator}
    query = torch.randn(rows, 1, heads, dim, **like).transpose(1, 2)
    key = torch.randn(rows, kv_heads, positions, dim, **like)
    value = torch.randn(rows, kv_heads, positions, dim, **like)
    position = torch.arange(positions, device="cuda")
    pads = torch.arange(rows, device="cuda")[:, None] % 80
    mask = (position >= pads) & (position <= 100 + step)
    return query, key, value, mask[:, None, None, :]


SHAPES = {  # LLaMA-2-7B's decode step in the preset's batch of 300; SmolLM2's grouped heads
    "llama2-7b": (300, 32, 32, 128, 229),
    "smollm2": (64, 9, 3, 64, 229),
}


@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_compiled_kernel_attends_as_sdpa(shape, dtype):
    from finance_qlora.decode_kernel import masked_decode

    rows, heads, kv_heads, dim, positions = SHAPES[shape]
    for step in (0, 64, 127):
        query, key, value, mask = inputs(rows, heads, kv_heads, dim, positions, dtype, step)
        out = masked_decode(query, key, value, mask, dim**-0.5)
        groups = heads // kv_heads
        wide = [x.repeat_interleave(groups, dim=1) for x in (key, value)]
        exact = torch.nn.functional.scaled_dot_product_attention(
            query.float(), wide[0].float(), wide[1].float(), attn_mask=mask
        )
        sdpa = torch.nn.functional.scaled_dot_product_attention(query, *wide, attn_mask=mask)
        # no further from fp32's answer than torch's own kernel in this dtype, plus rounding
        ulp = 2e-2 if dtype == torch.bfloat16 else 2e-3
        ours, torchs = ((x.float() - exact).abs().max().item() for x in (out, sdpa))
        assert ours <= torchs + ulp, (ours, torchs)
        assert torch.equal(masked_decode(query, key, value, mask, dim**-0.5), out)


def test_masked_positions_are_never_read_on_the_gpu():
    """A masked position's key and value never reach the answer, even as NaN (a masked load
    gives its lane `other`; undefined there, 0 x NaN would poison the sum)."""
    from finance_qlora.decode_kernel import masked_decode

    query, key, value, mask = inputs(*SHAPES["llama2-7b"], torch.bfloat16, step=3)
    clean = masked_decode(query, key, value, mask, 128**-0.5)
    kept = mask.transpose(2, 3)  # (rows, 1, positions, 1)
    poisoned = [torch.where(kept, x, float("nan")) for x in (key, value)]
    assert torch.equal(masked_decode(query, *poisoned, mask, 128**-0.5), clean)


def test_a_recorded_call_replays_the_eager_output():
    from finance_qlora.decode_kernel import masked_decode

    query, key, value, mask = inputs(*SHAPES["llama2-7b"], torch.bfloat16, step=5)
    eager = masked_decode(query, key, value, mask, 128**-0.5)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        masked_decode(query, key, value, mask, 128**-0.5)  # warm-up off the recorded stream
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        recorded = masked_decode(query, key, value, mask, 128**-0.5)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(recorded, eager)


@pytest.mark.slow
def test_generation_through_the_kernel_on_a_gpu_gives_sdpas_answers(caplog, monkeypatch):
    """The tiny preset's model on the card in fp32, static cache, decode steps as CUDA graphs
    (the preset's path): the same answers through the kernel as through SDPA's math kernel in
    fp32 (against the memory-efficient one, one answer of this random model differed on an
    H200: its logits nearly tie), every decode step of every layer through the kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from finance_qlora import decode_kernel
    from finance_qlora.config import GenerationSettings
    from finance_qlora.generation import generate_shard
    from finance_qlora.modeling import load_model, load_tokenizer
    from finance_qlora.presets import resolve_config
    from finance_qlora.prompts import to_prompt_completion
    from tests.conftest import make_rows

    config = resolve_config("tiny-cpu", {"model": {"load_in_4bit": False}})
    model = load_model(config.model).eval().to("cuda")
    tokenizer = load_tokenizer(config.model)
    prompts = [to_prompt_completion(r)["prompt"] for r in make_rows(7)]
    settings = GenerationSettings(max_new_tokens=12, batch_size=4, cache="static")
    with sdpa_kernel([SDPBackend.MATH]):
        expected = generate_shard(model, tokenizer, prompts, settings)
    calls, masked_decode = [], decode_kernel.masked_decode

    def counted(*args):
        calls.append(args[0].shape)
        return masked_decode(*args)

    monkeypatch.setattr(decode_kernel, "masked_decode", counted)
    triton = settings.model_copy(update={"decode_kernel": "triton"})
    with sdpa_kernel([SDPBackend.MATH]):  # the prefill's attention as above
        assert generate_shard(model, tokenizer, prompts, triton) == expected
    # recorded once a batch (2 layers), then replayed: the eager warm-up, the recording
    assert len(calls) == 2 * 2 * 2
    assert "decode steps attend with SDPA" not in caplog.text
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.slow
def test_the_kernels_compiled_ahead_are_all_that_a_generation_launches(caplog, monkeypatch):
    """`loaded` with the kernel ahead (as an evaluation loads) compiles, while the model loads,
    the kernels the decode steps then launch: a generation after it compiles none (Triton's
    own count of the kernels it holds: `device_caches`, Triton 3.x's JIT internals), for
    batches with a mask (left padding) and one without (the dynamic cache's single prompt)."""
    from finance_qlora import decode_kernel
    from finance_qlora.config import GenerationSettings
    from finance_qlora.generation import generate_shard
    from finance_qlora.modeling import loaded
    from finance_qlora.presets import resolve_config
    from finance_qlora.prompts import to_prompt_completion
    from tests.conftest import make_rows

    def held() -> int:
        return sum(len(entry[0]) for entry in decode_kernel._masked_decode.device_caches.values())

    overrides = {"load_in_4bit": False, "compute_dtype": "bfloat16"}
    config = resolve_config("tiny-cpu", {"model": overrides})
    # as a fresh process holds them: none (earlier tests' kernels would stay held otherwise)
    decode_kernel._masked_decode.device_caches.clear()
    calls, masked_decode = [], decode_kernel.masked_decode

    def counted(*args):
        calls.append(args[0].shape)
        return masked_decode(*args)

    monkeypatch.setattr(decode_kernel, "masked_decode", counted)
    with loaded(config.model, decode_kernel_ahead=True) as (model, tokenizer):
        assert held() == 2 and len(calls) == 2  # with a mask and without
        prompts = [to_prompt_completion(r)["prompt"] for r in make_rows(5)]
        settings = GenerationSettings(max_new_tokens=12, batch_size=4, decode_kernel="triton")
        for cache in ("static", "dynamic"):  # batches of 4 (padded) and 1
            generate_shard(model, tokenizer, prompts, settings.model_copy(update={"cache": cache}))
    assert len(calls) > 2 and "decode steps attend with SDPA" not in caplog.text
    assert held() == 2
