"""The benchmark's call timer: every holder of a named function times it, nothing else changes."""

from benchmarks.phases import timed_calls
from finance_qlora import evaluation, files
from finance_qlora.files import read_jsonl, write_jsonl


def test_each_holder_of_a_named_function_is_timed_and_restored(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [{"prompt": "p", "completion": "c"}])
    original = files.read_jsonl
    with timed_calls(("finance_qlora.files:read_jsonl",)) as calls:
        by_module = files.read_jsonl(path)
        by_import = evaluation.read_jsonl(path)  # `from finance_qlora.files import read_jsonl`
    assert by_module == by_import == read_jsonl(path)  # the results as the function gives them
    assert [c["name"] for c in calls] == ["read_jsonl", "read_jsonl"]
    assert all(c["thread"] == "MainThread" and c["seconds"] >= 0 for c in calls)
    assert files.read_jsonl is original and evaluation.read_jsonl is original
