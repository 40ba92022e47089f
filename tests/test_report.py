"""The comparison report's answer statistics, on hand-made predictions."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from finance_qlora.config import BootstrapSettings
from finance_qlora.files import fingerprint
from finance_qlora.prompts import cut_answer
from finance_qlora.records import EvalRecord
from finance_qlora.report import compare
from finance_qlora.rouge import METRICS

LOOP = " ".join(["it is a loan"] * 3)  # the 4-gram "it is a loan" three times


def _record(folder, label: str, raw: list[str], new_tokens: list[int], limit: int) -> EvalRecord:
    folder.mkdir()
    table = pd.DataFrame(
        {
            "prompt": ["Q1", "Q2"],
            "reference": ["one two three four five six", "one two"],
            "prediction": [cut_answer(t) for t in raw],
            "raw_prediction": raw,
            "new_tokens": new_tokens,
            **{m: [0.5, 0.5] for m in METRICS},
        }
    )
    table.to_parquet(folder / "predictions.parquet", index=False)
    return EvalRecord(
        label=label,
        rows=2,
        rouge={m: 0.5 for m in METRICS},
        max_new_tokens=limit,
        folder=folder,
        fingerprint=fingerprint(folder),
    )


def test_loops_limits_and_lengths_for_both_models(tmp_path):
    # pretrained: its loop comes after a new '### ' section, where the cut would hide it
    pretrained = _record(
        tmp_path / "a",
        "pretrained",
        ["A bond.\n### Instruction:\n" + LOOP, "Yes it is."],
        [8, 3],
        8,
    )
    finetuned = _record(tmp_path / "b", "finetuned", ["One two three.", LOOP], [4, 8], 8)
    record = compare(pretrained, finetuned, BootstrapSettings(resamples=10), tmp_path / "r")
    summary = json.loads(record.json_path.read_text())
    stats = summary["answer_stats"]
    assert record.loop_share == summary["loop_share"] == {"pretrained": 0.5, "finetuned": 0.5}
    assert stats["pretrained"]["hit_max_new_tokens_share"] == 0.5  # 8 of 8 tokens, then 3
    assert stats["finetuned"]["hit_max_new_tokens_share"] == 0.5
    assert stats["pretrained"]["words"] == {"mean": 2.5, "median": 2.5}  # "A bond.", "Yes it is."
    assert stats["finetuned"]["words"] == {"mean": 7.5, "median": 7.5}  # 3 and 12 words
    assert stats["reference"]["words"] == {"mean": 4.0, "median": 4.0}
    assert "| with a repeated 4-gram loop (uncut text) | 50.0% | 50.0% | |" in record.markdown
    assert "| that hit max_new_tokens (8) | 50.0% | 50.0% | |" in record.markdown
    assert (
        "| length in words, mean / median | 2.5 / 2.5 | 7.5 / 7.5 | 4.0 / 4.0 |" in record.markdown
    )
    examples = pd.read_parquet(record.path / "examples.parquet")
    assert examples["pretrained_new_tokens"].tolist() == [8, 3]
    assert examples["finetuned_raw_prediction"].tolist() == ["One two three.", LOOP]


GOLDEN = """\
## Pretrained vs fine-tuned ROUGE (4 test rows)

Mean F1 with 90% paired-bootstrap intervals (200 resamples, seed 3).

| metric | pretrained | fine-tuned | delta |
|---|---|---|---|
| ROUGE-1 | 0.1000 [0.0500, 0.1500] | 0.3000 [0.2000, 0.4000] | +0.2000 [+0.1000, +0.3000] |
| ROUGE-2 | 0.0400 [0.0000, 0.0800] | 0.0200 [0.0100, 0.0300] | -0.0200 [-0.0500, +0.0100] |
| ROUGE-L | 0.1000 [0.0500, 0.1500] | 0.2500 [0.2000, 0.3000] | +0.1500 [+0.1000, +0.2000] |
| ROUGE-Lsum | 0.1100 [0.0600, 0.1600] | 0.2600 [0.2100, 0.3100] | +0.1500 [+0.1000, +0.2000] |

