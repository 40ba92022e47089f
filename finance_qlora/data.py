"""Finance-Alpaca rows: resolved to a version, read (hub, local file or a URL on a store),
checked, and split into train/test."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from finance_qlora.config import DataConfig
from finance_qlora.errors import DataError
from finance_qlora.files import atomic_dir, fingerprint, write_jsonl
from finance_qlora.records import ROW_IDS, DataVersion, SplitRecord
from finance_qlora.store import REMOTE_SCHEMES

COLUMNS = ("instruction", "input", "output")
FORMATS = (".json", ".jsonl", ".csv", ".parquet")
ASSETS = Path(__file__).parent / "assets"
BUILTIN_DATA = {"builtin:tiny-finance-alpaca": ASSETS / "tiny_finance_alpaca.jsonl"}

log = logging.getLogger(__name__)


def is_store_url(dataset: str) -> bool:
    return urlsplit(dataset).scheme.lower() in REMOTE_SCHEMES | {"file"}


def local_path(dataset: str) -> Path | None:
    """The local file behind `dataset`; None for a hub id or a URL on a store."""
    if dataset in BUILTIN_DATA:
        return BUILTIN_DATA[dataset]
    if dataset.startswith("builtin:"):
        raise DataError(f"data.dataset: unknown {dataset!r}; built in: {', '.join(BUILTIN_DATA)}")
    if is_store_url(dataset) and not dataset.startswith("file://"):
        return None
    path = Path(dataset.removeprefix("file://")).expanduser()
    looks_local = path.suffix.lower() in FORMATS or dataset.startswith((".", "/", "~", "file:"))
    if not (looks_local or os.path.lexists(path)):
        return None  # a hub id
    try:
        kind = path.stat().st_mode
    except FileNotFoundError:
        raise DataError(
            f"data file {dataset} does not exist; pass an existing "
            "JSON/JSONL/CSV/Parquet file, a URL on your store or a hub id"
        ) from None
    except OSError as exc:  # a symbolic link loop, a permission problem
        raise DataError(f"data file {dataset}: cannot be opened ({exc.strerror})") from None
    if stat.S_ISDIR(kind):
        raise DataError(f"data file {dataset} is a folder; pass one data file inside it")
    if not stat.S_ISREG(kind):
        raise DataError(f"data file {dataset} is not a regular file (a pipe or device?)")
    suffix_error(dataset, path.suffix)
    return path


def file_suffix(dataset: str) -> str:
    path = local_path(dataset)
    return (path if path is not None else Path(urlsplit(dataset).path)).suffix


def suffix_error(dataset: str, suffix: str) -> None:
    if suffix.lower() not in FORMATS:
        raise DataError(
            f"data file {dataset}: unsupported type {suffix!r}; use .json, .jsonl, .csv or .parquet"
        )


def resolve_version(
    dataset: str,
    revision: str | None = None,
    token: str | None = None,
    options: dict[str, Any] | None = None,
) -> DataVersion:
    """Name the exact rows to read: a file by its content's sha256, a hub data set by the
    commit sha its revision points at now. Later reads check they got this version."""
    path = local_path(dataset)
    if path is not None or is_store_url(dataset):
        return DataVersion(source=dataset, version=f"sha256:{sha256(file_bytes(dataset, options))}")
    sha = hub_revision(dataset, revision, token)
    return DataVersion(source=dataset, version=f"hub:{dataset}@{sha}", revision=sha)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, but now, not when it was imported."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def hub_revision(dataset: str, revision: str | None, token: str | None) -> str:
    """The commit sha of a hub data set; a missing, gated or offline one is bad input."""
    if hub_offline():
        raise DataError(
            f"data.dataset: {dataset} is not a local file, and the Hub is offline "
            "(HF_HUB_OFFLINE); pass a data file or a URL on your store"
        )
    from huggingface_hub import dataset_info
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return dataset_info(dataset, revision=revision, token=token).sha
    except GatedRepoError:
        raise DataError(
            f"data.dataset: {dataset} is gated; accept its terms on the Hub and give a token"
        ) from None
    except RepositoryNotFoundError:
        raise DataError(
            f"data.dataset: {dataset} is neither a file here nor a data set on the Hub "
            "(or it is private and no token was given)"
        ) from None
    except RevisionNotFoundError:
        raise DataError(f"data.revision: {revision!r} not found in {dataset}") from None


def file_bytes(dataset: str, options: dict[str, Any] | None = None) -> bytes:
    path = local_path(dataset)
    if path is not None:
        return path.read_bytes()
    import fsspec

    suffix_error(dataset, file_suffix(dataset))
    try:
        with fsspec.open(dataset, "rb", **(options or {})) as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"data file {dataset} does not exist on the store") from None
    except PermissionError as exc:
        raise DataError(f"data file {dataset}: access denied ({exc}); check credentials") from None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_rows(data: bytes, suffix: str, source: str) -> list[dict[str, Any]]:
    """Rows of a JSON Lines, JSON (a list of objects), CSV or Parquet file's bytes. Text columns
    stay text (a CSV cell "2024" is the string "2024", an empty cell is "")."""
    suffix = suffix.lower()
    if not data.strip():
        raise DataError(f"data file {source} is empty; pass a file with Finance-Alpaca rows")
    if suffix != ".parquet":  # Parquet's strings are UTF-8 by its format
        text = utf8_text(data, source)
    if suffix in (".csv", ".parquet"):
        import pandas as pd

        try:
            if suffix == ".csv":
                table = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
            else:
                table = pd.read_parquet(io.BytesIO(data))
        except Exception as exc:  # pandas and pyarrow word parse errors in many types
            reason = " ".join(str(exc).split())[:160]
            raise DataError(f"data file {source}: malformed {suffix[1:]} ({reason})") from None
        return table.to_dict(orient="records")
    if suffix == ".json":
        try:
            return json_rows(json.loads(text), source)
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":  # "Extra data": JSON Lines in a .json file
                raise DataError(
                    f"data file {source}: malformed json (line {exc.lineno}: {exc.msg}); fix it"
                ) from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"data file {source}: malformed {suffix[1:]} (line {number}: {exc.msg}); "
                "fix or remove that line"
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"data file {source}: malformed {suffix[1:]} (line {number}: not a JSON "
                "object); fix or remove that line"
            )
        rows.append(row)
    return rows


def utf8_text(data: bytes, source: str) -> str:
    """The file's text, read strictly: a byte that is not UTF-8 is an error, never a silent
    U+FFFD trained on (a leading byte-order mark is allowed)."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"data file {source}: not UTF-8 (line {line}, byte offset {exc.start}: "
            f"{data[exc.start : exc.start + 1]!r}); save the file as UTF-8"
        ) from None


