"""The SmolLM2 experiment's recipe search goes on where a cut-off run stopped."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_experiment():
    spec = importlib.util.spec_from_file_location("smollm2", ROOT / "experiments" / "smollm2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_search_keeps_scored_candidates_and_notes(tmp_path):
    experiment = load_experiment()
    protocol = experiment.PROTOCOLS["gpu"]
    first, second = protocol["candidates"][:2]
    path = tmp_path / "smollm2-gpu-validation.json"
    path.write_text(json.dumps({"history": "cut off after one candidate"}))

    experiment.write_search(path, protocol, [{"recipe": first, "rougeL": 0.2}], "cmd", "rows-a")
    search = json.loads(path.read_text())
    assert search["history"] == "cut off after one candidate"
    assert (search["fit_rows"], search["validation_rows"]) == (800, 200)
    assert second in search["not_run"] and first not in search["not_run"]

    scored = experiment.scored_candidates(path, protocol, "rows-a")
    assert [v["recipe"] for v in scored] == [first]


def test_search_from_other_rows_or_recipes_is_not_reused(tmp_path):
    experiment = load_experiment()
    protocol = experiment.PROTOCOLS["gpu"]
    path = tmp_path / "smollm2-gpu-validation.json"
    assert experiment.scored_candidates(path, protocol, "rows-a") == []  # no earlier run

    unknown = {"targets": ["q_proj"], "lr": 1.0, "epochs": 9, "r": 2}
    scored = [{"recipe": protocol["candidates"][0], "rougeL": 0.2}, {"recipe": unknown}]
    experiment.write_search(path, protocol, scored, "cmd", "rows-a")
    assert [v["recipe"] for v in experiment.scored_candidates(path, protocol, "rows-a")] == [
        protocol["candidates"][0]
    ]
    # the same file read with other training rows, or other row counts: nothing carries over
    assert experiment.scored_candidates(path, protocol, "rows-b") == []
    other = {**protocol, "validation": 100}
    assert experiment.scored_candidates(path, other, "rows-a") == []
