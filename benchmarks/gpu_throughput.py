"""Training, generation and whole-flow speed on the LLaMA-2-7B architecture, warm and cold.

    python benchmarks/gpu_throughput.py --data ../shared/data/finance_alpaca_sample.jsonl

LLaMA-2-7B with random weights (no hub; a byte-level BPE of 32,000 tokens trained on the rows
stands in for its tokenizer), the 1,000 / 300 rows, one GPU. Sections (--sections):

- loads: the first 4-bit load (quantize the bf16 checkpoint, keep the 4-bit copy) and a load
  of the kept copy; both give the same greedy answers (checked on 32 prompts).
- train: through the project's own train_adapter, in one process. The reference recipe
  (notebook: batch 1 padded to 512, 4-bit) and each --variants setting are run once on the
  same rows to warm up, then timed --runs times; medians. The process's very first run (the
  reference on its rows, before any other) is reported as the cold number.
- eval: each generation setting in a fresh process (as an evaluate task meets it): the first
  300 x 128 generation, then --runs warm ones; --eval-repeats fresh processes each, the
  settings in turn, the order reversed every other round (medians over the processes, each
  process kept). The reference (batch 1, 4-bit) is timed on --reference-prompts after a
  warm-up and extrapolated to 300.
- flow: the whole flow (python -m flows.finetune: load, format, baseline eval, train, save,
  final eval, compare) in a fresh process and a fresh store, --flow-runs times; the first
  finds no kept 4-bit copy. Reported: the flow run's own duration and its tasks'. With
  --flow-bare each process starts with empty Triton, inductor and 4-bit caches (a new
  container); with --flow-store-shared the runs share one store, each on rows of its own; with
  --flow-phases each run's loads, saves, generations and training, call by call; the runs named
  by --flow-as-before with every garbage collection walking the whole heap (before
  finance_qlora.heap). Each run reports its garbage collections by generation.
- t4: the T4 profile under a 15 GiB cap: fp16, FlashAttention off, 4-bit, checkpointing.

Random weights never emit EOS, so every answer runs the full 128 tokens (the worst case).
Results: <out>/<gpu>-<date>.json (sections merged into an existing file of that name).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.host_waits import host_waits  # noqa: E402
from benchmarks.phases import timed_calls  # noqa: E402
from benchmarks.step_timeline import profile_phases, profiled_generation  # noqa: E402
from benchmarks.variants import (  # noqa: E402
    EVAL_CONTEXTS,
    EVAL_VARIANTS,
    TRAIN_VARIANTS,
    VARIANT_CALLBACKS,
    VARIANT_CONTEXTS,
    float_attributes,
    heap_as_before,
)
from benchmarks.watch import (  # noqa: E402
    collections,
    compile_caches,
    decode_log,
    graph_breaks,
    out_of_memory_watch,
    watch_cache_bypasses,
)
from benchmarks.workload import (  # noqa: E402
    ARCHS,
    GIB,
    Setup,
    median,
    peak_gib,
    release,
    sync,
    train_once,
)
from experiments.determinism_probe import dropout_masks_agree  # noqa: E402
from finance_qlora.generation import generate_shard  # noqa: E402
from finance_qlora.modeling import compute_dtype, loaded  # noqa: E402
from finance_qlora.presets import deep_merge, merge_assignments  # noqa: E402
from finance_qlora.quantized import quantized_folder  # noqa: E402


def runner(setup: Setup, name: str, config, rows: int | None):
    """run(label, extra callbacks, on=another prompts file) trains variant `name` once on `rows`
    rows (all when None), with the variant's callbacks and context."""
    prompts = setup.subset(rows) if rows else setup.prompts.train_path
    factories = VARIANT_CALLBACKS.get(name, [])
    context = VARIANT_CONTEXTS.get(name, nullcontext)

    def run(label: str, extra=(), on: Path | None = None) -> dict:
        callbacks = [make() for make in factories] + list(extra)
        with float_attributes(not name.endswith("-dynamic-floats")), context():
            return train_once(setup, config, on or prompts, f"{name}-{label}", callbacks)

    return run