def json_rows(value: Any, source: str) -> list[dict[str, Any]]:
    """A JSON file's rows: a list of objects, an object holding one such list under any name
    (as {"data": [...]}), or a single row."""
    if isinstance(value, dict):
        lists = [key for key, item in value.items() if isinstance(item, list)]
        if len(lists) > 1:
            raise DataError(
                f"data file {source}: a JSON object with {len(lists)} lists "
                f"({', '.join(lists)}); keep the one list of rows"
            )
        value = value[lists[0]] if lists else [value]
    if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
        raise DataError(
            f"data file {source}: a JSON list of objects is expected (or an object holding "
            "one such list)"
        )
    return value


def read_version(
    source: DataVersion, token: str | None = None, options: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The rows of exactly `source.version`: the bytes hashed are the bytes parsed."""
    if source.revision is None:
        data = file_bytes(source.source, options)
        if f"sha256:{sha256(data)}" != source.version:
            raise DataError(f"data file {source.source} changed while this run read it; run again")
        return parse_rows(data, file_suffix(source.source), source.source)
    import datasets  # heavy import, only where hub data is read

    datasets.disable_progress_bars()
    table = datasets.load_dataset(
        source.source, revision=source.revision, split="train", token=token
    )
    return table.to_list()


def read_rows(
    dataset: str,
    revision: str | None = None,
    token: str | None = None,
    options: dict[str, Any] | None = None,
) -> list[dict]:
    """All rows of a hub data set or a data file, as plain dicts."""
    return read_version(resolve_version(dataset, revision, token, options), token, options)


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


def row_key(row: dict[str, str]) -> tuple[str, ...]:
    """A row's content as deduplication, the split's rank and row ids all see it: one
    normalisation, so the copy of a whitespace-variant duplicate that survives ranks where
    any copy would."""
    return tuple(row[c].strip() for c in COLUMNS)


def row_id(row: dict[str, str]) -> str:
    """A row's name whatever the seed or split: adapters record the ids they trained on."""
    return hashlib.sha256("\0".join(row_key(row)).encode()).hexdigest()


def drop_duplicates(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Exact duplicates would leak test answers into training: keep each row once."""
    seen: set[tuple[str, ...]] = set()
    unique = []
    for row in rows:
        key = row_key(row)
        if key not in seen:
            seen.add(key)
            unique.append(row)
    if len(unique) < len(rows):
        log.warning("dropped %d duplicate rows", len(rows) - len(unique))
    return unique


def split_rows(
    rows: list[dict[str, str]],
    train_size: int,
    test_size: int,
    seed: int,
    validation_size: int = 0,
) -> tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]]]:
    """A seeded, disjoint sample (train, test, validation): rows ranked by a seeded hash of
    their own content; the first `test_size` for test, the next `validation_size` for
    validation, the next `train_size` for training.

    A row's rank depends on nothing but itself, so the split is stable as data grows: when
    rows are added, the new test rows are earlier test rows or new rows, never rows that an
    earlier adapter trained on, and the gate can re-score an old champion fairly on them.
    Test rows come first, so they stay the same when only the other sizes change; validation
    rows are carved from what would otherwise be training rows."""
    if train_size <= 0 or test_size <= 0:
        raise DataError("data.train_size and data.test_size must be positive")
    wanted = train_size + test_size + validation_size
    if wanted > len(rows):
        names = "data.train_size + data.test_size" + (
            " + data.validation_size" if validation_size else ""
        )
        raise DataError(
            f"{names} = {wanted} exceeds the {len(rows)} distinct rows available; lower them"
        )
    ranked = sorted(rows, key=lambda row: row_rank(row, seed))
    held = test_size + validation_size
    return ranked[held : held + train_size], ranked[:test_size], ranked[test_size:held]


def row_rank(row: dict[str, str], seed: int) -> str:
    return hashlib.sha256("\0".join([str(seed), *row_key(row)]).encode()).hexdigest()


def write_splits(
    source: DataVersion,
    data: DataConfig,
    out_dir: Path,
    token: str | None = None,
    options: dict[str, Any] | None = None,
) -> SplitRecord:
    """Read, check, de-duplicate and split; write train.jsonl and test.jsonl atomically
    (test.jsonl holds the validation rows when `data.evaluate_on` says so), and rows.json:
    each split's row ids in file order (what an adapter trained on, what the gate scores)."""
    rows = drop_duplicates(check_rows(read_version(source, token, options), source.source))
    train, test, validation = split_rows(
        rows, data.train_size, data.test_size, data.seed, data.validation_size
    )
    held = validation if data.evaluate_on == "validation" else test
    with atomic_dir(out_dir) as tmp:
        write_jsonl(tmp / "train.jsonl", train)
        write_jsonl(tmp / "test.jsonl", held)
        ids = {"train": [row_id(r) for r in train], "test": [row_id(r) for r in held]}
        (tmp / ROW_IDS).write_text(json.dumps(ids))
    return SplitRecord(
        folder=out_dir,
        fingerprint=fingerprint(out_dir),
        train_rows=len(train),
        test_rows=len(held),
        data_version=source.version,
    )
