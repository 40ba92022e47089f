"""The evaluation protocol, one function for both models: same prompts, greedy decoding,
same token budget, answers cut at EOS or the next '### ' section, ROUGE from rouge_score.

predictions.parquet keeps, beside each scored `prediction`, the `raw_prediction` (everything
generated up to the end-of-turn token, before the cut at '### ') and `new_tokens` (how many
tokens that was; equal to max_new_tokens when the answer hit the limit)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from finance_qlora.config import GenerationSettings, ModelConfig
from finance_qlora.files import atomic_dir, fingerprint, read_jsonl
from finance_qlora.generation import generate_raw
from finance_qlora.modeling import loaded
from finance_qlora.prompts import cut_answer
from finance_qlora.records import EvalRecord
from finance_qlora.rouge import mean_scores, score_pairs


def evaluate_model(
    prompts_path: Path,
    model_cfg: ModelConfig,
    generation: GenerationSettings,
    out_dir: Path,
    label: str,
    adapter_dir: Path | None = None,
    token: str | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> EvalRecord:
    """Generate an answer for every test prompt, score it, and save per-example predictions."""
    rows = read_jsonl(prompts_path)
    prompts = [r["prompt"] for r in rows]
    references = [r["completion"] for r in rows]
    with loaded(model_cfg, token, adapter_dir, generation.dequantize) as (model, tokenizer):
        generated = generate_raw(
            model,
            tokenizer,
            prompts,
            generation.max_new_tokens,
            generation.batch_size,
            on_progress,
            generation.repetition_penalty,
            generation.no_repeat_ngram_size,
            generation.block_repeat_ngram,
        )
    predictions = [cut_answer(g.text) for g in generated]
    per_example = score_pairs(predictions, references)
    table = pd.DataFrame(
        {
            "prompt": prompts,
            "reference": references,
            "prediction": predictions,
            "raw_prediction": [g.text for g in generated],
            "new_tokens": [g.new_tokens for g in generated],
            **per_example,
        }
    )
    with atomic_dir(out_dir) as tmp:
        table.to_parquet(tmp / "predictions.parquet", index=False)
        table.to_csv(tmp / "predictions.csv", index=False)
    return EvalRecord(
        label=label,
        rows=len(rows),
        rouge=mean_scores(per_example),
        max_new_tokens=generation.max_new_tokens,
        folder=out_dir,
        fingerprint=fingerprint(out_dir),
    )
