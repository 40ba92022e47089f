"""Small records that tasks pass to each other: paths, fingerprints and numbers, never models."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from finance_qlora.bootstrap import PairedInterval
from finance_qlora.files import fingerprint


class Stored(BaseModel):
    """A record of files written to `folder`, with the sha256 of its contents."""

    folder: Path
    fingerprint: str

    def intact(self) -> bool:
        """False when the folder was deleted or changed since the record was made: a cached
        record like this must be recomputed, not handed back."""
        return self.folder.is_dir() and fingerprint(self.folder) == self.fingerprint


class SplitRecord(Stored):
    train_rows: int
    test_rows: int

    @property
    def train_path(self) -> Path:
        return self.folder / "train.jsonl"

    @property
    def test_path(self) -> Path:
        return self.folder / "test.jsonl"


class PromptRecord(SplitRecord):
    """Prompt/completion pairs; in the test split the completion is the ROUGE reference."""

    template: str


class TrainRecord(Stored):
    """`folder` holds the trained adapter, straight from the trainer."""

    losses: list[float]  # training loss at each logging step
    steps: int
    seconds: float
    tokens: int = 0  # real (unpadded) training tokens read, epochs included
    resumed_from: int | None = None  # the checkpoint step a retried training started from


class AdapterRecord(Stored):
    """`folder` is the versioned adapter folder users keep."""


class EvalRecord(Stored):
    label: str  # "pretrained" or "finetuned"
    rows: int
    rouge: dict[str, float]  # mean F1 over test rows
    max_new_tokens: int

    @property
    def predictions_parquet(self) -> Path:
        return self.folder / "predictions.parquet"

    @property
    def predictions_csv(self) -> Path:
        return self.folder / "predictions.csv"


class ComparisonRecord(Stored):
    rouge: dict[str, PairedInterval]
    loop_share: dict[str, float]
    markdown: str

    @property
    def json_path(self) -> Path:
        return self.folder / "comparison.json"

    @property
    def markdown_path(self) -> Path:
        return self.folder / "comparison.md"
