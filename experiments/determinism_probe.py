"""Which CUDA operations of greedy generation give different bits from one run to the next?

    python experiments/determinism_probe.py [--out FILE]
    python experiments/determinism_probe.py --generate [--strict]

Issue 23's diagnosis (experiments/README.md, "The answer flow on a GPU"): two generations of the
same answers in one process agree on 291 of 300. This runs each operation that generation with
a 4-bit SmolLM2 and LoRA goes through, at its shapes (a batch of 64 prompts, hidden 576, 9
query and 3 key/value heads of 64, a 49,152-token head; the prefill and one decoding step),
many times on the same inputs, and counts the runs whose output differs in any bit from the
first. Also whether LoRA's dropout draws the same mask on a bf16 tensor as on its fp32 copy.

--generate: transformers' greedy `generate` on a random-weight model of SmolLM2's shape (bf16,
64 left-padded prompts of 40-200 tokens, 32 new tokens), twice with one model and once with a
second instance built from the same seed; rows identical. --strict first sets
CUBLAS_WORKSPACE_CONFIG=:4096:8 and torch.use_deterministic_algorithms(True).
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime

import torch
import torch.nn.functional as F

REPEATS = 20


def differing(fn) -> int | str:
    """How many of REPEATS calls differ in any bit from the first (or the error it raised)."""
    try:
        first = fn()
        torch.cuda.synchronize()
        return sum(not torch.equal(first, fn()) for _ in range(REPEATS))
    except Exception as exc:  # one operation that cannot run here leaves the others measured
        return f"error: {type(exc).__name__}: {exc}"[:200]


def probe() -> dict[str, int | bool | str]:
    torch.manual_seed(0)
    dev, bf16 = "cuda", torch.bfloat16
    batch, prompt, hidden, heads, kv_heads, head_dim = 64, 300, 576, 9, 3, 64
    results: dict[str, int | bool | str] = {"gpu": torch.cuda.get_device_name()}
    x_step = torch.randn(batch, 1, hidden, device=dev, dtype=bf16)
    x_fill = torch.randn(batch, prompt, hidden, device=dev, dtype=bf16)
    for name, out_features in (("q_proj", 576), ("k_proj", 192), ("mlp_up", 1536)):
        w = torch.randn(out_features, hidden, device=dev, dtype=bf16) / hidden**0.5
        results[f"linear_{name}_step"] = differing(lambda w=w: F.linear(x_step, w))
        results[f"linear_{name}_prefill"] = differing(lambda w=w: F.linear(x_fill, w))
    head = torch.randn(49152, hidden, device=dev, dtype=bf16) / hidden**0.5
    results["lm_head_step"] = differing(lambda: F.linear(x_step, head))
    lora_a = torch.randn(16, hidden, device=dev) / hidden**0.5  # fp32 adapters, as trained
    results["lora_a_fp32_step"] = differing(lambda: F.linear(x_step.float(), lora_a))

    # attention over a left-padded batch: a boolean mask, grouped-query heads
    lengths = torch.randint(prompt // 3, prompt + 1, (batch,), device=dev)
    keep = torch.arange(prompt, device=dev)[None, :] >= (prompt - lengths)[:, None]
    q_fill = torch.randn(batch, heads, prompt, head_dim, device=dev, dtype=bf16)
    k = torch.randn(batch, kv_heads, prompt, head_dim, device=dev, dtype=bf16)
    v = torch.randn(batch, kv_heads, prompt, head_dim, device=dev, dtype=bf16)
    causal = torch.ones(prompt, prompt, device=dev, dtype=torch.bool).tril()
    mask_fill = (causal[None] & keep[:, None, :])[:, None]
    k_rep, v_rep = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
    results["sdpa_prefill"] = differing(
        lambda: F.scaled_dot_product_attention(q_fill, k_rep, v_rep, attn_mask=mask_fill)
    )
    q_step = torch.randn(batch, heads, 1, head_dim, device=dev, dtype=bf16)
    mask_step = keep[:, None, None, :]
    results["sdpa_step"] = differing(
        lambda: F.scaled_dot_product_attention(q_step, k_rep, v_rep, attn_mask=mask_step)
    )
    results["sdpa_step_gqa"] = differing(
        lambda: F.scaled_dot_product_attention(q_step, k, v, attn_mask=mask_step, enable_gqa=True)
    )
    norm_w = torch.randn(hidden, device=dev, dtype=bf16)

    def rms_norm():  # transformers' LlamaRMSNorm
        h = x_fill.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
        return norm_w * h.to(bf16)

    results["rms_norm_prefill"] = differing(rms_norm)
    results["softmax_argmax_step"] = differing(
        lambda: F.linear(x_step, head).float().softmax(-1).argmax(-1)
    )
    try:
        import bitsandbytes
        import bitsandbytes.functional as bnbf

        w4, state = bnbf.quantize_4bit(
            torch.randn(576, hidden, device=dev, dtype=bf16), quant_type="nf4"
        )
        results["bnb_dequantize_4bit"] = differing(lambda: bnbf.dequantize_4bit(w4, state))
        results["bnb_matmul_4bit_step"] = differing(
            lambda: bitsandbytes.matmul_4bit(x_step, w4.t(), quant_state=state)
        )
    except ImportError:
        results["bnb"] = "not installed"

    masks, values = dropout_agreement()
    results["dropout_masks_agree_bf16_fp32"] = masks
    results["dropout_values_agree_bf16_fp32"] = values
    return results


def dropout_agreement() -> tuple[bool, bool]:
    """Does LoRA's dropout, from the same seed, drop the same elements of a bf16 tensor as of
    its fp32 copy, and give the same values? (CUDA)"""
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    x[x == 0] = 1.0  # a zero out of dropout then means a dropped element, nothing else
    torch.manual_seed(0)
    fp32 = F.dropout(x.float(), 0.05, training=True)
    torch.manual_seed(0)
    half = F.dropout(x, 0.05, training=True)
    return bool(torch.equal(fp32 == 0, half == 0)), bool(torch.equal(fp32.to(x.dtype), half))


def dropout_masks_agree() -> bool:
    return dropout_agreement()[0]


def generate_twice() -> dict[str, int | bool]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        pad_token_id=0,
        eos_token_id=None,  # every answer runs its 32 tokens
    )

    def model():
        torch.manual_seed(0)
        with torch.device("cuda"):
            built = LlamaForCausalLM(config).to(torch.bfloat16)
        return built.eval()

    torch.manual_seed(1)
    batch, longest = 64, 200
    lengths = torch.randint(40, longest + 1, (batch,))
    ids = torch.randint(1, 49152, (batch, longest))
    mask = torch.zeros(batch, longest, dtype=torch.long)
    for row, n in enumerate(lengths):  # left padding, as the evaluation pads
        mask[row, longest - n :] = 1
        ids[row, : longest - n] = 0
    ids, mask = ids.cuda(), mask.cuda()

    def answers(m) -> list[list[int]]:
        with torch.inference_mode():
            out = m.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=32,
                do_sample=False,
                pad_token_id=0,
            )
        return out[:, longest:].tolist()

    first = model()
    once, twice = answers(first), answers(first)
    second = model()
    again = answers(second)

    def same(a, b) -> int:
        return sum(x == y for x, y in zip(a, b, strict=True))

    return {
        "same_model_twice": same(once, twice),
        "second_instance": same(once, again),
        "rows": batch,
        "weights_equal": all(
            torch.equal(p, q) for p, q in zip(first.parameters(), second.parameters(), strict=True)
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", help="a JSON file for the counts")
    parser.add_argument("--generate", action="store_true", help="whole generations instead")
    parser.add_argument("--strict", action="store_true", help="deterministic algorithms first")
    args = parser.parse_args()
    if args.strict:  # before the first cuBLAS handle
        import os

        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
        torch.use_deterministic_algorithms(True)
    results = (generate_twice() if args.generate else probe()) | {
        "date": datetime.now(UTC).date().isoformat(),
        "torch": torch.__version__,
        "repeats": REPEATS,
    }
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
