"""Answers on demand from a trained adapter (the champion by default).

Questions (JSONL, JSON, CSV or Parquet rows with `instruction`, optional `input` and `id`) go
through the training template and the evaluation's own generation (`evaluation.generate_all`)
with the decoding the gate scored the adapter with, so an answer here is the answer the gate
measured for the same prompt.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finance_qlora.config import GenerationSettings, ModelConfig
from finance_qlora.data import file_bytes, file_suffix, is_store_url, local_path, parse_rows
from finance_qlora.errors import ConfigError, DataError
from finance_qlora.evaluation import generate_all
from finance_qlora.files import atomic_dir, fingerprint, read_jsonl, write_jsonl
from finance_qlora.prompts import build_prompt, cut_answer, template_digest
from finance_qlora.records import AdapterRecord, AnswerRecord, QuestionRecord
from finance_qlora.registry import decisions, read_champion
from finance_qlora.store import Store, manifest_digest, normalize_url

CHAMPION = "champion"


class Gated(AdapterRecord):
    """An adapter with what the gate recorded for it: the decoding it was scored with and its
    scores (empty for an adapter that never went through the gate)."""

    generation: dict[str, Any] = {}
    scores: dict[str, float] = {}


def resolve_adapter(store: Store, name: str) -> Gated:
    """`champion` (the registry's) or an adapter folder's URL in the store."""
    if name == CHAMPION:
        champion = read_champion(store)
        if champion is None:
            raise ConfigError(
                f"adapter: no champion yet in {store.url}; run python -m flows.finetune on this "
                "store until one is promoted, or pass --adapter <adapter folder URL>"
            )
        return Gated(
            **champion.adapter.model_dump(),
            generation=champion.protocol.generation,
            scores=champion.rouge,
        )
    try:
        url = normalize_url(name)
        files = store.manifest(url)
    except (ConfigError, ValueError):
        files, url = None, name
    if files is None or "adapter_model.safetensors" not in files:
        raise ConfigError(
            f"adapter: {name} is not a complete adapter folder in the store {store.url}; pass "
            "'champion' or the URL of a folder under <store>/adapters/"
        )
    gated = [d for d in decisions(store) if d.candidate_adapter == url]
    last = gated[-1] if gated else None
    return Gated(
        folder=url,
        fingerprint=manifest_digest(files),
        generation=last.protocol.generation if last else {},
        scores={last.metric: last.candidate} if last else {},
    )


def adapter_settings(adapter_dir: Path) -> dict[str, Any]:
    """What made the adapter (model, LoRA, training, data version): its training_settings.json."""
    path = Path(adapter_dir) / "training_settings.json"
    try:
        settings = json.loads(path.read_text())
        ModelConfig.model_validate(settings["model"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(
            f"adapter: {adapter_dir} has no readable training_settings.json naming its base "
            "model; use an adapter folder the finetune flow saved"
        ) from None
    return settings


def adapter_model(adapter_dir: Path) -> ModelConfig:
    return ModelConfig.model_validate(adapter_settings(adapter_dir)["model"])


def decoding_of(gated: Gated, overrides: dict[str, Any] | None) -> GenerationSettings:
    """The gate's decoding for this adapter (defaults without one), with `overrides` applied."""
    from pydantic import ValidationError

    from finance_qlora.errors import describe_validation_error

    recorded = dict(gated.generation)
    if recorded:  # recorded before generation.deterministic existed: generated without it
        recorded.setdefault("deterministic", False)
    try:
        return GenerationSettings.model_validate({**recorded, **(overrides or {})})
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, "generation.")) from None