def warm_up(run) -> tuple[dict, dict]:
    """A warm-up run on the same rows (every batch shape, every kernel specialisation); it also
    counts where the host waits for the GPU (steps 3-5)."""
    waits: dict = {}
    return run("warmup", [host_waits(waits)]), waits


def profiled(setup: Setup, name: str, run) -> None:
    """--profile: three whole steps, phase by phase (step_timeline.py), after the timed runs."""
    if name in setup.args.profile.split(","):
        run("profile", [profile_phases(setup.args.out, name)], setup.subset(400))


def summary(config, rows: int | None, warm: dict, waits: dict, timed: list[dict]) -> dict:
    return {
        "rows": rows or 1000,
        "settings": config.train.model_dump(mode="json"),
        "useful_tok_s": median([t["useful_tok_s"] for t in timed]),
        "seconds": median([t["seconds"] for t in timed]),
        "peak_gib": max(t["peak_gib"] for t in timed),
        "warmup": {k: warm[k] for k in ("useful_tok_s", "seconds", "peak_gib")},
        "runs": timed,
        "host_waits": waits,
        "graph_breaks": graph_breaks(),
        "compile_caches": compile_caches(),
    }


def timed_train(setup: Setup, name: str, config, rows: int | None, runs: int) -> dict:
    """A warm-up run, then `runs` timed runs on `rows` rows (all when None)."""
    run = runner(setup, name, config, rows)
    warm, waits = warm_up(run)
    timed = [run(str(i)) for i in range(runs)]
    profiled(setup, name, run)
    return summary(config, rows, warm, waits, timed)


def interleaved_train(setup: Setup, names: list[str], runs: int) -> dict:
    """Each variant warmed up, then their timed runs taken in turn (A B A B ...): a drift in
    the machine's speed over the minutes then falls on every variant alike."""
    configs = {name: setup.config(train=TRAIN_VARIANTS[name]) for name in names}
    runs_of = {name: runner(setup, name, configs[name], None) for name in names}
    warm = {name: warm_up(runs_of[name]) for name in names}
    timed: dict[str, list[dict]] = {name: [] for name in names}
    for i in range(runs):
        for name in names:
            timed[name].append(runs_of[name](str(i)))
    for name in names:
        profiled(setup, name, runs_of[name])
    return {name: summary(configs[name], None, *warm[name], timed[name]) for name in names}


def section_loads(setup: Setup) -> dict:
    config = setup.config()
    kept = quantized_folder(
        config.model, str(setup.model_dir), None, compute_dtype(config.model.compute_dtype)
    )
    shutil.rmtree(kept, ignore_errors=True)
    prompts, answers, result = setup.test_prompts[:32], [], {}
    for name in ("quantize_and_keep", "kept"):
        release()
        started = time.perf_counter()
        # as an evaluation loads: since 2026-11-30 with the decode kernel compiled meanwhile
        ahead = kernel_ahead(config)
        with loaded(config.model, dequantize="never", decode_kernel_ahead=ahead) as (
            model,
            tokenizer,
        ):
            sync()
            result[f"{name}_seconds"] = round(time.perf_counter() - started, 2)
            generation = config.generation.model_copy(update={"max_new_tokens": 32})
            answers.append(generate_shard(model, tokenizer, prompts, generation))
        del model, tokenizer
        print(f"  load {name}: {result[f'{name}_seconds']} s")
    result["kept_gib"] = round(sum(f.stat().st_size for f in kept.iterdir()) / GIB, 2)
    answers = [[answers[k][i] for i in range(len(prompts))] for k in (0, 1)]
    same = sum(a == b for a, b in zip(*answers, strict=True))
    result["identical_greedy_answers"] = f"{same}/{len(prompts)}"
    return result


