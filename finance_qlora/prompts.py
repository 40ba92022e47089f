"""The Alpaca prompt template: one template for training, baseline eval and final eval."""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finance_qlora.files import atomic_dir, fingerprint, read_jsonl, write_jsonl
from finance_qlora.records import PromptRecord, SplitRecord

_HEADER_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
)
_HEADER_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
)
RESPONSE_MARKER = "### Response:\n"
# A model that keeps going after its answer usually starts a new "### " section.
SECTION_MARKER = "### "


def template_digest() -> str:
    """sha256 of the template's text: records and the champion's protocol name the template by
    what it says, so an edit is noticed without a version to bump."""
    text = "\x00".join((_HEADER_WITH_INPUT, _HEADER_NO_INPUT, build_prompt("{i}", "{x}")))
    return hashlib.sha256(text.encode()).hexdigest()


def build_prompt(instruction: str, input_text: str = "") -> str:
    """The prompt up to and including the response marker; the answer follows it."""
    instruction = instruction.strip()
    input_text = input_text.strip()
    if input_text:
        return (
            f"{_HEADER_WITH_INPUT}### Instruction:\n{instruction}\n\n"
            f"### Input:\n{input_text}\n\n{RESPONSE_MARKER}"
        )
    return f"{_HEADER_NO_INPUT}### Instruction:\n{instruction}\n\n{RESPONSE_MARKER}"


def to_prompt_completion(row: dict[str, Any]) -> dict[str, str]:
    """A Finance-Alpaca row as TRL's prompt/completion pair (TRL appends EOS to the completion)."""
    return {
        "prompt": build_prompt(row["instruction"], row.get("input") or ""),
        "completion": row["output"].strip(),
    }


def cut_answer(text: str) -> str:
    """The answer alone: generation stops at EOS; this also cuts at the next '### ' section."""
    head, _, _ = text.partition(SECTION_MARKER)
    return head.strip()


# A sentence ends at . ! or ? before whitespace, or at a line break.
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n+")


def sentence_ends(text: str) -> list[int]:
    """Where `text` can be cut, ascending: after each of its sentences but the last, spaces
    before the break left out. One pass over the text, no prefix copied."""
    text = text.rstrip()
    ends: list[int] = []
    previous_end, previous_cut = 0, 0
    for match in _SENTENCE_BREAK.finditer(text):
        # the cut is the end of the text before the break, trailing spaces dropped; when the
        # text between the previous break and this one is all spaces, it is the previous cut
        between = text[previous_end : match.start()]
        kept = len(between.rstrip())
        cut = previous_end + kept if kept else previous_cut
        if cut and (not ends or cut > ends[-1]):
            ends.append(cut)
        previous_end, previous_cut = match.end(), cut
    return ends


def sentence_prefixes(text: str) -> list[str]:
    """`text` cut after each of its sentences but the last, longest first."""
    return [text[:end] for end in reversed(sentence_ends(text))]


def fit_completion(completion: str, length: Callable[[str], int], max_length: int) -> str | None:
    """The completion, or its longest sentence prefix, whose row fits `max_length` tokens;
    `length(c)` is the tokenized length of prompt + c + EOS. None when not even the first
    sentence fits. Truncating the row instead would cut mid-word and drop the EOS, and the
    model would learn never to stop on long answers.

    A longer prefix never has fewer tokens, so the longest that fits is found by bisection:
    a few tokenizer calls per answer, however many sentences it has (trying every prefix,
    longest first, took minutes on 100,000-character answers)."""
    if length(completion) <= max_length:
        return completion
    ends = sentence_ends(completion)
    low, high = 0, len(ends)  # ends[:low] fit, ends[high:] do not
    while low < high:
        middle = (low + high) // 2
        if length(completion[: ends[middle]]) <= max_length:
            low = middle + 1
        else:
            high = middle
    return completion[: ends[low - 1]] if low else None


def shortest_form(completion: str) -> str:
    """The shortest a completion can be cut to: its first sentence."""
    ends = sentence_ends(completion)
    return completion[: ends[0]] if ends else completion


def fit_rows(
    rows: list[dict[str, str]], length: Callable[[str, str], int], max_length: int
) -> tuple[list[dict[str, str]], int, int]:
    """Prompt/completion pairs that fit `max_length` with their EOS (see `fit_completion`);
    `length(prompt, completion)` counts tokens with the EOS. Returns (rows, trimmed, dropped)."""
    kept: list[dict[str, str]] = []
    trimmed = dropped = 0
    for row in rows:
        prompt = row["prompt"]
        completion = fit_completion(row["completion"], lambda c, p=prompt: length(p, c), max_length)
        if completion is None:
            dropped += 1
            continue
        trimmed += completion != row["completion"]
        kept.append({"prompt": prompt, "completion": completion})
    return kept, trimmed, dropped


def shortest_row(rows: list[dict[str, str]], length: Callable[[str, str], int]) -> int:
    """The fewest tokens any row can take: its prompt with the first sentence of its answer."""
    return min(length(r["prompt"], shortest_form(r["completion"])) for r in rows)


def prompt_length(tokenizer) -> Callable[[str], int]:
    """Tokens of a prompt as generation encodes it (special tokens included)."""
    return lambda prompt: len(tokenizer(text=prompt)["input_ids"])


def fit_prompts(
    prompts: list[str], length: Callable[[str], int], limit: int
) -> tuple[list[int], int]:
    """The indexes of the test prompts of at most `limit` tokens (the context minus
    generation.max_new_tokens: room for a whole answer), and how many were left out. The
    same rule as for training rows: what cannot fit the model is left out and counted, never
    run past the context."""
    kept = [i for i, prompt in enumerate(prompts) if length(prompt) <= limit]
    return kept, len(prompts) - len(kept)


def write_prompts(splits: SplitRecord, out_dir: Path) -> PromptRecord:
    """Both splits as prompt/completion pairs, written atomically."""
    with atomic_dir(out_dir) as tmp:
        for name, path in (("train", splits.train_path), ("test", splits.test_path)):
            write_jsonl(tmp / f"{name}.jsonl", map(to_prompt_completion, read_jsonl(path)))
        # the rows' ids, in the same order (see data.write_splits)
        shutil.copy2(splits.row_ids_path, tmp / splits.row_ids_path.name)
    return PromptRecord(
        folder=out_dir,
        fingerprint=fingerprint(out_dir),
        train_rows=splits.train_rows,
        test_rows=splits.test_rows,
        data_version=splits.data_version,
        template=template_digest(),
        train_sha256=fingerprint(out_dir / "train.jsonl"),
        test_sha256=fingerprint(out_dir / "test.jsonl"),
    )
