"""experiments/recipe_scores.py: a recipe judged over several training seeds, on hand-made run
folders (examples.parquet and comparison.json as the flow writes them): a row's scores are those
of the seed-averaged test rows, and two recipes are compared over the same rows."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from experiments.recipe_scores import interval, row, versus_reference

PROMPTS = [f"question {i}" for i in range(6)]
PRETRAINED = [0.1, 0.2, 0.1, 0.3, 0.2, 0.1]


def run_folder(tmp_path: Path, name: str, finetuned: list[float], nll: list[float], **more):
    """One flow run's summary as recipe_quality's child prints it, with its report folder."""
    folder = tmp_path / name
    folder.mkdir()
    pd.DataFrame(
        {
            "prompt": more.get("prompts", PROMPTS),
            "pretrained_rougeL": PRETRAINED,
            "finetuned_rougeL": finetuned,
        }
    ).to_parquet(folder / "examples.parquet")
    mean = sum(finetuned) / len(finetuned)
    before = sum(PRETRAINED) / len(PRETRAINED)
    interval = {"mean": mean - before, "low": 0.0, "high": 0.1}
    rouge = {
        m: {"pretrained": {"mean": before}, "finetuned": {"mean": mean}, "delta": interval}
        for m in ("rouge1", "rouge2", "rougeL", "rougeLsum")
    }
    comparison = {"rouge": rouge, "loop_share": {"pretrained": 0.5, "finetuned": more.get("loops")}}
    (folder / "comparison.json").write_text(json.dumps(comparison))
    return {
        "report": str(folder / "comparison.md"),
        "answer_nll": {"pretrained": [3.0] * len(nll), "finetuned": nll},
        "train_losses": [2.5, 2.0],
        "train": {
            "seconds": more.get("seconds", 10.0),
            "tokens": 1000,
            "rows_per_step": 16,
            "steps": 63,
            "micro_batches_per_step": 1,
        },
        "cached_steps": [],
        "adapter": f"adapters/{name}",
    }


def test_a_recipe_is_scored_on_its_seed_averaged_rows(tmp_path):
    runs = {
        42: run_folder(tmp_path, "a", [0.3, 0.2, 0.1, 0.5, 0.2, 0.3], [2.0] * 6, loops=0.2),
        43: run_folder(tmp_path, "b", [0.1, 0.4, 0.3, 0.3, 0.2, 0.1], [2.2] * 6, loops=0.4),
    }
    result = row(runs, {})
    averaged = [0.2, 0.3, 0.2, 0.4, 0.2, 0.2]
    assert result["seeds"] == [42, 43]
    assert result["rougeL"]["finetuned"] == pytest.approx(sum(averaged) / 6, abs=1e-4)
    assert result["rougeL"]["delta"] == pytest.approx((sum(averaged) - sum(PRETRAINED)) / 6, 1e-3)
    # the interval is the bootstrap of the averaged rows' deltas, not one seed's
    direct = interval(PRETRAINED, averaged)
    assert (result["rougeL"]["delta_ci_low"], result["rougeL"]["delta_ci_high"]) == (
        direct["low"],
        direct["high"],
    )
    assert result["loop_share"] == {"pretrained": 0.5, "finetuned": pytest.approx(0.3)}
    assert result["answer_nll"] == {"pretrained": 3.0, "finetuned": pytest.approx(2.1)}
    assert set(result["per_seed"]) == {42, 43}
    assert result["per_seed"][43]["rougeL"]["finetuned"] == pytest.approx(0.2333, abs=1e-4)


def test_two_recipes_are_compared_row_by_row(tmp_path):
    reference = {42: run_folder(tmp_path, "r", [0.2] * 6, [2.0] * 6, loops=0.1)}
    better = {42: run_folder(tmp_path, "p", [0.3] * 6, [1.9] * 6, loops=0.1)}
    compared = versus_reference(better, reference)
    assert compared["rougeL"] == {"mean": 0.1, "low": 0.1, "high": 0.1}  # preset minus reference
    assert compared["answer_nll"]["mean"] == pytest.approx(-0.1)
    other_rows = {42: run_folder(tmp_path, "o", [0.3] * 6, [1.9] * 6, prompts=PROMPTS[::-1])}
    assert "error" in versus_reference(other_rows, reference)


def test_seeds_that_scored_other_rows_are_refused(tmp_path):
    runs = {
        42: run_folder(tmp_path, "a", [0.2] * 6, [2.0] * 6, loops=0.1),
        43: run_folder(tmp_path, "b", [0.2] * 6, [2.0] * 6, loops=0.1, prompts=PROMPTS[::-1]),
    }
    with pytest.raises(ValueError, match="same test rows"):
        row(runs, {})
