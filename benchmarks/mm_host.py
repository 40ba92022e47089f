"""The host's time for one matrix product of a compiled layer's shapes (bf16, LLaMA-2-7B's
widths, a packed micro-batch of n tokens): what `extern_kernels.mm` costs the thread that
issues it, apart from the GPU's time.

    python benchmarks/mm_host.py --out benchmarks/results

Each call is timed on the host alone (the GPU synchronised before, so no full launch queue
waits in it), for: one shape again and again; a token count not met before in the process
(as each packed step brings); token counts met before; and, for comparison, an elementwise
kernel. Then calls issued back to back without synchronising, as a training step does: the
host's time a call once the GPU falls behind (a full launch queue makes the host wait).
cuBLAS and cuBLASLt (torch.backends.cuda.preferred_blas_library) each. Then calls cycling over
more and more token counts (cuBLASLt's heuristics cache, 8,192 shapes by default: run again
with CUBLASLT_HEURISTICS_CACHE_CAPACITY=65536 to compare; through torch's default library since
2026-11-30: before, through cuBLASLt). First of all (alone with --operands-only): one shape
with each of 32 layers' own operands against one set again and again, the GPU idle or busy,
the LoRA weights' gradients' layouts, and under autocast. CUBLAS_WORKSPACE_CONFIG's part:
workspace_config.py. Results: <out>/mm-host-<gpu>-<date><tag>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.mm_switches import heuristics_cache_capacity  # noqa: E402
from benchmarks.result_file import result_path, stamp, write_json  # noqa: E402

WIDTHS = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 16), (16, 4096)]


def host_us(call, repeats: int = 1) -> float:
    """Median host microseconds of `call`, the GPU idle before each."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    return round(1e6 * median(times), 1)


def measure(tokens: list[int], fresh: list[int]) -> dict:
    dev, dtype = "cuda", torch.bfloat16
    weights = {w: torch.randn(*w, device=dev, dtype=dtype) for w in WIDTHS}
    inputs = {n: torch.randn(n, 11008, device=dev, dtype=dtype) for n in tokens + fresh}

    def mm(n: int, w: tuple[int, int]):
        x = inputs[n][:, : w[0]]
        return lambda: torch.mm(x, weights[w])

    for n in tokens:  # every shape of `tokens` met once
        for w in WIDTHS:
            mm(n, w)()
    result = {}
    for w in WIDTHS:
        name = f"{w[0]}x{w[1]}"
        result[name] = {
            "same_shape_us": host_us(mm(tokens[0], w), 50),
            "met_before_us": median(host_us(mm(n, w)) for n in tokens),
            # each first call of a token count in the process
            "new_tokens_us": median(host_us(mm(n, w)) for n in fresh),
        }
    a = inputs[tokens[0]]
    result["elementwise_add_us"] = host_us(lambda: a.add(a), 50)
    # back to back, as a step issues them: the host's time a call with the GPU behind
    big = weights[(11008, 4096)]
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(2000):
        torch.mm(inputs[tokens[0]], big)
    issued = time.perf_counter() - start
    torch.cuda.synchronize()
    done = time.perf_counter() - start
    result["back_to_back_2000"] = {
        "host_us_a_call": round(1e6 * issued / 2000, 1),
        "gpu_us_a_call": round(1e6 * done / 2000, 1),
    }
    return result


def cycles(counts: list[int], start: int = 4001) -> dict:
    """Calls cycling over `count` token counts (as a run's steps bring them, one after the
    other): the host's median time a call in the second pass, when each shape was met once,
    count shapes ago. A least-recently-used cache smaller than the cycle misses every call."""
    weight = torch.randn(512, 512, device="cuda", dtype=torch.bfloat16)  # GPU time small
    pool = torch.randn(start + sum(counts) + 16, 512, device="cuda", dtype=torch.bfloat16)
    result = {}
    for count in counts:
        tokens = list(range(start, start + count))
        start += count
        for n in tokens:  # first pass: every shape met once
            torch.mm(pool[:n], weight)
        result[str(count)] = median(host_us(lambda n=n: torch.mm(pool[:n], weight)) for n in tokens)
    return result


