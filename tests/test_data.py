import json

import pytest

from finance_qlora.data import (
    check_rows,
    drop_duplicates,
    local_path,
    read_rows,
    split_rows,
    write_splits,
)
from finance_qlora.errors import DataError
from finance_qlora.files import read_jsonl
from tests.conftest import make_rows


def _key(row):
    return (row["instruction"], row["input"], row["output"])


def test_split_is_disjoint_seeded_and_sized():
    rows = make_rows(50)
    train, test = split_rows(rows, 30, 10, seed=3)
    assert len(train) == 30 and len(test) == 10
    assert not {_key(r) for r in train} & {_key(r) for r in test}
    assert split_rows(rows, 30, 10, seed=3) == (train, test)
    assert split_rows(rows, 30, 10, seed=4) != (train, test)


def test_test_rows_do_not_move_when_train_size_changes():
    rows = make_rows(50)
    _, test_small = split_rows(rows, 10, 10, seed=0)
    _, test_large = split_rows(rows, 40, 10, seed=0)
    assert test_small == test_large


@pytest.mark.parametrize(
    "train_size, test_size, match",
    [(40, 20, "exceeds the 50 distinct rows"), (10, 0, "must be positive")],
)
def test_bad_split_sizes(train_size, test_size, match):
    with pytest.raises(DataError, match=match):
        split_rows(make_rows(50), train_size, test_size, seed=0)


def test_duplicates_are_dropped_before_splitting():
    rows = make_rows(5) + make_rows(5)
    assert drop_duplicates(rows) == make_rows(5)


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.json", "rows.csv", "rows.parquet"])
def test_reads_local_formats(write_rows, name):
    rows = make_rows(6)
    path = write_rows(rows, name)
    assert check_rows(read_rows(str(path)), str(path)) == rows


def test_missing_column_is_named(write_rows):
    rows = [{"instruction": "Q", "input": ""} for _ in range(3)]
    path = write_rows(rows)
    with pytest.raises(DataError, match=r"missing column\(s\) output"):
        check_rows(read_rows(str(path)), str(path))


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        local_path(str(tmp_path / "nope.jsonl"))
    odd = tmp_path / "rows.txt"
    odd.write_text("x")
    with pytest.raises(DataError, match="unsupported type"):
        local_path(str(odd))


def test_hub_ids_are_not_local():
    assert local_path("gbharti/finance-alpaca") is None


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(make_rows(1)[0])
    path.write_text(f"{good}\n{good}\n{{not json\n")
    with pytest.raises(DataError, match="line 3"):
        read_rows(str(path))


def test_empty_output_and_non_string_field_are_named():
    with pytest.raises(DataError, match="row 2 has an empty 'output'"):
        check_rows([make_rows(1)[0], {"instruction": "Q", "input": "", "output": "  "}], "f")
    with pytest.raises(DataError, match="row 1 field 'instruction' is int"):
        check_rows([{"instruction": 5, "input": "", "output": "A"}], "f")


def test_null_input_means_no_input():
    row = {"instruction": "Q", "input": None, "output": "A"}
    assert check_rows([row], "f")[0]["input"] == ""


def test_write_splits_returns_paths_and_fingerprint(write_rows, tmp_path):
    path = write_rows(make_rows(20))
    record = write_splits(str(path), None, 12, 5, 0, tmp_path / "splits")
    assert (record.train_rows, record.test_rows) == (12, 5)
    assert len(read_jsonl(record.train_path)) == 12
    assert len(read_jsonl(record.test_path)) == 5
    assert record.intact()
    again = write_splits(str(path), None, 12, 5, 0, tmp_path / "splits")
    assert again.fingerprint == record.fingerprint
    record.test_path.write_text("changed\n")
    assert not record.intact()
