"""benchmarks/result_file.py: a tool's result is stamped with where, when and how it ran, and
named by its kind, card, date and tag."""

import json
import sys

from benchmarks.result_file import result_path, stamp, write_json


def test_a_result_is_stamped_named_and_written(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["mm_host.py", "--tag=-x"])
    stamped = stamp()
    assert stamped["command"] == "mm_host.py --tag=-x" and stamped["torch"]
    assert " " not in stamped["machine"] and len(stamped["date"]) == 10
    path = result_path(tmp_path / "new", "mm-host", stamped, "-x")
    assert path == tmp_path / "new" / f"mm-host-{stamped['machine']}-{stamped['date']}-x.json"
    assert path.parent.is_dir()
    assert result_path(tmp_path, "host-stacks", stamped, suffix=".txt").suffix == ".txt"
    assert json.loads(write_json(path, stamped | {"n": 1}).read_text()) == stamped | {"n": 1}
