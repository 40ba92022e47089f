import json

import pytest

from finance_qlora.config import DataConfig
from finance_qlora.data import (
    check_rows,
    drop_duplicates,
    local_path,
    read_rows,
    resolve_version,
    split_rows,
    write_splits,
)
from finance_qlora.errors import DataError
from finance_qlora.files import fingerprint, read_jsonl
from tests.conftest import make_rows


def _key(row):
    return (row["instruction"], row["input"], row["output"])


def test_split_is_disjoint_seeded_and_sized():
    rows = make_rows(50)
    train, test, _ = split_rows(rows, 30, 10, seed=3)
    assert len(train) == 30 and len(test) == 10
    assert not {_key(r) for r in train} & {_key(r) for r in test}
    assert split_rows(rows, 30, 10, seed=3)[:2] == (train, test)
    assert split_rows(rows, 30, 10, seed=4)[:2] != (train, test)


def test_test_rows_do_not_move_when_train_size_changes():
    rows = make_rows(50)
    _, test_small, _ = split_rows(rows, 10, 10, seed=0)
    _, test_large, _ = split_rows(rows, 40, 10, seed=0)
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
    source = resolve_version(str(path))
    data = DataConfig(dataset=str(path), train_size=12, test_size=5, seed=0)
    record = write_splits(source, data, tmp_path / "splits")
    assert (record.train_rows, record.test_rows) == (12, 5)
    assert record.data_version == source.version == f"sha256:{fingerprint(path)}"
    assert len(read_jsonl(record.train_path)) == 12
    assert len(read_jsonl(record.test_path)) == 5
    assert record.fingerprint == fingerprint(record.path)
    again = write_splits(source, data, tmp_path / "splits")
    assert again.fingerprint == record.fingerprint


def test_an_edited_file_is_read_anew_even_with_the_same_mtime(write_rows, tmp_path):
    """The bytes hashed are the bytes parsed: no cache keyed by path and modification time."""
    import os

    path = write_rows(make_rows(10))
    stamp = os.stat(path)
    first = read_rows(str(path))
    changed = make_rows(10)
    changed[0]["output"] = "A new answer."
    write_rows(changed)
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # as a copy tool restores it
    assert os.stat(path).st_mtime_ns == stamp.st_mtime_ns
    assert read_rows(str(path))[0]["output"] == "A new answer." != first[0]["output"]
    assert resolve_version(str(path)).version == f"sha256:{fingerprint(path)}"


def test_the_version_is_the_content_not_the_path(write_rows, tmp_path):
    a = write_rows(make_rows(10), "a.jsonl")
    b = write_rows(make_rows(10), "b.jsonl")
    assert resolve_version(str(a)).version == resolve_version(str(b)).version
    write_rows(make_rows(11), "b.jsonl")
    assert resolve_version(str(a)).version != resolve_version(str(b)).version


def test_a_data_file_on_the_store(bucket, write_rows):
    import s3fs

    local = write_rows(make_rows(12))
    url = f"{bucket}/incoming/rows.jsonl"
    s3fs.S3FileSystem(skip_instance_cache=True).put_file(str(local), url)
    source = resolve_version(url)
    assert source.version == f"sha256:{fingerprint(local)}" and source.revision is None
    assert read_rows(url) == read_rows(str(local))
    with pytest.raises(DataError, match="does not exist on the store"):
        resolve_version(f"{bucket}/incoming/missing.jsonl")


def test_hub_ids_offline_fail_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("some/nonexistent-hub-id", "myrows"):
        with pytest.raises(DataError, match="not a local file, and the Hub is offline"):
            resolve_version(name)


def test_csv_text_columns_stay_text(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("instruction,input,output\nWhat is 2024?,2024,A year.\nWhy?,,Because.\n")
    rows = check_rows(read_rows(str(path)), str(path))
    assert rows[0]["input"] == "2024" and rows[1]["input"] == ""


def test_folders_pipes_and_empty_files_are_named(tmp_path):
    import os

    with pytest.raises(DataError, match="is a folder"):
        local_path(str(tmp_path))
    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="not a regular file"):
        local_path(str(fifo))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="is empty"):
        read_rows(str(empty))
    loop = tmp_path / "loop.jsonl"
    loop.symlink_to(loop)
    with pytest.raises(DataError, match="cannot be opened"):
        local_path(str(loop))