def operands(n: int = 2200, layers: int = 32) -> dict:
    """One shape, as the 32 layers call it: each layer's own weight, input and output (other
    addresses each call), against one set of operands again and again; each with the GPU idle
    before the call, and with the GPU busy (a long product queued first, the launch queue far
    from full). Beside the host's times, the GPU's (gpu_*): a setting that saves the host time
    must not cost the card more."""
    dev, dtype = "cuda", torch.bfloat16
    weights = [torch.randn(4096, 4096, device=dev, dtype=dtype) for _ in range(layers)]
    inputs = [torch.randn(n, 4096, device=dev, dtype=dtype) for _ in range(layers)]
    outs = [torch.empty(n, 4096, device=dev, dtype=dtype) for _ in range(layers)]
    big = torch.randn(16384, 16384, device=dev, dtype=dtype)
    for i in range(layers):
        torch.mm(inputs[i], weights[i], out=outs[i])

    def busy_us(calls) -> float:
        torch.cuda.synchronize()
        torch.mm(big, big)  # about 10 ms of GPU work ahead of the timed calls
        start = time.perf_counter()
        for call in calls:
            call()
        seconds = time.perf_counter() - start
        torch.cuda.synchronize()
        return round(1e6 * seconds / len(calls), 1)

    lora = torch.randn(n, 16, device=dev, dtype=dtype)
    grad_a = torch.empty(4096, 16, device=dev, dtype=dtype)
    grad_b = torch.empty(16, 4096, device=dev, dtype=dtype)
    # the LoRA weights' gradients of the backward: a long reduction (n) into a small output
    weight_grads = [
        lambda i=i: torch.mm(inputs[i].t(), lora, out=grad_a) for i in range(layers)
    ] + [lambda i=i: torch.mm(lora.t(), inputs[i], out=grad_b) for i in range(layers)]
    for call in weight_grads:
        call()
    same = [lambda: torch.mm(inputs[0], weights[0], out=outs[0])] * layers
    each = [lambda i=i: torch.mm(inputs[i], weights[i], out=outs[i]) for i in range(layers)]
    # the MLP's products (up and down projections), four layers' weights
    ups = [torch.randn(4096, 11008, device=dev, dtype=dtype) for _ in range(4)]
    downs = [torch.randn(11008, 4096, device=dev, dtype=dtype) for _ in range(4)]
    hidden = torch.empty(n, 11008, device=dev, dtype=dtype)
    mlp = [lambda i=i: torch.mm(inputs[i], ups[i], out=hidden) for i in range(4)] + [
        lambda i=i: torch.mm(hidden, downs[i], out=outs[i]) for i in range(4)
    ]
    for call in mlp:
        call()

    def gpu_us(calls) -> float:
        """The GPU's time a call, the calls back to back (CUDA events); for products smaller than
        their launch (the LoRA weights' gradients), the host's pace instead."""
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for call in calls * 3:
            call()
        end.record()
        torch.cuda.synchronize()
        return round(1e3 * start.elapsed_time(end) / (3 * len(calls)), 1)

    return {
        "gpu_each_layers_operands_us": gpu_us(each),
        "gpu_lora_weight_grads_us": gpu_us(weight_grads),
        "idle_mlp_us": median(host_us(c) for c in mlp * 3),
        "gpu_mlp_us": gpu_us(mlp),
        "idle_same_operands_us": median(host_us(c) for c in same * 3),
        "idle_each_layers_operands_us": median(host_us(c) for c in each * 3),
        "busy_same_operands_us": median(busy_us(same) for _ in range(5)),
        "busy_each_layers_operands_us": median(busy_us(each) for _ in range(5)),
        "idle_lora_weight_grads_us": median(host_us(c) for c in weight_grads * 2),
        "idle_under_autocast_us": autocast_us(each),
    }


def autocast_us(calls) -> float:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return median(host_us(c) for c in calls * 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tag", default="")
    parser.add_argument("--operands-only", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    tokens = list(range(2048, 2048 + 40 * 7, 7))  # 40 token counts, met before
    fresh = list(range(3001, 3001 + 40 * 11, 11))  # 40 more, each new when timed
    out = stamp()
    out["cuda"] = torch.version.cuda
    default = torch.backends.cuda.preferred_blas_library()
    out["default_blas"] = str(default)
    out["operands"] = operands()
    print("operands", out["operands"], flush=True)
    half = len(fresh) // 2
    for backend in [] if args.operands_only else ["cublas", "cublaslt"]:
        torch.backends.cuda.preferred_blas_library(backend)
        part = fresh[:half] if backend == "cublas" else fresh[half:]
        out[backend] = measure(tokens, part)
        print(backend, json.dumps(out[backend]), flush=True)
    torch.backends.cuda.preferred_blas_library(default)  # the cycles through torch's default
    out["heuristics_cache_capacity"] = heuristics_cache_capacity()
    if not args.operands_only:
        out["cycle_second_pass_us"] = cycles([64, 512, 2048, 6144, 12288])
        print(out["heuristics_cache_capacity"], out["cycle_second_pass_us"], flush=True)
    print(write_json(result_path(args.out, "mm-host", out, args.tag), out))


if __name__ == "__main__":
    main()
