"""Pretrained vs fine-tuned: the ROUGE table with paired-bootstrap intervals, answer statistics
for both models (loops on the uncut text, answers that hit the token limit, lengths), and
examples."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path

import pandas as pd

from finance_qlora.bootstrap import Interval, PairedInterval, paired_bootstrap
from finance_qlora.config import BootstrapSettings
from finance_qlora.files import atomic_dir, fingerprint
from finance_qlora.records import ComparisonRecord, EvalRecord
from finance_qlora.rouge import METRICS

LABELS = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum"}


def has_loop(text: str, n: int = 4, repeats: int = 3) -> bool:
    """True when some word n-gram occurs `repeats` times or more: a degenerate answer."""
    words = text.split()
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return any(count >= repeats for count in grams.values())


def paired_examples(pretrained: EvalRecord, finetuned: EvalRecord) -> pd.DataFrame:
    before = pd.read_parquet(pretrained.predictions_parquet)
    after = pd.read_parquet(finetuned.predictions_parquet)
    if not before["prompt"].equals(after["prompt"]):
        raise ValueError("the two evaluations did not use the same prompts in the same order")
    table = before[["prompt", "reference"]].copy()
    for label, frame in (("pretrained", before), ("finetuned", after)):
        for column in ("prediction", "raw_prediction", "new_tokens"):
            table[f"{label}_{column}"] = frame[column]
        for metric in METRICS:
            table[f"{label}_{metric}"] = frame[metric]
    for metric in METRICS:
        table[f"delta_{metric}"] = table[f"finetuned_{metric}"] - table[f"pretrained_{metric}"]
    return table


def _words(texts: pd.Series) -> dict[str, float]:
    counts = [len(str(t).split()) for t in texts]
    return {"mean": statistics.fmean(counts), "median": float(statistics.median(counts))}


def answer_stats(table: pd.DataFrame, max_new_tokens: dict[str, int]) -> dict[str, dict]:
    """The same statistics for both models. Loops are counted on the raw text (the cut at the
    next '### ' section would hide the loops of a model that starts new sections); an answer
    that never produced an end-of-turn token hit max_new_tokens; lengths in words of the scored
    (cut) answers, beside the references'."""
    stats: dict[str, dict] = {}
    for label, limit in max_new_tokens.items():
        stats[label] = {
            "loop_share": float(table[f"{label}_raw_prediction"].map(has_loop).mean()),
            "hit_max_new_tokens_share": float((table[f"{label}_new_tokens"] >= limit).mean()),
            "max_new_tokens": limit,
            "words": _words(table[f"{label}_prediction"]),
        }
    stats["reference"] = {"words": _words(table["reference"])}
    return stats


def rouge_table(rouge: dict[str, PairedInterval]) -> list[dict[str, str]]:
    """Rows for the printed table and the Prefect table artifact."""

    def show(iv: Interval, sign: str = "") -> str:
        return f"{iv.mean:{sign}.4f} [{iv.low:{sign}.4f}, {iv.high:{sign}.4f}]"

    return [
        {
            "metric": LABELS[metric],
            "pretrained": show(iv.pretrained),
            "finetuned": show(iv.finetuned),
            "delta": show(iv.delta, "+"),
        }
        for metric, iv in rouge.items()
    ]


def _markdown(rouge, table: pd.DataFrame, stats: dict[str, dict], settings, examples: int) -> str:
    pct = round(settings.confidence * 100)
    lines = [
        f"## Pretrained vs fine-tuned ROUGE ({len(table)} test rows)",
        "",
        f"Mean F1 with {pct}% paired-bootstrap intervals ({settings.resamples} resamples, "
        f"seed {settings.seed}).",
        "",
        "| metric | pretrained | fine-tuned | delta |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['metric']} | {r['pretrained']} | {r['finetuned']} | {r['delta']} |"
        for r in rouge_table(rouge)
    ]
    before, after, reference = stats["pretrained"], stats["finetuned"], stats["reference"]

    def words(s: dict) -> str:
        return f"{s['words']['mean']:.1f} / {s['words']['median']:.1f}"

    limits = sorted({before["max_new_tokens"], after["max_new_tokens"]})
    lines += [
        "",
        "| answers | pretrained | fine-tuned | reference |",
        "|---|---|---|---|",
        f"| with a repeated 4-gram loop (uncut text) | {before['loop_share']:.1%} | "
        f"{after['loop_share']:.1%} | |",
        f"| that hit max_new_tokens ({', '.join(map(str, limits))}) | "
        f"{before['hit_max_new_tokens_share']:.1%} | {after['hit_max_new_tokens_share']:.1%} | |",
        f"| length in words, mean / median | {words(before)} | {words(after)} | "
        f"{words(reference)} |",
        "",
    ]
    ranked = table.sort_values("delta_rougeL", ascending=False)
    for title, part in (
        ("Largest ROUGE-L gains", ranked.head(examples)),
        ("Largest ROUGE-L losses", ranked.tail(examples)[::-1]),
    ):
        lines += [
            f"### {title}",
            "",
            "| prompt | reference | pretrained | fine-tuned | delta |",
            "|---|---|---|---|---|",
        ]
        for _, row in part.iterrows():
            cells = [
                _cell(row["prompt"].split("### Instruction:\n")[-1]),
                _cell(row["reference"]),
                _cell(row["pretrained_prediction"]),
                _cell(row["finetuned_prediction"]),
            ]
            lines.append(f"| {' | '.join(cells)} | {row['delta_rougeL']:+.3f} |")
        lines.append("")
    return "\n".join(lines)


def _cell(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def compare(
    pretrained: EvalRecord,
    finetuned: EvalRecord,
    settings: BootstrapSettings,
    out_dir: Path,
    examples: int = 3,
) -> ComparisonRecord:
    """Paired intervals per metric, saved as JSON, Markdown and per-example Parquet/CSV."""
    table = paired_examples(pretrained, finetuned)
    rouge = {
        metric: paired_bootstrap(
            table[f"pretrained_{metric}"].tolist(),
            table[f"finetuned_{metric}"].tolist(),
            settings.resamples,
            settings.confidence,
            settings.seed,
        )
        for metric in METRICS
    }
    limits = {"pretrained": pretrained.max_new_tokens, "finetuned": finetuned.max_new_tokens}
    stats = answer_stats(table, limits)
    loops = {label: stats[label]["loop_share"] for label in limits}
    markdown = _markdown(rouge, table, stats, settings, examples)
    summary = {
        "test_rows": len(table),
        "max_new_tokens": finetuned.max_new_tokens,
        "bootstrap": settings.model_dump(),
        "loop_share": loops,  # on the uncut text
        "answer_stats": stats,
        "rouge": {m: iv.model_dump() for m, iv in rouge.items()},
    }
    with atomic_dir(out_dir) as tmp:
        (tmp / "comparison.json").write_text(json.dumps(summary, indent=2))
        (tmp / "comparison.md").write_text(markdown)
        table.to_parquet(tmp / "examples.parquet", index=False)
        table.to_csv(tmp / "examples.csv", index=False)
    return ComparisonRecord(
        folder=out_dir,
        fingerprint=fingerprint(out_dir),
        rouge=rouge,
        loop_share=loops,
        markdown=markdown,
    )
