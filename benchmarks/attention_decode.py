"""One decode step's attention over a static key/value cache, kernel by kernel (needs a GPU).

The preset's 300 x 128 generation of LLaMA-2-7B spends half its GPU time in one kernel: the
memory-efficient attention of each decode step over the whole static cache (benchmarks/README.md,
"The first generation"). This times that call at the generation's shapes (300 left-padded rows,
32 heads of 128, a cache of 229 positions, bf16, a boolean mask as transformers builds it) under
every attention kernel torch offers for it and the project's own (`decode_kernel`), with
deterministic algorithms on as in generation, each warmed up and then timed in turn, and
reports each one's error against fp32.

    python benchmarks/attention_decode.py --out results.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finance_qlora.decode_kernel import masked_decode  # noqa: E402

KERNELS = {
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


def decode_inputs(rows: int, heads: int, head_dim: int, prompt: int, cache: int, step: int):
    """Query, cache and mask of decode step `step`: row r's prompt is left-padded by a length
    spread over the prompt, positions past the prompt and `step` new tokens are still empty."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (rows, heads, cache, head_dim)
    like = {"device": "cuda", "dtype": torch.bfloat16, "generator": gen}
    key, value = torch.randn(shape, **like), torch.randn(shape, **like)
    query = torch.randn((rows, heads, 1, head_dim), **like)
    pads = torch.linspace(0, prompt - 8, rows, device="cuda").long()
    position = torch.arange(cache, device="cuda")
    mask = (position >= pads[:, None]) & (position <= prompt + step)
    key[:, :, prompt + step + 1 :] = 0  # an empty cache slot holds zeros
    value[:, :, prompt + step + 1 :] = 0
    return query, key, value, mask[:, None, None, :]


def manual(query, key, value, mask):
    """transformers' eager attention: bf16 products, an fp32 softmax."""
    scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(query.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, value)


def timed(call, repeats: int) -> float:
    """Milliseconds a call, over `repeats` calls between two events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        call()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--prompt", type=int, default=101)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    heads, head_dim, cache = 32, 128, args.prompt + args.new_tokens
    report = {
        "gpu": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "shapes": {"rows": args.rows, "heads": heads, "head_dim": head_dim, "cache": cache},
        "kernels": {},
    }
    calls, attended = {}, []
    for step in (0, args.new_tokens // 2, args.new_tokens - 1):
        inputs = decode_inputs(args.rows, heads, head_dim, args.prompt, cache, step)
        query, key, value, mask = inputs
        attended.append(mask.float().mean().item())  # all the project's kernel reads
        reference = manual(query.float(), key.float(), value.float(), mask)
        for name, backend in KERNELS.items():

            def call(backend=backend, q=query, k=key, v=value, m=mask):
                with sdpa_kernel([backend]):
                    return sdpa(q, k, v, attn_mask=m)

            calls.setdefault(name, []).append(call)
        calls.setdefault("manual", []).append(lambda inputs=inputs: manual(*inputs))
        calls.setdefault("decode_kernel", []).append(
            lambda inputs=inputs: masked_decode(*inputs, head_dim**-0.5)
        )
        for name, steps in calls.items():
            entry = report["kernels"].setdefault(name, {"max_abs_error": 0.0, "ms": []})
            try:
                output = steps[-1]()
            except RuntimeError as exc:
                entry["error"] = str(exc).splitlines()[0][:200]
                continue
            error = (output.float() - reference).abs().max().item()
            entry["max_abs_error"] = max(entry["max_abs_error"], error)
    cache_bytes = 2 * args.rows * heads * cache * head_dim * 2
    report["attended_share"] = round(statistics.mean(attended), 3)
    for _ in range(args.rounds):  # each kernel in turn, every round
        for name, steps in calls.items():
            entry = report["kernels"][name]
            if "error" in entry:
                continue
            for call in steps:
                call()  # warm
            entry["ms"].append(statistics.mean(timed(call, args.repeats) for call in steps))
    for entry in report["kernels"].values():
        if entry["ms"]:
            entry["median_ms"] = round(statistics.median(entry["ms"]), 4)
            # the whole cache's bytes over the call's time, whatever the kernel reads of them
            entry["cache_read_tb_s"] = round(cache_bytes / entry["median_ms"] / 1e9, 2)
            entry["ms"] = [round(m, 4) for m in entry["ms"]]
    text = json.dumps(report, indent=2)
    print(text)
    with open(args.out, "w") as handle:
        handle.write(text + "\n")


if __name__ == "__main__":
    main()
