"""The scores of experiments/recipe_quality.py: a recipe's runs (one a training seed) judged
on their seed-averaged test rows, against the pretrained model and the reference schedule.

Each run is the summary recipe_quality's child prints: the flow's run summary (its report
folder holds examples.parquet and comparison.json) with the held-out answer loss per test row.
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import fmean as mean
from typing import Any

from finance_qlora.presets import resolve_config

TOLERANCE = 0.005  # the bar: a preset's delta at least the reference's minus this


def examples(summary: dict[str, Any]):
    import pandas as pd

    return pd.read_parquet(Path(summary["report"]).parent / "examples.parquet")


def seed_average(runs: dict[int, dict[str, Any]], column: str) -> list[float]:
    """Each test row's `column` (an examples.parquet column, or answer_nll.finetuned), averaged
    over the seeds' runs: the recipe's expected score on that row."""
    scores = [
        s["answer_nll"]["finetuned"] if column == "answer_nll" else examples(s)[column].tolist()
        for s in runs.values()
    ]
    return [mean(values) for values in zip(*scores, strict=True)]


def interval(before: list[float], after: list[float]) -> dict[str, float]:
    """The paired 95% bootstrap interval of after - before over the test rows (the runs' own
    bootstrap settings)."""
    from finance_qlora.bootstrap import paired_bootstrap

    settings = resolve_config("smollm2-135m").bootstrap
    delta = paired_bootstrap(
        before, after, settings.resamples, settings.confidence, settings.seed
    ).delta
    return {k: round(v, 4) for k, v in delta.model_dump().items()}


def per_seed(summary: dict[str, Any]) -> dict[str, Any]:
    comparison = json.loads((Path(summary["report"]).parent / "comparison.json").read_text())
    rouge = comparison["rouge"]["rougeL"]
    trained = summary["train"]
    return {
        "rougeL": {
            "pretrained": round(rouge["pretrained"]["mean"], 4),
            "finetuned": round(rouge["finetuned"]["mean"], 4),
            "delta": round(rouge["delta"]["mean"], 4),
            "delta_ci_low": round(rouge["delta"]["low"], 4),
            "delta_ci_high": round(rouge["delta"]["high"], 4),
        },
        "rouge": {m: round(v["delta"]["mean"], 4) for m, v in comparison["rouge"].items()},
        "loop_share": {k: round(v, 4) for k, v in comparison["loop_share"].items()},
        "answer_nll": {k: round(mean(v), 4) for k, v in summary["answer_nll"].items()},
        "train_losses": [round(x, 4) for x in summary["train_losses"]],
        "train_seconds": round(trained["seconds"], 2),
        "useful_tok_s": round(trained["tokens"] / trained["seconds"], 1),
        "rows_per_step": trained["rows_per_step"],
        "optimizer_steps": trained["steps"],
        "micro_batches_per_step": trained["micro_batches_per_step"],
        "cached_steps": summary["cached_steps"],
        "adapter": summary["adapter"],
    }


def row(runs: dict[int, dict[str, Any]], train: dict[str, Any]) -> dict[str, Any]:
    """One recipe over its seeds: scores of the seed-averaged rows (a single seed: that run's),
    means of the rest, and each seed's own run under `per_seed`."""
    seeds = {seed: per_seed(s) for seed, s in runs.items()}
    first = next(iter(runs.values()))
    tables = [examples(s) for s in runs.values()]
    if any(not t["prompt"].equals(tables[0]["prompt"]) for t in tables):
        raise ValueError("the seeds' runs did not evaluate the same test rows in the same order")
    pretrained = tables[0]["pretrained_rougeL"].tolist()
    finetuned = seed_average(runs, "finetuned_rougeL")
    delta = interval(pretrained, finetuned)
    one = next(iter(seeds.values()))
    return {
        "train_settings": resolve_config("smollm2-135m", {"train": train}).train.model_dump(
            mode="json", exclude={"seed"}
        ),
        "seeds": list(seeds),
        **{k: one[k] for k in ("rows_per_step", "optimizer_steps", "micro_batches_per_step")},
        "rougeL": {
            "pretrained": round(mean(pretrained), 4),
            "finetuned": round(mean(finetuned), 4),
            "delta": delta["mean"],
            "delta_ci_low": delta["low"],
            "delta_ci_high": delta["high"],
        },
        "rouge": {m: round(mean(s["rouge"][m] for s in seeds.values()), 4) for m in one["rouge"]},
        "loop_share": {
            "pretrained": one["loop_share"]["pretrained"],
            "finetuned": round(mean(s["loop_share"]["finetuned"] for s in seeds.values()), 4),
        },
        "answer_nll": {
            "pretrained": round(mean(first["answer_nll"]["pretrained"]), 4),
            "finetuned": round(mean(seed_average(runs, "answer_nll")), 4),
        },
        "train_seconds": round(mean(s["train_seconds"] for s in seeds.values()), 2),
        "useful_tok_s": round(mean(s["useful_tok_s"] for s in seeds.values()), 1),
        "per_seed": seeds,
    }


def versus_reference(
    runs: dict[int, dict[str, Any]], reference: dict[int, dict[str, Any]]
) -> dict[str, Any]:
    """The recipe's seed-averaged fine-tuned ROUGE-L and answer loss minus the reference
    schedule's, paired over the same test rows, with bootstrap intervals: whether two recipes
    differ beyond the rows' spread. Where both evaluated the same pretrained answers
    (`pretrained_as_reference`), the ROUGE-L one is also the difference of their deltas."""
    if not examples(next(iter(reference.values())))["prompt"].equals(
        examples(next(iter(runs.values())))["prompt"]
    ):
        return {"error": "the two recipes did not evaluate the same test rows in the same order"}
    return {
        "rougeL": interval(
            seed_average(reference, "finetuned_rougeL"), seed_average(runs, "finetuned_rougeL")
        ),
        "answer_nll": interval(
            seed_average(reference, "answer_nll"), seed_average(runs, "answer_nll")
        ),
    }


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