def test_growing_data_never_moves_trained_rows_into_test():
    """Week 3's test rows are week 1's test rows or new rows: an old champion is never scored
    on rows it trained on."""
    week1 = make_rows(100)
    week3 = week1 + [
        {"instruction": f"New question {i}?", "input": "", "output": f"New answer {i}."}
        for i in range(40)
    ]
    train1, test1, _ = split_rows(week1, 60, 20, seed=0)
    train3, test3, _ = split_rows(week3, 60, 20, seed=0)
    seen = {_key(r) for r in train1}
    assert not seen & {_key(r) for r in test3}
    assert {_key(r) for r in test3} <= {_key(r) for r in test1 + week3[100:]}
    assert test3 != test1  # the new rows do take part


def test_validation_rows_are_carved_from_the_training_split():
    rows = make_rows(60)
    train, test, _ = split_rows(rows, 40, 10, seed=0)
    fit, test_again, validation = split_rows(rows, 30, 10, seed=0, validation_size=10)
    assert test_again == test  # the test rows are never touched by a search
    keys = {_key(r) for r in train}
    assert {_key(r) for r in fit + validation} == keys and not set(map(_key, fit)) & set(
        map(_key, validation)
    )


def _hub(monkeypatch, answer):
    """The hub's answer to dataset_info, simulated (no network here); the calls are kept."""
    import httpx2
    import huggingface_hub

    calls = []

    def dataset_info(name, **kwargs):
        calls.append((name, kwargs))
        if isinstance(answer, type):
            url = f"https://huggingface.co/api/datasets/{name}"
            response = httpx2.Response(404, request=httpx2.Request("GET", url))
            raise answer(f"{name}: {answer.__name__}", response=response)
        return type("Info", (), {"sha": answer})()

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "dataset_info", dataset_info)
    return calls


def test_a_hub_data_set_is_pinned_to_its_commit_with_revision_and_token(monkeypatch):
    calls = _hub(monkeypatch, "c0ffee")
    source = resolve_version("org/rows", revision="v2", token="hf_x")
    assert (source.version, source.revision) == ("hub:org/rows@c0ffee", "c0ffee")
    assert calls == [("org/rows", {"revision": "v2", "token": "hf_x"})]


@pytest.mark.parametrize(
    "error, message",
    [
        (
            "GatedRepoError",
            "data.dataset: org/rows is gated; accept its terms on the Hub and give a token",
        ),
        (
            "RepositoryNotFoundError",
            "data.dataset: org/rows is neither a file here nor a data set on the Hub (or it is "
            "private and no token was given)",
        ),
        ("RevisionNotFoundError", "data.revision: 'v2' not found in org/rows"),
    ],
)
def test_hub_data_set_trouble_is_one_data_error(monkeypatch, error, message):
    from huggingface_hub import errors

    _hub(monkeypatch, getattr(errors, error))
    with pytest.raises(DataError) as info:
        resolve_version("org/rows", revision="v2")
    assert str(info.value) == message


def test_splits_of_a_hub_data_set_read_that_commit_with_the_token(monkeypatch, tmp_path):
    import datasets

    from finance_qlora.records import DataVersion

    loaded = []

    def load_dataset(name, **kwargs):
        loaded.append((name, kwargs))
        return datasets.Dataset.from_list(make_rows(10))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    source = DataVersion(source="org/rows", version="hub:org/rows@c0ffee", revision="c0ffee")
    data = DataConfig(dataset="org/rows", train_size=6, test_size=2, seed=0)
    record = write_splits(source, data, tmp_path / "splits", token="hf_x")
    assert loaded == [("org/rows", {"revision": "c0ffee", "split": "train", "token": "hf_x"})]
    assert (record.train_rows, record.test_rows) == (6, 2)


def test_hub_data_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as info:
        resolve_version("org/rows")
    assert str(info.value) == (
        "data.dataset: org/rows is not a local file, and the Hub is offline (HF_HUB_OFFLINE); "
        "pass a data file or a URL on your store"
    )


