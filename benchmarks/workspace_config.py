"""CUBLAS_WORKSPACE_CONFIG and the host's time of a matrix product (bf16, LLaMA-2-7B's widths,
a packed micro-batch), each experiment alone in its process (each changes its environment):

    python benchmarks/workspace_config.py --named-later   # read at each product, or once?
    python benchmarks/workspace_config.py --same-results  # the same bits named and unnamed?
    python benchmarks/workspace_config.py --deterministic-check  # when does torch refuse?

`finance_qlora.generation` names the variable for its deterministic generation; mm_host.py
--operands-only, run with it named and unset, gives its cost. Results:
<out>/workspace-config-<gpu>-<date>-<experiment>.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.mm_host import host_us  # noqa: E402
from benchmarks.result_file import result_path, stamp, write_json  # noqa: E402

VARIABLE = "CUBLAS_WORKSPACE_CONFIG"


def workspace_named_later(n: int = 2200) -> dict:
    """Is CUBLAS_WORKSPACE_CONFIG read at each product, or once? The host's time a product as
    the process started (named or not: `named_at_start`), then named in this process
    (os.environ), then in a new thread (a new cuBLAS handle) while named, then unset, then in
    a new thread again."""
    weight = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(n, 4096, device="cuda", dtype=torch.bfloat16)
    call = lambda: torch.mm(x, weight)  # noqa: E731
    call()
    result = {"named_at_start": VARIABLE in os.environ, "at_start_us": host_us(call, 50)}
    os.environ[VARIABLE] = ":4096:8"
    result["named_us"] = host_us(call, 50)

    def in_thread(key: str) -> None:
        call()
        result[key] = host_us(call, 50)

    thread = threading.Thread(target=in_thread, args=("named_new_thread_us",))
    thread.start()
    thread.join()
    del os.environ[VARIABLE]
    result["unset_again_us"] = host_us(call, 50)
    thread = threading.Thread(target=in_thread, args=("unset_new_thread_us",))
    thread.start()
    thread.join()
    return result


def same_results() -> dict:
    """Does naming the variable change what a product computes (cuBLAS's kernel choice)? Every
    product shape of a 7B layer's QLoRA forward and backward (LoRA r=16; the base weights get no
    gradient; the transposed operands as the backward passes them), at several token counts,
    computed with it named, unnamed, named again: bit for bit equal or not."""
    dev, dtype = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device=dev, dtype=dtype, generator=g)

    pairs = []
    for n in (1531, 2200, 2987, 4096):
        x, h, lora = rand(n, 4096), rand(n, 11008), rand(n, 16)
        w, up, down = rand(4096, 4096), rand(4096, 11008), rand(11008, 4096)
        a, b = rand(4096, 16), rand(16, 4096)
        forward = [(x, w), (x, up), (h, down), (x, a), (lora, b)]
        input_grads = [(x, w.t()), (h, up.t()), (x, down.t()), (lora, a.t()), (x, b.t())]
        lora_weight_grads = [(x.t(), lora), (lora.t(), x)]
        pairs += forward + input_grads + lora_weight_grads
    results = {}
    for named in (True, False, True):
        if named:
            os.environ[VARIABLE] = ":4096:8"
        else:
            os.environ.pop(VARIABLE, None)
        results.setdefault(named, []).append([torch.mm(p, q) for p, q in pairs])
    same = [torch.equal(u, v) for u, v in zip(results[True][0], results[False][0], strict=True)]
    again = [torch.equal(u, v) for u, v in zip(results[True][0], results[True][1], strict=True)]
    return {"products": len(pairs), "equal_named_unnamed": sum(same), "equal_again": sum(again)}


# each case in a fresh process: what happens to the variable before the deterministic product
CASES = {
    "never_named": "",
    "first_product_unnamed_then_named": "torch.mm(x, x); os.environ[V] = ':4096:8'",
    "first_product_named_then_unnamed": (
        "os.environ[V] = ':4096:8'; torch.mm(x, x); del os.environ[V]"
    ),
    "named_before_the_first_product": "os.environ[V] = ':4096:8'",
}
CASE_CODE = """
import os, torch
V = "CUBLAS_WORKSPACE_CONFIG"
x = torch.randn(64, 64, device="cuda", dtype=torch.{dtype})
{setup}
torch.use_deterministic_algorithms(True)
try:
    torch.mm(x, x)
    torch.cuda.synchronize()
    print("ran")
except RuntimeError as error:
    print("refused: " + str(error).splitlines()[0][:160])
"""


def deterministic_check() -> dict:
    """Does torch refuse a product under deterministic algorithms for want of the variable, and
    does it read it once (at the process's first product) or at each? Each case in a fresh
    process that starts without it."""
    env = {k: v for k, v in os.environ.items() if k != VARIABLE}
    result = {}
    for dtype in ("bfloat16", "float16", "float32"):
        for case, setup in CASES.items():
            code = CASE_CODE.format(dtype=dtype, setup=setup)
            done = subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True
            )
            result[f"{dtype}.{case}"] = done.stdout.strip() or done.stderr.strip()[-300:]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--named-later", action="store_true")
    which.add_argument("--same-results", action="store_true")
    which.add_argument("--deterministic-check", action="store_true")
    args = parser.parse_args()
    experiments = {
        "named-later": workspace_named_later,
        "same-results": same_results,
        "deterministic-check": deterministic_check,
    }
    experiment = next(e for e in experiments if getattr(args, e.replace("-", "_")))
    out = stamp()
    out[experiment] = experiments[experiment]()
    print(experiment, out[experiment], flush=True)
    print(write_json(result_path(args.out, "workspace-config", out, f"-{experiment}"), out))


if __name__ == "__main__":
    main()