def read_questions(source: str, options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The checked questions of a local file or a file on the store: id, instruction, input."""
    try:
        if local_path(source) is None and not is_store_url(source):
            raise DataError(f"{source} does not exist; pass a JSONL, CSV or Parquet file")
        rows = parse_rows(file_bytes(source, options), file_suffix(source), source)
    except DataError as exc:
        raise DataError(f"questions: {exc}") from None
    return check_questions(rows, source)


def check_questions(rows: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    if not rows:
        raise DataError(f"questions: {source} has no rows; give one question per row")
    checked, ids = [], set()
    for number, row in enumerate(rows, start=1):
        if "instruction" not in row:
            raise DataError(
                f"questions: {source} row {number} has no 'instruction'; every row needs one "
                "(and optionally 'input' and 'id')"
            )
        question = {"id": row.get("id", number), "instruction": row["instruction"]}
        question["input"] = row.get("input") or ""
        for field in ("instruction", "input"):
            if not isinstance(question[field], str):
                raise DataError(
                    f"questions: {source} row {number} field {field!r} is "
                    f"{type(question[field]).__name__}, not text; fix that row"
                )
        if not question["instruction"].strip():
            raise DataError(f"questions: {source} row {number} has an empty 'instruction'")
        if hasattr(question["id"], "item"):  # a numpy number from a table
            question["id"] = question["id"].item()
        if not isinstance(question["id"], int | str) or question["id"] in ids:
            raise DataError(
                f"questions: {source} row {number} has a duplicate or unusable 'id' "
                f"{question['id']!r}; ids are unique numbers or text"
            )
        ids.add(question["id"])
        checked.append(question)
    if len({type(q["id"]) for q in checked}) > 1:  # one column type in the Parquet file
        for question in checked:
            question["id"] = str(question["id"])
    return checked


def check_fit(
    questions: list[dict[str, Any]],
    tokenizer,
    context: int | None,
    max_new_tokens: int,
    source: str,
) -> None:
    """Every prompt with its answer's token budget fits the model's context."""
    if context is None:
        return
    for question in questions:
        prompt = build_prompt(question["instruction"], question["input"])
        tokens = len(tokenizer(prompt)["input_ids"])
        if tokens + max_new_tokens > context:
            raise DataError(
                f"questions: {source} question {question['id']!r} takes {tokens} tokens in the "
                f"template, and with generation.max_new_tokens={max_new_tokens} exceeds the "
                f"model's context of {context} tokens; shorten it or lower max_new_tokens"
            )


def write_questions(questions: list[dict[str, Any]], out_dir: Path, source: str) -> QuestionRecord:
    with atomic_dir(out_dir) as tmp:
        write_jsonl(tmp / "questions.jsonl", questions)
    return QuestionRecord(
        folder=out_dir, fingerprint=fingerprint(out_dir), rows=len(questions), source=source
    )


def answer_questions(
    questions_path: Path,
    model_cfg: ModelConfig,
    generation: GenerationSettings,
    out_dir: Path,
    adapter: AdapterRecord,
    adapter_dir: Path,
    token: str | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    processes: int = 1,
) -> AnswerRecord:
    """Answer every question; answers.jsonl and answers.parquet beside the ids, and
    answering.json with the adapter and the decoding that made them."""
    import pandas as pd

    questions = read_jsonl(questions_path)
    prompts = [build_prompt(q["instruction"], q["input"]) for q in questions]
    work = out_dir.with_name(out_dir.name + ".shards")
    generated, _ = generate_all(
        prompts, model_cfg, generation, work, processes, adapter_dir, token, on_progress
    )
    rows = [
        {**q, "answer": cut_answer(g.text), "raw_answer": g.text, "new_tokens": g.new_tokens}
        for q, g in zip(questions, generated, strict=True)
    ]
    made_by = {
        "adapter": adapter.folder,
        "adapter_fingerprint": adapter.fingerprint,
        "model": model_cfg.model_dump(mode="json", exclude={"hf_token_secret"}),
        "generation": generation.model_dump(mode="json"),
        "template": template_digest(),
    }
    with atomic_dir(out_dir) as tmp:
        write_jsonl(tmp / "answers.jsonl", rows)
        pd.DataFrame(rows).to_parquet(tmp / "answers.parquet", index=False)
        (tmp / "answering.json").write_text(json.dumps(made_by, indent=2))
    return AnswerRecord(
        folder=out_dir, fingerprint=fingerprint(out_dir), rows=len(rows), adapter=adapter.folder
    )
