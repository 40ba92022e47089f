"""Small records that tasks pass to each other: locations, fingerprints and numbers, never
models. `folder` is a folder in the durable store (a path or a URL); `fingerprint` is the
digest of its manifest, so a record says exactly which bytes it stands for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, field_validator

from finance_qlora.bootstrap import PairedInterval

# Beside a split's files: {"train": [row id...], "test": [row id...]}, in file order.
ROW_IDS = "rows.json"


class Stored(BaseModel):
    folder: str
    fingerprint: str

    @field_validator("folder", mode="before")
    @classmethod
    def _as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, Path) else value

    @property
    def path(self) -> Path:
        """The folder on this machine (valid once the task layer has materialized it)."""
        return Path(self.folder)


class DataVersion(BaseModel):
    """What the load step reads, resolved to an immutable version before anything is cached:
    a hub data set at its commit sha, a file (local or on a store) by its content's sha256."""

    source: str  # the data set as the user named it
    version: str  # "sha256:<hex>" or "hub:<id>@<commit sha>"
    revision: str | None = None  # the commit sha, for a hub data set


class SplitRecord(Stored):
    train_rows: int
    test_rows: int
    data_version: str = ""

    @property
    def train_path(self) -> Path:
        return self.path / "train.jsonl"

    @property
    def test_path(self) -> Path:
        return self.path / "test.jsonl"

    @property
    def row_ids_path(self) -> Path:
        return self.path / ROW_IDS


class PromptRecord(SplitRecord):
    """Prompt/completion pairs; in the test split the completion is the ROUGE reference."""

    template: str  # sha256 of the template text, so a record says which prompts it holds
    train_sha256: str = ""  # each split's own fingerprint: training depends on train only,
    test_sha256: str = ""  # evaluation on test only


class TrainRecord(Stored):
    """`folder` holds the trained adapter, straight from the trainer."""

    losses: list[float]  # training loss at each logging step
    steps: int
    seconds: float
    tokens: int = 0  # real (unpadded) training tokens read, epochs included
    resumed_from: int | None = None  # the checkpoint step a retried training started from
    rows: int = 0  # training rows (after fitting to train.max_seq_length)
    rows_per_step: int = 0  # the schedule: rows in one optimizer step
    micro_batches_per_step: int = 0  # how this run's card computed each step


class AdapterRecord(Stored):
    """`folder` is the versioned adapter folder users keep; its `train_rows.json` lists the
    ids of the rows it trained on (see data.row_id)."""

    @property
    def train_rows_path(self) -> Path:
        return self.path / "train_rows.json"


class EvalRecord(Stored):
    label: str  # "pretrained", "finetuned" or "champion"
    rows: int
    rouge: dict[str, float]  # mean F1 over test rows
    max_new_tokens: int
    # What the scores were computed with: library versions, GPU class, resolved dtype, and
    # whether the 4-bit weights were dequantized (None: not known, a sharded evaluation).
    runtime: dict[str, Any] = {}

    @property
    def predictions_parquet(self) -> Path:
        return self.path / "predictions.parquet"

    @property
    def predictions_csv(self) -> Path:
        return self.path / "predictions.csv"


class ComparisonRecord(Stored):
    rouge: dict[str, PairedInterval]
    loop_share: dict[str, float]
    markdown: str

    @property
    def json_path(self) -> Path:
        return self.path / "comparison.json"

    @property
    def markdown_path(self) -> Path:
        return self.path / "comparison.md"


class QuestionRecord(Stored):
    """`folder` holds questions.jsonl: each question's id, instruction and input, checked."""

    rows: int
    source: str  # the file as the user named it

    @property
    def questions_path(self) -> Path:
        return self.path / "questions.jsonl"


class AnswerRecord(Stored):
    """`folder` holds answers.jsonl and answers.parquet (id, answer, ...) and answering.json."""

    rows: int
    adapter: str  # the adapter folder that answered

    @property
    def answers_path(self) -> Path:
        return self.path / "answers.jsonl"


RECORD_TYPES: dict[str, type[BaseModel]] = {
    cls.__name__: cls
    for cls in (
        DataVersion,
        SplitRecord,
        PromptRecord,
        TrainRecord,
        AdapterRecord,
        EvalRecord,
        ComparisonRecord,
        QuestionRecord,
        AnswerRecord,
    )
}