def test_splits_of_a_file_on_a_store_use_the_store_options(monkeypatch, tmp_path):
    """The store's options (credentials, endpoint) reach the read; errors name the file."""
    import fsspec

    url = "memory://finance-qlora-tests/rows.jsonl"
    rows = "".join(json.dumps(r) + "\n" for r in make_rows(10))
    fsspec.filesystem("memory").pipe(url, rows.encode())
    opened, real_open = [], fsspec.open

    def recording_open(path, *args, **kwargs):
        opened.append((path, kwargs))
        return real_open(path, *args)

    monkeypatch.setattr(fsspec, "open", recording_open)
    source = resolve_version(url, options={"key": "k"})
    data = DataConfig(dataset=url, train_size=6, test_size=2, seed=0)
    record = write_splits(source, data, tmp_path / "splits", options={"key": "k"})
    assert (record.train_rows, record.test_rows) == (6, 2)
    assert opened == [(url, {"key": "k"})] * 2

    bad = "memory://finance-qlora-tests/bad.jsonl"
    fsspec.filesystem("memory").pipe(bad, b'{"instruction": "Q", "input": ""}\n')
    with pytest.raises(DataError, match=f"^data {bad}: missing column"):
        write_splits(resolve_version(bad), data, tmp_path / "bad")


def test_row_ranks_are_stable_across_releases():
    """Which rows are test rows must not change with the project's version: a store's champion
    was scored on them, and data that grows keeps them out of training only if ranks hold."""
    from finance_qlora.data import row_rank

    row = {"instruction": "What is a bond?", "input": "", "output": "A loan to an issuer."}
    expected = "0213db57ab2d0fe4d267345f4f834b7a2afc64d36cb044d4d03b4981b51c5379"
    assert row_rank(row, 42) == expected
    assert row_rank(row, 43) != expected


def test_write_splits_follows_the_seed_the_validation_rows_and_evaluate_on(write_rows, tmp_path):
    path = write_rows(make_rows(30))
    source = resolve_version(str(path))
    base = {"dataset": str(path), "train_size": 16, "test_size": 6, "seed": 0}
    plain = write_splits(source, DataConfig(**base), tmp_path / "plain")
    reseeded = write_splits(source, DataConfig(**base | {"seed": 1}), tmp_path / "seed")
    assert read_jsonl(plain.test_path) != read_jsonl(reseeded.test_path)
    carved = write_splits(source, DataConfig(**base, validation_size=5), tmp_path / "carved")
    assert (carved.train_rows, carved.test_rows) == (16, 6)  # 5 more rows set aside
    assert read_jsonl(carved.test_path) == read_jsonl(plain.test_path)
    assert read_jsonl(carved.train_path) != read_jsonl(plain.train_path)
    scored = write_splits(
        source,
        DataConfig(**base, validation_size=5, evaluate_on="validation"),
        tmp_path / "validation",
    )
    assert (scored.train_rows, scored.test_rows) == (16, 5)
    assert read_jsonl(scored.train_path) == read_jsonl(carved.train_path)
    # the validation rows: the first training rows of the plain split, now set aside
    set_aside = [r for r in read_jsonl(plain.train_path) if r not in read_jsonl(carved.train_path)]
    assert read_jsonl(scored.test_path) == set_aside


def test_dedup_rank_and_row_ids_normalise_alike():
    """Whichever copy of a whitespace-variant duplicate survives, it ranks, and is named, as
    the other would: a trained row cannot move into test by which copy dedup kept."""
    from finance_qlora.data import row_id, row_rank

    row = {"instruction": "What is a bond?", "input": "", "output": "A loan to an issuer."}
    variant = {**row, "instruction": "  What is a bond?\n", "output": "A loan to an issuer. "}
    assert drop_duplicates([row, variant]) == [row]
    assert drop_duplicates([variant, row]) == [variant]
    assert row_rank(variant, 42) == row_rank(row, 42)
    assert row_id(variant) == row_id(row) != row_id({**row, "output": "Another answer."})


def test_write_splits_names_each_rows_ids_in_file_order(write_rows, tmp_path):
    from finance_qlora.data import row_id

    path = write_rows(make_rows(30))
    data = DataConfig(dataset=str(path), train_size=12, test_size=6)
    record = write_splits(resolve_version(str(path)), data, tmp_path / "splits")
    ids = json.loads(record.row_ids_path.read_text())
    for split, file in (("train", record.train_path), ("test", record.test_path)):
        assert ids[split] == [row_id(r) for r in read_jsonl(file)]
