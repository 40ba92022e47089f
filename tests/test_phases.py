"""The benchmark's call timer: every holder of a named function times it, nothing else changes."""

import sys

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


def test_a_module_imported_within_the_block_gets_the_original_back(tmp_path, monkeypatch):
    (tmp_path / "late_holder.py").write_text("from finance_qlora.files import read_jsonl\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "late_holder", raising=False)
    original = files.read_jsonl
    with timed_calls(("finance_qlora.files:read_jsonl",)):
        import late_holder

        assert late_holder.read_jsonl is not original  # it took the wrapper
    assert late_holder.read_jsonl is original