| answers | pretrained | fine-tuned | reference |
|---|---|---|---|
| with a repeated 4-gram loop (uncut text) | 25.0% | 0.0% | |
| that hit max_new_tokens (8, 16) | 50.0% | 12.5% | |
| length in words, mean / median | 2.2 / 1.5 | 3.0 / 3.0 | 12.5 / 3.5 |

### Largest ROUGE-L gains

| prompt | reference | pretrained | fine-tuned | delta |
|---|---|---|---|---|
| What is a bond? ### Response: | A bond is a loan. | no | A bond is a loan. | +0.500 |
| Q3 | {long} | x | word | +0.125 |

### Largest ROUGE-L losses

| prompt | reference | pretrained | fine-tuned | delta |
|---|---|---|---|---|
| What \\| is a stock? | A share. | A share of a company. | no | -0.250 |
| Q4 | R4 | R4 | R4 | +0.000 |
"""


def test_the_report_reads_exactly_so():
    """The whole Markdown report from hand-made intervals and rows: the 90% level, signs on
    the deltas only, both token limits, the largest gains first and the largest losses
    first, the prompt shown from its instruction, cells on one line with `|` escaped and cut
    at 160 characters."""
    from finance_qlora.bootstrap import Interval, PairedInterval
    from finance_qlora.report import _markdown

    def interval(mean: float, low: float, high: float) -> Interval:
        return Interval(mean=mean, low=low, high=high)

    def paired(a: tuple, b: tuple, d: tuple) -> PairedInterval:
        return PairedInterval(pretrained=interval(*a), finetuned=interval(*b), delta=interval(*d))

    rouge = {
        "rouge1": paired((0.1, 0.05, 0.15), (0.3, 0.2, 0.4), (0.2, 0.1, 0.3)),
        "rouge2": paired((0.04, 0.0, 0.08), (0.02, 0.01, 0.03), (-0.02, -0.05, 0.01)),
        "rougeL": paired((0.1, 0.05, 0.15), (0.25, 0.2, 0.3), (0.15, 0.1, 0.2)),
        "rougeLsum": paired((0.11, 0.06, 0.16), (0.26, 0.21, 0.31), (0.15, 0.1, 0.2)),
    }
    table = pd.DataFrame(
        {
            "prompt": [
                "Header\n### Instruction:\nWhat is a bond?\n\n### Response:\n",
                "### Instruction:\nWhat | is a stock?",
                "### Instruction:\nQ3",
                "### Instruction:\nQ4",
            ],
            "reference": ["A bond is a loan.", "A share.", "word " * 40, "R4"],
            "pretrained_prediction": ["no", "A share of a company.", "x", "R4"],
            "finetuned_prediction": ["A bond is a loan.", "no", "word", "R4"],
            "delta_rougeL": [0.5, -0.25, 0.125, 0.0],
        }
    )
    stats = {
        "pretrained": {
            "loop_share": 0.25,
            "hit_max_new_tokens_share": 0.5,
            "max_new_tokens": 8,
            "words": {"mean": 2.25, "median": 1.5},
        },
        "finetuned": {
            "loop_share": 0.0,
            "hit_max_new_tokens_share": 0.125,
            "max_new_tokens": 16,
            "words": {"mean": 3.0, "median": 3.0},
        },
        "reference": {"words": {"mean": 12.5, "median": 3.5}},
    }
    settings = BootstrapSettings(resamples=200, confidence=0.9, seed=3)
    long = " ".join(["word"] * 32) + "…"  # 199 characters cut to 159 and an ellipsis
    assert len(long) == 160
    assert _markdown(rouge, table, stats, settings, examples=2) == GOLDEN.format(long=long)


def test_cells_are_one_line_escaped_and_cut_at_160_characters():
    from finance_qlora.report import _cell

    assert _cell("a\n  b|c") == "a b\\|c"
    assert _cell("x" * 160) == "x" * 160
    assert _cell("x" * 161) == "x" * 159 + "…"


def test_a_loop_is_an_ngram_three_times():
    from finance_qlora.report import has_loop

    assert has_loop("a b c d " * 3)
    assert not has_loop("a b c d " * 2)
    assert not has_loop("one two three four five six seven eight nine ten")  # none repeats


def _scored(folder, label: str, scores: list[float], limit: int = 8) -> EvalRecord:
    folder.mkdir()
    n = len(scores)
    pd.DataFrame(
        {
            "prompt": [f"### Instruction:\nQ{i}" for i in range(n)],
            "reference": [f"reference {i}" for i in range(n)],
            "prediction": [f"{label} {i}" for i in range(n)],
            "raw_prediction": [f"{label} {i}" for i in range(n)],
            "new_tokens": [2] * n,
            **{m: scores for m in METRICS},
        }
    ).to_parquet(folder / "predictions.parquet", index=False)
    return EvalRecord(
        label=label,
        rows=n,
        rouge={m: sum(scores) / n for m in METRICS},
        max_new_tokens=limit,
        folder=folder,
        fingerprint=fingerprint(folder),
    )


def test_compare_uses_the_bootstrap_settings_and_writes_every_file(tmp_path):
    from finance_qlora.bootstrap import paired_bootstrap

    before = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    after = [0.2, 0.1, 0.5, 0.4, 0.9, 0.6, 0.6, 1.0]
    pretrained = _scored(tmp_path / "a", "pretrained", before)
    finetuned = _scored(tmp_path / "b", "finetuned", after, limit=16)
    settings = BootstrapSettings(resamples=50, confidence=0.8, seed=5)
    record = compare(pretrained, finetuned, settings, tmp_path / "r")
    expected = paired_bootstrap(before, after, 50, 0.8, 5)
    assert all(record.rouge[m] == expected for m in METRICS)

    text = (record.path / "comparison.json").read_text()
    assert text.startswith('{\n  "test_rows": 8,\n')  # indented: read by people too
    summary = json.loads(text)
    assert set(summary) == {
        "test_rows",
        "max_new_tokens",
        "bootstrap",
        "loop_share",
        "answer_stats",
        "rouge",
    }
    assert summary["max_new_tokens"] == 16
    assert summary["bootstrap"] == settings.model_dump()
    assert summary["rouge"] == {m: expected.model_dump() for m in METRICS}
    assert (record.path / "comparison.md").read_text() == record.markdown

    import pyarrow.parquet as pq

    examples = pd.read_csv(record.path / "examples.csv")
    columns = pq.read_schema(record.path / "examples.parquet").names  # as any reader sees it
    assert (
        list(examples.columns) == columns == list(pd.read_parquet(record.path / "examples.parquet"))
    )
    deltas = [a - b for a, b in zip(after, before, strict=True)]
    assert examples["delta_rougeL"].tolist() == pytest.approx(deltas)
    assert examples["finetuned_rouge1"].tolist() == after
    gains = record.markdown.split("### Largest ROUGE-L gains")[1].split("###")[0]
    assert len([line for line in gains.splitlines() if line.startswith("| Q")]) == 3  # default


def test_evaluations_of_other_prompts_are_not_compared(tmp_path):
    pretrained = _scored(tmp_path / "a", "pretrained", [0.1, 0.2])
    other = tmp_path / "b"
    finetuned = _scored(other, "finetuned", [0.1, 0.2])
    table = pd.read_parquet(other / "predictions.parquet")
    table["prompt"] = table["prompt"][::-1].tolist()
    table.to_parquet(other / "predictions.parquet", index=False)
    message = "^the two evaluations did not use the same prompts in the same order$"
    with pytest.raises(ValueError, match=message):
        compare(pretrained, finetuned, BootstrapSettings(resamples=10), tmp_path / "r")