def section_train(setup: Setup, variants: list[str], runs: int) -> dict:
    reference = setup.config(
        "llama2-7b-t4",
        train={
            "rows_per_step": 1,  # the notebook's schedule: batch 1, 1,000 steps
            "batch_size": 1,
            "max_tokens_per_batch": None,
            "pad_to_multiple_of": 512,
            "dequantize": "never",
            "gradient_checkpointing": False,
        },
    )
    result: dict = {
        "dropout_masks_agree_bf16_fp32": dropout_masks_agree()
        if torch.cuda.is_available()
        else None
    }
    # The process's first training: what a cold worker pays (CUDA context, kernels, memory).
    cold = train_once(setup, reference, setup.subset(setup.args.reference_rows), "reference-cold")
    print("train.reference (warm):")
    ref = timed_train(setup, "reference", reference, setup.args.reference_rows, runs)
    ref["cold_useful_tok_s"] = cold["useful_tok_s"]
    result["reference"] = ref
    result["variants"] = {}
    watch = out_of_memory_watch()
    if setup.args.interleave:
        result["variants"] = interleaved_train(setup, variants, runs)
        result["interleaved"] = True
    for name in [] if setup.args.interleave else variants:
        print(f"train.{name}:")
        watch.lines.clear()
        try:
            config = setup.config(train=TRAIN_VARIANTS[name])
            result["variants"][name] = timed_train(setup, name, config, None, runs)
            result["variants"][name]["oom_backoffs"] = list(watch.lines)
        except Exception as exc:  # a variant that fails is reported, the rest still run
            result["variants"][name] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
            print(f"  failed: {result['variants'][name]['error']}")
        partial = setup.args.out / "train-partial.json"
        partial.write_text(json.dumps(result, indent=2))
    measured = {k: v for k, v in result["variants"].items() if "useful_tok_s" in v}
    # The preset, on NF4 values (4-bit kernels, or weights dequantized once from NF4: its
    # dequantize=auto decides where there is room), at the recipe's 16 rows a step.
    if "llama2-7b-h100" in measured:
        result["project_4bit"] = {"variant": "llama2-7b-h100"} | measured["llama2-7b-h100"]
        result["speedup_4bit"] = round(
            measured["llama2-7b-h100"]["useful_tok_s"] / ref["useful_tok_s"], 2
        )
    kernels = {k: v for k, v in measured.items() if v["settings"]["dequantize"] == "never"}
    if kernels:
        best = max(kernels, key=lambda k: kernels[k]["useful_tok_s"])
        result["project_4bit_kernels"] = {"variant": best} | kernels[best]
    if measured:
        fastest = max(measured, key=lambda k: measured[k]["useful_tok_s"])
        result["project"] = {"variant": fastest} | measured[fastest]
        tokens = measured[fastest]["runs"][0]["useful_tokens"]
        ref["seconds_1000_rows_extrapolated"] = round(tokens / ref["useful_tok_s"], 1)
    return result


def kernel_ahead(config) -> bool:
    """Whether an evaluation would compile the decode kernel while the model loads."""
    return config.generation.decode_kernel == "triton"


