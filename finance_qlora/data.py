"""Finance-Alpaca rows: read from the hub or a local file, check, and split into train/test."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from finance_qlora.errors import DataError
from finance_qlora.files import atomic_dir, fingerprint, write_jsonl
from finance_qlora.records import SplitRecord

COLUMNS = ("instruction", "input", "output")
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
ASSETS = Path(__file__).parent / "assets"
BUILTIN_DATA = {"builtin:tiny-finance-alpaca": ASSETS / "tiny_finance_alpaca.jsonl"}

log = logging.getLogger(__name__)


def local_path(dataset: str) -> Path | None:
    """The file behind `dataset`, or None when it names a hub data set."""
    if dataset in BUILTIN_DATA:
        return BUILTIN_DATA[dataset]
    if dataset.startswith("builtin:"):
        raise DataError(f"data.dataset: unknown {dataset!r}; built in: {', '.join(BUILTIN_DATA)}")
    path = Path(dataset).expanduser()
    if path.suffix.lower() in LOCAL_FORMATS or path.exists() or dataset.startswith((".", "/")):
        if not path.is_file():
            raise DataError(
                f"data file {dataset} does not exist; pass an existing "
                "JSON/JSONL/CSV/Parquet file or a hub id"
            )
        if path.suffix.lower() not in LOCAL_FORMATS:
            raise DataError(
                f"data file {dataset}: unsupported type {path.suffix!r}; "
                "use .json, .jsonl, .csv or .parquet"
            )
        return path
    return None


def _first_bad_json_line(path: Path) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            return f"line {exc.lineno}: {exc.msg}"
        return "unreadable content"
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                if not isinstance(json.loads(line), dict):
                    return f"line {number}: not a JSON object"
            except json.JSONDecodeError as exc:
                return f"line {number}: {exc.msg}"
    return "unreadable content"


def read_rows(dataset: str, revision: str | None = None, token: str | None = None) -> list[dict]:
    """All rows of a hub data set or local file, as plain dicts."""
    import datasets  # heavy import, only where data is read

    datasets.disable_progress_bars()
    path = local_path(dataset)
    # datasets logs its own multi-line report of a parse error; ours is the one line below
    datasets_log = logging.getLogger("datasets")
    level = datasets_log.level
    datasets_log.setLevel(logging.CRITICAL)
    try:
        if path is not None:
            builder = LOCAL_FORMATS[path.suffix.lower()]
            table = datasets.load_dataset(builder, data_files=str(path), split="train")
        else:
            table = datasets.load_dataset(dataset, revision=revision, split="train", token=token)
    except (OSError, ConnectionError) as exc:
        if path is not None:
            raise DataError(f"data file {path}: cannot be read ({exc})") from None
        raise  # hub trouble is transient: let the task retry it
    except Exception as exc:  # datasets wraps parse errors in many types
        if path is None:
            raise
        reason = _first_bad_json_line(path) if path.suffix in (".json", ".jsonl") else exc
        raise DataError(
            f"data file {path}: malformed {path.suffix[1:]} ({reason}); fix or remove that line"
        ) from None
    finally:
        datasets_log.setLevel(level)
    return table.to_list()


def check_rows(rows: list[dict[str, Any]], source: str) -> list[dict[str, str]]:
    """Rows reduced to the three columns, with types and emptiness checked."""
    if not rows:
        raise DataError(f"data {source}: no rows; pass a file with Finance-Alpaca rows")
    missing = [c for c in COLUMNS if c not in rows[0]]
    if missing:
        raise DataError(
            f"data {source}: missing column(s) {', '.join(missing)}; "
            f"Finance-Alpaca rows need {', '.join(COLUMNS)}"
        )
    checked = []
    for number, row in enumerate(rows, start=1):
        clean = {}
        for column in COLUMNS:
            value = row.get(column)
            if value is None and column == "input":
                value = ""
            if not isinstance(value, str):
                raise DataError(
                    f"data {source}: row {number} field {column!r} is "
                    f"{type(value).__name__}, not text; fix that row"
                )
            clean[column] = value
        for column in ("instruction", "output"):
            if not clean[column].strip():
                raise DataError(
                    f"data {source}: row {number} has an empty {column!r}; remove or fill that row"
                )
        checked.append(clean)
    return checked


def drop_duplicates(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Exact duplicates would leak test answers into training: keep each row once."""
    seen: set[tuple[str, ...]] = set()
    unique = []
    for row in rows:
        key = tuple(row[c].strip() for c in COLUMNS)
        if key not in seen:
            seen.add(key)
            unique.append(row)
    if len(unique) < len(rows):
        log.warning("dropped %d duplicate rows", len(rows) - len(unique))
    return unique


def split_rows(
    rows: list[dict[str, str]], train_size: int, test_size: int, seed: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """A seeded, disjoint sample. Test rows are drawn first, so they stay the same when
    only train_size changes."""
    if train_size <= 0 or test_size <= 0:
        raise DataError("data.train_size and data.test_size must be positive")
    if train_size + test_size > len(rows):
        raise DataError(
            f"data.train_size + data.test_size = {train_size + test_size} exceeds the "
            f"{len(rows)} distinct rows available; lower them"
        )
    order = np.random.default_rng(seed).permutation(len(rows))
    test = [rows[i] for i in order[:test_size]]
    train = [rows[i] for i in order[test_size : test_size + train_size]]
    return train, test


def write_splits(
    dataset: str,
    revision: str | None,
    train_size: int,
    test_size: int,
    seed: int,
    out_dir: Path,
    token: str | None = None,
) -> SplitRecord:
    """Read, check, de-duplicate and split; write train.jsonl and test.jsonl atomically."""
    rows = drop_duplicates(check_rows(read_rows(dataset, revision, token), dataset))
    train, test = split_rows(rows, train_size, test_size, seed)
    with atomic_dir(out_dir) as tmp:
        write_jsonl(tmp / "train.jsonl", train)
        write_jsonl(tmp / "test.jsonl", test)
    return SplitRecord(
        folder=out_dir, fingerprint=fingerprint(out_dir), train_rows=len(train), test_rows=len(test)
    )
