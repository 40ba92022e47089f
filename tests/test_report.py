"""The comparison report's answer statistics, on hand-made predictions."""

from __future__ import annotations

import json

import pandas as pd

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