def eval_in_process(setup: Setup, variant: str, runs: int) -> dict:
    """One generation setting in this (fresh) process: load, first 300 x 128, warm runs."""
    settings = EVAL_VARIANTS[variant]
    loading = {"dequantize", "compile_ahead"}  # how the model is loaded, not generation's
    config = setup.config(generation={k: v for k, v in settings.items() if k not in loading})
    # the decode kernel compiled while the model loads, as an evaluation does, unless the
    # variant says not
    ahead = kernel_ahead(config) and settings.get("compile_ahead", True)
    replays = decode_log()
    release()
    started = time.perf_counter()
    with (
        EVAL_CONTEXTS.get(variant, nullcontext)(),
        loaded(config.model, dequantize=settings["dequantize"], decode_kernel_ahead=ahead) as (
            model,
            tokenizer,
        ),
    ):
        sync()
        load_seconds = time.perf_counter() - started
        seconds, digests = [], []
        for run in range(1 + runs):
            # --profile: the first and the last generation under torch.profiler (slower)
            profiling = variant in setup.args.profile.split(",") and run in (0, runs)
            label = f"{variant}-{'first' if run == 0 else 'warm'}"
            watched = profiled_generation(setup.args.out, label) if profiling else nullcontext()
            started = time.perf_counter()
            with watched:
                answers = generate_shard(model, tokenizer, setup.test_prompts, config.generation)
                sync()
            seconds.append(time.perf_counter() - started)
            texts = [answers[i].text for i in range(len(setup.test_prompts))]
            digests.append(hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:16])
            print(
                f"  {variant}: {len(answers)} x {config.generation.max_new_tokens} in "
                f"{seconds[-1]:.2f} s"
            )
        del model, tokenizer
    return {
        "settings": settings,
        "load_seconds": round(load_seconds, 2),
        "first_seconds": round(seconds[0], 2),
        "warm_seconds": median(seconds[1:]),
        "runs_seconds": [round(s, 2) for s in seconds],
        "new_tokens": len(setup.test_prompts) * config.generation.max_new_tokens,
        "peak_gib": peak_gib(),
        # the answers of each generation (variants with the same digest answered alike)
        "answers_sha256": digests,
        "decode_log": replays.lines,
        "profiled": variant in setup.args.profile.split(","),
    }


def reference_eval_in_process(setup: Setup) -> dict:
    config = setup.config(generation={"batch_size": 1})
    prompts = setup.test_prompts[: setup.args.reference_prompts]
    ahead = kernel_ahead(config)
    with loaded(config.model, dequantize="never", decode_kernel_ahead=ahead) as (
        model,
        tokenizer,
    ):
        short = config.generation.model_copy(update={"max_new_tokens": 8})
        generate_shard(model, tokenizer, prompts[:2], short)  # warm-up
        sync()
        started = time.perf_counter()
        generate_shard(model, tokenizer, prompts, config.generation)
        sync()
        seconds = time.perf_counter() - started
        del model, tokenizer
    return {
        "prompts": len(prompts),
        "seconds": round(seconds, 2),
        "seconds_300x128": round(seconds / len(prompts) * 300, 1),
        "extrapolated_from_prompts": len(prompts),
        "peak_gib": peak_gib(),
    }


