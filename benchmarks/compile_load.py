"""Where a compiled layer's time goes when it compiles, cold and from inductor's cache (issue
19: the compiled preset's flow spent about 45 s of a warm-cache compile in
`PyCodeCache.load_by_key_path`).

    python benchmarks/compile_load.py --data ../shared/data/finance_alpaca_sample.jsonl

The LLaMA-2-7B layer (random weights, 2 layers: `train.compile` compiles one graph a layer
class, so two layers compile what 32 do) trained on --rows rows with the `llama2-7b-h100`
settings and compiled layers, each variant in a fresh process over one inductor cache:

- cold: an empty cache;
- warm: the cache the cold process left;
- warm-profiled: the same under cProfile (slower: for where the time goes; the top callers by
  cumulative time go to <out>/compile-load-profile.txt);
- cold-dynamic-floats, warm-dynamic-floats: the layers' float attributes as graph inputs, as
  before `kernels.CONSTANT_FLOATS` (other graphs: inductor's graph cache is cold for the first
  of them, Triton's kernels may not be: not comparable with cold);
- cold-cppwrapper, warm-cppwrapper: the kernels called from inductor's C++ wrapper (a C++ build
  for each graph: does it bring the CPU checks back?).

The results of 2026-11-29 name the variants of this script at commit 5d6fcb0 (warm-as-before,
warm-profiled, warm: the compile workers started before the model loads, warm-threads1) and
one run with TORCHINDUCTOR_VEC_ISA_OK=1 (benchmarks/README.md says what each was).

Reported per process: the training's seconds (the compile included), torch.compile's phases
(watch.compile_caches) and the files in the Triton caches before and after; and the
C++ sources in the cache (`cpp_sources`: what the CUDA layer compiled for the CPU).
Results: <out>/compile-load-<gpu>-<date>.json.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.watch import compile_caches  # noqa: E402
from benchmarks.workload import Setup, train_once  # noqa: E402

VARIANTS = (
    "cold",
    "warm",
    "warm-profiled",
    "cold-dynamic-floats",
    "warm-dynamic-floats",
    "cold-cppwrapper",
    "warm-cppwrapper",
)


def triton_files(cache: Path) -> dict[str, int]:
    """Files in inductor's Triton cache and in Triton's own (the launchers)."""
    folders = {"inductor_triton": cache / "triton", "home_triton": Path.home() / ".triton"}
    return {name: sum(p.is_file() for p in folder.rglob("*")) for name, folder in folders.items()}


def cpp_sources(cache: Path, head: int = 1200) -> dict[str, str]:
    """Each C++ source in the cache, by path, with its opening characters."""
    return {
        str(path.relative_to(cache)): path.read_text(errors="replace")[:head]
        for path in sorted(cache.rglob("*.cpp"))
    }


def in_process(args, variant: str) -> dict:
    cache = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    before = triton_files(cache)
    if variant.endswith("-dynamic-floats"):
        from finance_qlora import kernels

        kernels.CONSTANT_FLOATS = False
    if variant.endswith("-cppwrapper"):
        import torch._inductor.config

        torch._inductor.config.cpp_wrapper = True
    setup = Setup(args)
    config = setup.config(train={"compile": True, "fused_kernels": False})
    prompts = setup.subset(args.rows)
    profiler = cProfile.Profile() if variant == "warm-profiled" else None
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    run = train_once(setup, config, prompts, variant)
    if profiler:
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(60)
        (args.out / "compile-load-profile.txt").write_text(text.getvalue())
    return {
        "train_seconds": run["seconds"],
        "call_seconds": round(time.perf_counter() - started, 2),
        "compile_caches": compile_caches(),
        "triton_files_before": before,
        "triton_files_after": triton_files(cache),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared/data/finance_alpaca_sample.jsonl"
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/finance-qlora-compile-load"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--arch", default="llama2-7b-layers2")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--child", choices=VARIANTS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child:
        print(json.dumps(in_process(args, args.child)))
        return

    Setup(args)  # the random model and the splits, built before any process is timed
    cache = args.work / "inductor-cache"
    results = {}
    for variant in args.variants.split(","):
        env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": str(cache)}
        command = [sys.executable, __file__, "--child", variant, "--data", str(args.data)]
        command += ["--work", str(args.work), "--out", str(args.out), "--arch", args.arch]
        command += ["--rows", str(args.rows)]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode:
            results[variant] = {"error": done.stderr.strip().splitlines()[-1][:400]}
        else:
            results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        results[variant]["process_seconds"] = round(time.perf_counter() - started, 2)
        print(variant, json.dumps(results[variant]), flush=True)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    date = datetime.now(UTC).strftime("%Y-%m-%d")
    record = {
        "gpu": gpu,
        "date": date,
        "torch": torch.__version__,
        "command": "python " + " ".join(sys.argv),
        "arch": args.arch,
        "rows": args.rows,
        "variants": results,
        "cpp_sources": cpp_sources(cache),
    }
    path = args.out / f"compile-load-{gpu.replace(' ', '-')}-{date}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
