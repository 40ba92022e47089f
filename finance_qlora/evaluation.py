"""The evaluation protocol, one function for both models: same prompts, greedy decoding,
same token budget, answers cut at EOS or the next '### ' section, ROUGE-1/2/L/Lsum through
🤗 evaluate (the project's local module, rouge_score inside), and any other evaluate metric
named in evaluation.metrics.

predictions.parquet keeps, beside each scored `prediction`, the `raw_prediction` (everything
generated up to the end-of-turn token, before the cut at '### ') and `new_tokens` (how many
tokens that was; equal to max_new_tokens when the answer hit the limit)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from finance_qlora.config import EvaluationSettings, GenerationSettings, ModelConfig
from finance_qlora.errors import ConfigError
from finance_qlora.files import atomic_dir, fingerprint, read_jsonl
from finance_qlora.generation import Generated, generate_shard
from finance_qlora.modeling import loaded
from finance_qlora.parallel import generate_sharded
from finance_qlora.prompts import cut_answer, fit_prompts, prompt_length
from finance_qlora.records import EvalRecord
from finance_qlora.rouge import mean_scores, score_pairs
from finance_qlora.schedule import generation_batches, generation_batches_words

log = logging.getLogger(__name__)


def load_metric(name: str):
    """A metric module from the Hugging Face Hub (or a local path), by name, for
    evaluation.metrics; one ConfigError line when it cannot be loaded."""
    import evaluate
    from datasets import DownloadConfig
    from huggingface_hub import constants

    # evaluate has its own offline switch; HF_HUB_OFFLINE means the same: cached modules only.
    offline = constants.HF_HUB_OFFLINE or evaluate.config.HF_EVALUATE_OFFLINE
    try:
        return evaluate.load(
            name,
            keep_in_memory=True,
            download_config=DownloadConfig(local_files_only=offline),
        )
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        hub = "offline (HF_HUB_OFFLINE)" if offline else "online"
        raise ConfigError(
            f"evaluation.metrics: cannot load {name!r} with evaluate.load ({reason}); the hub is "
            f"{hub}: name a metric it can reach, or keep only 'rouge'"
        ) from None


def fitting_rows(
    rows: list[dict[str, str]],
    model_cfg: ModelConfig,
    generation: GenerationSettings,
    token: str | None = None,
) -> list[dict[str, str]]:
    """The test rows whose prompt leaves room for max_new_tokens in the model's context; the
    others are left out with a warning that counts them (`prompts.fit_prompts`)."""
    from finance_qlora.modeling import load_tokenizer, model_context

    context = model_context(model_cfg, token)
    if context is None:
        return rows
    limit = context - generation.max_new_tokens
    length = prompt_length(load_tokenizer(model_cfg, token))
    kept, dropped = fit_prompts([r["prompt"] for r in rows], length, limit)
    if dropped:
        log.warning(
            "%d of %d test prompts take more than %d tokens (the context of %s, %d, minus "
            "generation.max_new_tokens=%d): left out of this evaluation",
            dropped,
            len(rows),
            limit,
            model_cfg.name,
            context,
            generation.max_new_tokens,
        )
    if not kept:
        raise ConfigError(
            f"generation.max_new_tokens: {generation.max_new_tokens} new tokens leave no room "
            f"for any test prompt in the context of {model_cfg.name} ({context} tokens); lower it"
        )
    return [rows[i] for i in kept]


def _plain(value: Any) -> Any:
    """numpy scalars and arrays in a metric's result, as JSON."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def generate_all(
    prompts: list[str],
    model_cfg: ModelConfig,
    generation: GenerationSettings,
    work_dir: Path,
    processes: int = 1,
    adapter_dir: Path | None = None,
    token: str | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[list[Generated], bool | None]:
    """Every prompt's answer, uncut, in order: in this process, or with `processes` > 1 dealt
    out over that many GPUs (`parallel.generate_sharded`; `work_dir` holds their files). Also
    whether the base ran on dequantized weights (None: not known from a sharded run)."""
    useful = max(generation_batches(len(prompts), generation), 1)
    if processes > useful:
        # batch k goes to process k mod N: a process past the last batch would only start and
        # load the model (on 2 H200s, 300 prompts in one batch took 25-28 s against 9-18 s)
        log.info(
            "%s: generating on as many of %d processes",
            generation_batches_words(useful, generation),
            processes,
        )
        processes = useful
    if processes > 1:
        generated = generate_sharded(
            prompts, model_cfg, generation, work_dir, processes, adapter_dir, token, on_progress
        )
        return generated, None
    ahead = generation.decode_kernel == "triton"
    loading = loaded(model_cfg, token, adapter_dir, generation.dequantize, ahead)
    with loading as (model, tokenizer):
        dequantized = model_cfg.load_in_4bit and not any(
            type(m).__name__ == "Linear4bit" for m in model.modules()
        )
        answers = generate_shard(model, tokenizer, prompts, generation, 0, 1, on_progress)
    return [answers[i] for i in range(len(prompts))], dequantized


def evaluate_model(
    prompts_path: Path,
    model_cfg: ModelConfig,
    generation: GenerationSettings,
    out_dir: Path,
    label: str,
    adapter_dir: Path | None = None,
    token: str | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    evaluation: EvaluationSettings | None = None,
    processes: int = 1,
) -> EvalRecord:
    """Generate an answer for every test prompt, score it, and save per-example predictions;
    every metric of `evaluation.metrics` goes to metrics.json. With `processes` > 1 the
    batches are dealt out over that many GPUs (`parallel.generate_sharded`), each holding the
    prompts it holds in a one-process run."""
    names = (evaluation or EvaluationSettings()).metrics
    # before any answer is generated: a bad name costs no GPU time
    others = {name: load_metric(name) for name in dict.fromkeys(names) if name != "rouge"}
    rows = fitting_rows(read_jsonl(prompts_path), model_cfg, generation, token)
    prompts = [r["prompt"] for r in rows]
    references = [r["completion"] for r in rows]
    work = out_dir.with_name(out_dir.name + ".shards")
    generated, dequantized = generate_all(
        prompts, model_cfg, generation, work, processes, adapter_dir, token, on_progress
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
    rouge = mean_scores(per_example)
    results: dict[str, Any] = {"rouge": rouge}
    for name, metric in others.items():
        try:
            results[name] = metric.compute(predictions=predictions, references=references)
        except Exception as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(
                f"evaluation.metrics: {name!r} cannot score text answers against text "
                f"references ({reason}); remove it"
            ) from None
    with atomic_dir(out_dir) as tmp:
        table.to_parquet(tmp / "predictions.parquet", index=False)
        table.to_csv(tmp / "predictions.csv", index=False)
        (tmp / "metrics.json").write_text(json.dumps(results, indent=2, default=_plain))
    return EvalRecord(
        label=label,
        rows=len(rows),
        rouge=rouge,
        max_new_tokens=generation.max_new_tokens,
        runtime={"dequantized": dequantized},
        folder=out_dir,
        fingerprint=fingerprint(out_dir),
    )