def child(args, flag: str, value: str) -> dict:
    """Run this script with `flag value` in a fresh process; its last line is JSON."""
    command = [sys.executable, __file__, flag, value, "--data", str(args.data), "--arch", args.arch]
    command += ["--work", str(args.work), "--runs", str(args.runs), "--out", str(args.out)]
    command += ["--profile", args.profile]
    command += ["--reference-prompts", str(args.reference_prompts)]
    command += [f"--flow-set={assignment}" for assignment in args.flow_set]
    env = None
    if args.cold_triton:  # the process compiles Triton's kernels itself, as a bare worker would
        env = {**os.environ, "TRITON_CACHE_DIR": tempfile.mkdtemp(prefix="triton-cache-")}
    if args.flow_bare and flag == "--flow-child":  # a new container: every local cache empty
        env = {
            **os.environ,
            **{
                name: tempfile.mkdtemp(prefix=f"{name.lower()}-")
                for name in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "FINANCE_QLORA_CACHE")
            },
        }
    command += ["--flow-store-shared"] * args.flow_store_shared
    command += ["--flow-phases"] * args.flow_phases
    command += [f"--flow-as-before={args.flow_as_before}"] * bool(args.flow_as_before)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    sys.stdout.write(done.stdout[-3000:])
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1][:400] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def section_eval(args, variants: list[str]) -> dict:
    result: dict = {"variants": {}}
    if args.reference_prompts:  # 0: the variants alone
        result["reference"] = child(args, "--eval-child", "reference")
    processes: dict[str, list[dict]] = {name: [] for name in variants}
    for repeat in range(args.eval_repeats):  # fresh processes, the variants in turn, the
        # order reversed every other round (neither always meets the machine's first process)
        for name in variants if repeat % 2 == 0 else variants[::-1]:
            print(f"eval.{name} (process {repeat + 1} of {args.eval_repeats}):")
            processes[name].append(child(args, "--eval-child", name))
    for name, runs in processes.items():
        result["variants"][name] = runs[0]
        if len(runs) > 1:  # every process kept; the medians over them (none if one failed)
            failed = [r["error"] for r in runs if "error" in r]
            result["variants"][name] = {"processes": runs} | (
                {"error": failed[0]}
                if failed
                else {
                    "first_seconds": median([r["first_seconds"] for r in runs]),
                    "warm_seconds": median([r["warm_seconds"] for r in runs]),
                    "first_seconds_processes": [r["first_seconds"] for r in runs],
                    # the load and the first generation together: what compiling ahead moves
                    "load_seconds_processes": [r["load_seconds"] for r in runs],
                    "answers_sha256": [d for r in runs for d in r["answers_sha256"]],
                    "settings": runs[0]["settings"],
                }
            )
    measured = {k: v for k, v in result["variants"].items() if "first_seconds" in v}
    digests = {k: v["answers_sha256"] for k, v in measured.items()}
    late, each = "dequantized-static", "dequantized-static-stop-each-step"
    if late in digests and each in digests:  # every generation of every process alike
        result["deferred_stop_answers_alike"] = len(set(digests[late] + digests[each])) == 1
    if "dequantized-static" in digests and "dequantized-static-eager" in digests:
        result["cuda_graphs_answers_alike"] = (
            set(digests["dequantized-static"]) == set(digests["dequantized-static-eager"])
            and len(set(digests["dequantized-static"])) == 1
        )
    if measured:  # the preset as shipped where measured, else the fastest
        best = "dequantized-static" if "dequantized-static" in measured else None
        best = best or min(measured, key=lambda k: measured[k]["first_seconds"])
        result["project"] = {"variant": best} | measured[best]
        four_bit = {k: v for k, v in measured.items() if k.startswith("4bit")}
        if four_bit:
            best4 = min(four_bit, key=lambda k: four_bit[k]["first_seconds"])
            result["project_4bit"] = {"variant": best4} | four_bit[best4]
    return result


