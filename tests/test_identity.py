"""The step identity and its persisted results (tasks/identity.py): only plain JSON of the
project's records is written or read back; anything else found under a key is removed, never
run, and the step recomputed."""

from __future__ import annotations

import json
import pickle

import pytest

from finance_qlora.records import EvalRecord
from finance_qlora.store import Store
from tasks.identity import RecordSerializer, drop_stale_result
from tasks.store_access import RESULTS, StoreRef


class Planted:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_the_serializer_writes_and_reads_records_only(tmp_path):
    serializer = RecordSerializer()
    record = EvalRecord(folder="x", fingerprint="f", label="a", rows=1, rouge={}, max_new_tokens=1)
    assert serializer.loads(serializer.dumps(record)) == record
    for other in ({"a": 1}, "text", Planted(str(tmp_path / "ran"))):
        with pytest.raises(TypeError, match="only finance-qlora records"):
            serializer.dumps(other)
    with pytest.raises(ValueError):
        serializer.loads(pickle.dumps(Planted(str(tmp_path / "ran"))))
    with pytest.raises(ValueError):
        serializer.loads(json.dumps({"record": "Popen", "data": {}}).encode())
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("binary", [True, False])
def test_a_planted_result_is_removed_unexecuted(tmp_path, binary):
    """A pickle (raw bytes, or Prefect's JSON wrapper naming the pickle serializer) planted in
    the shared results folder: removed at the next lookup, its code never run."""
    store = StoreRef(url=str(tmp_path / "store"))
    marker = tmp_path / "ran"
    blob = pickle.dumps(Planted(str(marker)))
    if not binary:
        import base64

        blob = json.dumps(
            {
                "metadata": {"serializer": {"type": "pickle"}},
                "result": base64.b64encode(blob).decode(),
            }
        ).encode()
    folder = Store(store.url)
    folder.fs.makedirs(folder.path(RESULTS), exist_ok=True)
    folder.fs.pipe_file(folder.path(RESULTS, "k"), blob)
    drop_stale_result(store, "eval", "k")
    assert not folder.fs.exists(folder.path(RESULTS, "k"))
    assert not marker.exists()
