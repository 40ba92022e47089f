"""The answer flow on `tiny-cpu`: the champion's answers are the final evaluation's answers for
the same prompts, keyed and cached like the other steps; every bad input is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from finance_qlora.files import read_jsonl
from flows.answer import answer_flow, main
from flows.finetune import finetune

pytestmark = pytest.mark.slow

# Random weights trained gently: the adapter changes the answers, and they still vary
TRAIN = {"train": {"learning_rate": 3e-4, "epochs": 1}}


def evaluation(summary: dict, label: str) -> pd.DataFrame:
    """One model's answers in the run's comparison report (by label: random weights can give
    both models the same scores, so the scores do not tell the evaluations apart)."""
    examples = pd.read_parquet(Path(summary["report"]).parent / "examples.parquet")
    columns = {f"{label}_{c}": c for c in ("prediction", "raw_prediction", "new_tokens")}
    return examples[list(columns)].rename(columns=columns)


@pytest.fixture(scope="module")
def trained(prefect_api, tmp_path_factory):
    store = tmp_path_factory.mktemp("answer-store")
    summary = finetune(preset="tiny-cpu", overrides={"output_dir": str(store), **TRAIN})
    (test_split,) = store.glob("data/*/test.jsonl")  # the rows behind the test prompts
    return store, summary, test_split


def answers_of(result: dict) -> list[dict]:
    return read_jsonl(Path(result["answers"]) / "answers.jsonl")


def test_the_champion_answers_as_the_final_evaluation_did(trained):
    store, summary, test_split = trained
    result = answer_flow(questions=str(test_split), output_dir=str(store))
    assert result["adapter"] == summary["champion"] == summary["adapter"]
    answers = answers_of(result)
    finetuned = evaluation(summary, "finetuned")
    pretrained = evaluation(summary, "pretrained")
    assert [a["answer"] for a in answers] == finetuned["prediction"].tolist()
    assert [a["raw_answer"] for a in answers] == finetuned["raw_prediction"].tolist()
    assert [a["new_tokens"] for a in answers] == finetuned["new_tokens"].tolist()
    # the adapter is what answered: without it the answers are the pretrained model's
    assert finetuned["prediction"].tolist() != pretrained["prediction"].tolist()
    # beside the questions' ids (row numbers when the file has none), in both formats
    assert [a["id"] for a in answers] == list(range(1, len(finetuned) + 1))
    table = pd.read_parquet(Path(result["answers"]) / "answers.parquet")
    assert table.to_dict(orient="records") == answers
    made_by = json.loads((Path(result["answers"]) / "answering.json").read_text())
    assert made_by["adapter"] == summary["champion"]
    assert made_by["generation"]["do_sample"] is False
    assert Path(result["answers"]).parent == store / "answers"


def test_a_named_adapter_with_the_same_decoding_is_served_from_the_cache(trained):
    store, summary, test_split = trained
    first = answer_flow(questions=str(test_split), output_dir=str(store))
    again = answer_flow(
        questions=str(test_split), adapter=summary["adapter"], output_dir=str(store)
    )
    assert again["cached"] and again["answers"] == first["answers"]


def test_answers_from_two_processes_are_the_answers_of_one(trained, tmp_path):
    store, summary, test_split = trained
    ids = tmp_path / "questions.csv"  # with ids of their own, as CSV
    rows = [{"id": f"q{i}", **r} for i, r in enumerate(read_jsonl(test_split))]
    pd.DataFrame(rows).to_csv(ids, index=False)
    # dequantize=never is what "auto" does on the CPU: the same answers, a new key
    result = answer_flow(
        questions=str(ids),
        output_dir=str(store),
        generation={"dequantize": "never"},
        devices={"cpu_processes": 2},
    )
    assert not result["cached"]
    answers = answers_of(result)
    assert [a["id"] for a in answers] == [r["id"] for r in rows]
    finetuned = evaluation(summary, "finetuned")
    assert [a["answer"] for a in answers] == finetuned["prediction"].tolist()


def test_sampling_is_allowed_and_recorded(trained):
    store, _, test_split = trained
    greedy = answers_of(answer_flow(questions=str(test_split), output_dir=str(store)))
    sampling = {"do_sample": True, "temperature": 1.5, "seed": 7}
    result = answer_flow(questions=str(test_split), output_dir=str(store), generation=sampling)
    made_by = json.loads((Path(result["answers"]) / "answering.json").read_text())
    assert {k: made_by["generation"][k] for k in sampling} == sampling
    assert [a["answer"] for a in answers_of(result)] != [a["answer"] for a in greedy]


def _lines(path: Path, *lines: str) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


BAD = [
    ("empty file", lambda t: _lines(t / "q.jsonl"), "is empty"),
    (
        "malformed file",
        lambda t: _lines(t / "q.jsonl", '{"instruction": "What is a bond?"}', '{"instr'),
        "malformed jsonl (line 2",
    ),
    (
        "no instruction",
        lambda t: _lines(t / "q.jsonl", '{"question": "What is a bond?"}'),
        "row 1 has no 'instruction'",
    ),
    (
        "longer than the context",
        lambda t: _lines(t / "q.jsonl", json.dumps({"instruction": "bond " * 600})),
        "exceeds the model's context of 512 tokens",
    ),
    ("missing file", lambda t: str(t / "nope.jsonl"), "nope.jsonl does not exist"),
]


def _tree(store: Path) -> list[str]:
    return sorted(str(p.relative_to(store)) for p in store.rglob("*") if ".staging" not in str(p))


@pytest.mark.parametrize("case, questions, message", BAD, ids=[c[0] for c in BAD])
def test_bad_questions_are_one_line_and_write_nothing(
    trained, tmp_path, capsys, case, questions, message
):
    store = trained[0]
    before = _tree(store)
    code = main(["--questions", questions(tmp_path), "--output-dir", str(store)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: questions:"), err
    assert message in err[0]
    assert _tree(store) == before


def test_no_champion_yet_is_one_line(prefect_api, tmp_path, capsys):
    store = tmp_path / "empty-store"
    questions = _lines(tmp_path / "q.jsonl", '{"instruction": "What is a bond?"}')
    assert main(["--questions", questions, "--output-dir", str(store)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: adapter: no champion yet in {store}; run python -m flows.finetune on this "
        "store until one is promoted, or pass --adapter <adapter folder URL>"
    ]
    assert not store.exists() or not any(store.rglob("*.jsonl"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--adapter", "/nowhere/adapters/x"], "adapter: /nowhere/adapters/x is not a complete"),
        (["--set", "generation.temperature=0"], "generation.temperature: Input should be"),
    ],
)
def test_bad_adapter_or_decoding_is_one_line(trained, tmp_path, capsys, args, message):
    store, _, test_split = trained
    before = _tree(store)
    assert main(["--questions", str(test_split), "--output-dir", str(store), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {message}"), err
    assert _tree(store) == before


def test_the_gpu_script_finds_the_run_and_compares_every_answer(trained, tmp_path):
    """experiments/answer_smollm2.py on the tiny run: what the lead runs on the GPU."""
    import runpy

    store, summary, _ = trained
    script = runpy.run_path(str(Path(__file__).parents[1] / "experiments" / "answer_smollm2.py"))
    out = tmp_path / "answer.json"
    assert script["main"](["--store", str(store), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = len(evaluation(summary, "finetuned"))
    assert report["questions"] == report["n_identical"] == report["n_raw_identical"] == rows
    assert report["adapter"] == summary["adapter"] and report["seconds"] > 0
    assert {"machine", "date", "command"} <= set(report)


def test_a_decoding_recorded_before_the_deterministic_setting_is_replayed_without_it():
    from finance_qlora.answering import Gated, decoding_of

    old = Gated.model_construct(generation={"max_new_tokens": 128, "batch_size": 64})
    assert decoding_of(old, None).deterministic is False  # as that evaluation generated
    assert decoding_of(old, {"deterministic": True}).deterministic is True
    assert decoding_of(Gated.model_construct(generation={}), None).deterministic is True