def flow_run_timing(flow_run_id: str) -> tuple[float, dict[str, float]]:
    """A flow run's duration and its task runs' durations (seconds), from Prefect's API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
        )
    steps = {t.name: round(t.total_run_time.total_seconds(), 2) for t in tasks}
    return round(flow_run.total_run_time.total_seconds(), 2), steps


def flow_in_process(setup: Setup, run: int) -> dict:
    """One whole flow run in this fresh process, in a fresh store; its duration from Prefect."""
    from flows.finetune import finetune

    store = setup.args.work / f"flow-store-{run}"
    data: dict = {"dataset": str(setup.args.data)}
    if setup.args.flow_store_shared:  # one store (section_flow empties it first), each run on
        # rows of its own: every step computed, nothing served from the store's cache but what
        # the store keeps for every run (the compiled layers with train.compile_cache=store)
        store, data["seed"] = setup.args.work / "flow-store-shared", 42 + run
    else:
        shutil.rmtree(store, ignore_errors=True)
    overrides = deep_merge(
        {
            "data": data,
            "model": {"name": str(setup.model_dir)},
            "output_dir": str(store),
        },
        merge_assignments(setup.args.flow_set),
    )
    started = time.perf_counter()
    as_before = str(run) in setup.args.flow_as_before.split(",")
    with (
        timed_calls() if setup.args.flow_phases else nullcontext([]) as calls,
        heap_as_before() if as_before else nullcontext(),
        collections() as collected,
    ):
        summary = finetune("llama2-7b-h100", overrides)
    wall = time.perf_counter() - started
    seconds, steps = flow_run_timing(summary["flow_run"])
    return {
        "heap_as_before": as_before,
        "collections": collected,
        "rouge": summary["rouge"],  # the pretrained scores: equal for one split, however timed
        "calls": calls,
        "flow_run_seconds": seconds,
        "call_seconds": round(wall, 2),
        "tasks_seconds": steps,
        "cached_steps": summary["cached_steps"],
        "peak_gib": peak_gib(),
        "compile_caches": compile_caches(),
    }


def section_flow(args, setup: Setup, runs: int, evaluated: dict | None) -> dict:
    model = setup.config().model
    kept = quantized_folder(model, str(setup.model_dir), None, compute_dtype(model.compute_dtype))
    shutil.rmtree(kept, ignore_errors=True)  # the first run quantizes, as on a new worker
    shutil.rmtree(args.work / "flow-store-shared", ignore_errors=True)
    if evaluated and "project" in evaluated:  # generate as the fastest measured setting did
        chosen = evaluated["project"]["settings"]
        args.flow_set += [f"generation.{k}={v}" for k, v in chosen.items() if k != "batch_size"]
    results = []
    for run in range(runs):
        started = time.perf_counter()
        result = child(args, "--flow-child", str(run))
        result["process_seconds"] = round(time.perf_counter() - started, 2)
        print(f"  flow run {run}: {result}")
        results.append(result)
    kept_runs = [r["flow_run_seconds"] for r in results[1:] if "flow_run_seconds" in r]
    return {
        "seconds": median(kept_runs) if kept_runs else None,
        "first_seconds": results[0].get("flow_run_seconds"),
        "preset": "llama2-7b-h100",
        "set": args.flow_set,
        "bare": args.flow_bare,
        "store_shared": args.flow_store_shared,
        "runs": results,
    }


def section_t4(setup: Setup) -> dict:
    """A 16 GB T4 stood in for by a 15 GiB cap, fp16, FlashAttention off, 4-bit."""
    watch = out_of_memory_watch()
    if torch.cuda.is_available():
        release()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(15 * GIB / total)
        torch.backends.cuda.enable_flash_sdp(False)  # the T4 (sm_75) has none
    config = setup.config(
        "llama2-7b-t4",
        model={"compute_dtype": "float16"},
        train={"dequantize": "never", "gradient_checkpointing": True},
        generation={"dequantize": "never"},
    )
    profile: dict = {"cap_gib": 15, "compute_dtype": "float16", "flash_attention": False}
    profile["settings"] = config.train.model_dump(mode="json")
    try:
        rows = setup.args.t4_rows
        profile["train"] = timed_train(setup, "t4", config, rows, 1)
        release()
        prompts = setup.test_prompts[: setup.args.t4_prompts]
        ahead = kernel_ahead(config)
        with loaded(config.model, dequantize="never", decode_kernel_ahead=ahead) as (
            model,
            tokenizer,
        ):
            started = time.perf_counter()
            generate_shard(model, tokenizer, prompts, config.generation)
            sync()
            profile["eval"] = {
                "prompts": len(prompts),
                "batch_size": config.generation.batch_size,
                "max_tokens_per_batch": config.generation.max_tokens_per_batch,
                "seconds": round(time.perf_counter() - started, 2),
                "peak_gib": peak_gib(),
            }
            del model, tokenizer
        profile["fits"] = not watch.lines
    except (torch.OutOfMemoryError, RuntimeError) as exc:  # loading wraps OOM in RuntimeError
        profile["fits"], profile["error"] = False, str(exc).splitlines()[0][:300]
    profile["oom_backoffs"] = list(watch.lines)
    return profile


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared/data/finance_alpaca_sample.jsonl"
    )
    parser.add_argument("--arch", choices=ARCHS, default="llama2-7b")
    parser.add_argument("--work", type=Path, default=Path("/tmp/finance-qlora-bench"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--sections", default="loads,train,eval,flow,t4")
    parser.add_argument("--variants", default=",".join(TRAIN_VARIANTS))
    parser.add_argument("--eval-variants", default=",".join(EVAL_VARIANTS))
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument(
        "--interleave", action="store_true", help="train: the variants' timed runs in turn"
    )
    parser.add_argument(
        "--eval-repeats",
        type=int,
        default=1,
        choices=range(1, 11),
        metavar="1..10",
        help="eval: fresh processes per variant",
    )
    parser.add_argument(
        "--cold-triton",
        action="store_true",
        help="each fresh process with an empty Triton cache (compiles its kernels)",
    )
    parser.add_argument("--flow-runs", type=int, default=3)
    parser.add_argument(
        "--flow-set", action="append", default=[], help="section.field=value for the flow runs"
    )
    parser.add_argument(
        "--flow-bare",
        action="store_true",
        help="each flow process with empty Triton, inductor and 4-bit caches (a new container)",
    )
    parser.add_argument(
        "--flow-store-shared",
        action="store_true",
        help="the flow runs share one store, each on rows of its own (data.seed 42 + run)",
    )
    parser.add_argument(
        "--flow-phases",
        action="store_true",
        help="each flow run also reports its loads, saves, generations and training, call by "
        "call (benchmarks/phases.py)",
    )
    parser.add_argument(
        "--flow-as-before",
        default="",
        help="flow runs (indices, e.g. 1,2) whose garbage collections walk the whole heap, as "
        "before finance_qlora.heap (variants.heap_as_before), beside the others",
    )
    parser.add_argument("--reference-rows", type=int, default=48)
    parser.add_argument("--reference-prompts", type=int, default=4)
    parser.add_argument("--t4-rows", type=int, default=160)
    parser.add_argument("--t4-prompts", type=int, default=64)
    parser.add_argument(
        "--profile",
        default="",
        help="train variants to profile (steps 3-5) and eval variants (first and last "
        "generation), comma-separated",
    )
    parser.add_argument("--eval-child", help=argparse.SUPPRESS)
    parser.add_argument("--flow-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.interleave and "-dynamic-floats" in args.variants:
        parser.error("-dynamic-floats variants compile again at each change: not with --interleave")
    args.data, args.work = args.data.resolve(), args.work.resolve()
    os.environ.setdefault("FINANCE_QLORA_CACHE", str(args.work / "cache"))
    watch_cache_bypasses()
    setup = Setup(args)
    if args.eval_child:
        if args.eval_child == "reference":
            print(json.dumps(reference_eval_in_process(setup)))
        else:
            print(json.dumps(eval_in_process(setup, args.eval_child, args.runs)))
        return
    if args.flow_child:
        print(json.dumps(flow_in_process(setup, int(args.flow_child))))
        return

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    date = datetime.now(UTC).date().isoformat()
    out_file = args.out / f"{gpu.replace(' ', '-')}-{date}.json"
    args.out.mkdir(parents=True, exist_ok=True)
    result = json.loads(out_file.read_text()) if out_file.is_file() else {}
    import bitsandbytes

    result |= {
        "gpu": gpu,
        "host": platform.node(),  # lent machines differ: which one a result came from
        "date": date,
        "arch": args.arch,
        "torch": torch.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "command": " ".join(["python", "benchmarks/gpu_throughput.py", *sys.argv[1:]]),
    }
    sections = {
        "loads": lambda: section_loads(setup),
        "train": lambda: section_train(setup, args.variants.split(","), args.runs),
        "eval": lambda: section_eval(args, args.eval_variants.split(",")),
        "flow": lambda: section_flow(args, setup, args.flow_runs, result.get("eval")),
        "t4": lambda: section_t4(setup),
    }
    names = {"t4": "t4_profile", "flow": "whole_flow", "loads": "loads"}
    for section in args.sections.split(","):
        print(f"== {section}", flush=True)
        result[names.get(section, section)] = sections[section]()
        out_file.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
