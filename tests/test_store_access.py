"""The store as tasks reach it (tasks/store_access.py), on a local folder and on a real S3
endpoint: publishing a step's folder clears what was staged for it, `local` gives the record's
files on this machine, and Prefect's result storage lives inside the store without saving its
credentials."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pytest

from finance_qlora.records import EvalRecord
from finance_qlora.store import StaleOutput, local_cache
from tasks.store_access import (
    RESULTS,
    StoreRef,
    keep_file,
    kept_file,
    local,
    publish,
    result_storage,
    staged_file,
    store_of,
)


@pytest.fixture(params=["folder", "s3"])
def ref(request, tmp_path, monkeypatch) -> StoreRef:
    monkeypatch.setenv("FINANCE_QLORA_CACHE", str(tmp_path / "cache"))
    if request.param == "folder":
        return StoreRef(url=str(tmp_path / "store"))
    return StoreRef(url=request.getfixturevalue("bucket") + "/runs")


def staged_record(ref: StoreRef, key: str, text: str = "hello") -> EvalRecord:
    """What an evaluate step leaves before publishing: its folder in the staging area, beside
    what served only this try (a checkpoint, say)."""
    staging = store_of(ref).staging("eval", key)
    folder = staging / "eval"
    (folder / "sub").mkdir(parents=True)
    (folder / "predictions.txt").write_text(text)
    (folder / "sub" / "scores.json").write_text("{}")
    (staging / "checkpoint-2").mkdir()
    (staging / "checkpoint-2" / "state.bin").write_bytes(b"only for a retry")
    return EvalRecord(
        folder=folder, fingerprint="", label="a", rows=2, rouge={"rougeL": 0.5}, max_new_tokens=4
    )


def saved_secret(value) -> str:
    from prefect.blocks.system import Secret

    name = f"test-store-{uuid.uuid4().hex[:10]}"
    Secret(value=value).save(name)
    return name


def test_publish_names_the_stores_copy_and_clears_the_staging(ref):
    store = store_of(ref)
    record = staged_record(ref, "k1")
    published = publish(ref, record, "eval", "k1")
    assert published.folder == store.uri("eval", "k1")
    assert store.intact(published.folder, published.fingerprint)
    kept = {"folder", "fingerprint"}
    assert published.model_dump(exclude=kept) == record.model_dump(exclude=kept)
    assert not store.staging("eval", "k1").joinpath("checkpoint-2").exists()
    assert not Path(record.folder).exists()


def test_publishing_an_existing_step_keeps_it_and_still_clears_the_staging(ref):
    first = publish(ref, staged_record(ref, "k1", text="first"), "eval", "k1")
    again = publish(ref, staged_record(ref, "k1", text="second"), "eval", "k1")
    assert (again.folder, again.fingerprint) == (first.folder, first.fingerprint)
    assert not store_of(ref).staging("eval", "k1").joinpath("checkpoint-2").exists()
    assert (local(ref, again).path / "predictions.txt").read_text() == "first"


def test_a_crashed_trys_staging_is_removed_once_a_week_untouched(ref):
    """Publishing clears a step's staging; a crashed try's stays for its retry, then goes."""
    store = store_of(ref)
    crashed, resumed, checkpointed = (
        staged_record(ref, key).path.parent for key in ("crashed", "resumed", "checkpointed")
    )
    for folder in (crashed, resumed, checkpointed):
        for path in [folder, *folder.rglob("*")]:
            os.utime(path, (time.time() - 7 * 24 * 3600 - 60,) * 2)
    (checkpointed / "checkpoint-2" / "state.bin").touch()  # a retry in progress wrote it

    assert store.staging("eval", "resumed") == resumed  # a retry a week late finds its folder
    assert not crashed.exists()  # never retried: removed
    for folder in (resumed, checkpointed):
        assert (folder / "checkpoint-2" / "state.bin").is_file()
    store.staging("train", "new")
    assert resumed.exists()  # marked live by its retry, though it only read its checkpoints


def test_local_gives_the_records_files_on_this_machine(ref):
    store = store_of(ref)
    published = publish(ref, staged_record(ref, "k1"), "eval", "k1")
    here = local(ref, published)
    assert (here.path / "predictions.txt").read_text() == "hello"
    assert (here.path / "sub" / "scores.json").read_text() == "{}"
    assert here.model_dump(exclude={"folder"}) == published.model_dump(exclude={"folder"})
    if store.is_local:  # the store's folder itself, no copy
        assert here.path == Path(store.path("eval", "k1"))
    else:  # a verified download, kept by content
        assert here.path.is_relative_to(local_cache())


def test_local_of_a_vanished_or_changed_folder_is_stale(ref):
    store = store_of(ref)
    published = publish(ref, staged_record(ref, "k1"), "eval", "k1")
    store.fs.pipe_file(store.path("eval", "k1", "predictions.txt"), b"changed on the store")
    if store.is_local:  # (from a bucket, this process keeps what it published, by content)
        with pytest.raises(StaleOutput, match="files changed on the store"):
            local(ref, published)
    store.remove(published.folder)
    with pytest.raises(StaleOutput, match="missing or changed on the store"):
        local(ref, published)


def test_one_store_per_reference(tmp_path):
    """The store (and its Secret block) is opened once per process, not once per step."""
    url = str(tmp_path / "store")
    assert store_of(StoreRef(url=url)) is store_of(StoreRef(url=url))


def test_the_store_block_gives_the_stores_options(prefect_api, tmp_path):
    options = {"auto_mkdir": True}
    ref = StoreRef(url=str(tmp_path / "store"), secret=saved_secret(options))
    assert store_of(ref).options == options
    assert store_of(StoreRef(url=ref.url)).options == {}
    assert ref.model_dump() == {"url": ref.url, "secret": ref.secret}  # a name, no options


def test_results_of_a_local_store_are_a_folder_inside_it(tmp_path):
    ref = StoreRef(url=str(tmp_path / "store"))
    assert result_storage(ref) == tmp_path / "store" / RESULTS


def test_results_on_a_bucket_are_a_saved_block_without_the_credentials(
    prefect_api, redaction, bucket, s3_endpoint
):
    from prefect.client.orchestration import get_client

    options = {
        "key": s3_endpoint["AWS_ACCESS_KEY_ID"],
        "secret": "a-secret-access-key-for-results",
        "client_kwargs": {"endpoint_url": s3_endpoint["AWS_ENDPOINT_URL"]},
    }
    ref = StoreRef(url=f"{bucket}/runs", secret=saved_secret(options))
    storage = result_storage(ref)
    assert storage.basepath == f"{bucket}/runs/{RESULTS}"
    assert storage.settings == options  # this process's copy reaches the store
    storage.write_path("probe", b"a persisted result")
    assert store_of(ref).read_text(RESULTS, "probe") == "a persisted result"

    with get_client(sync_client=True) as client:
        saved = [
            document
            for document in client.read_block_documents()
            if document.data.get("basepath") == storage.basepath
        ]
    assert len(saved) == 1 and saved[0].name.startswith("finance-qlora-results-")
    assert "a-secret-access-key-for-results" not in json.dumps(saved[0].data, default=str)


def test_a_kept_file_reaches_every_worker_verified(ref, tmp_path, monkeypatch):
    """A file the store keeps for every worker (the compiled layers): staged by each process in
    a folder of its own, kept once written, handed out only while the store's copy is what its
    manifest says, and replaced when told."""
    assert kept_file(ref, "compiled", "k1", "artifacts.bin") == (None, "missing")
    path = staged_file(ref, "compiled", "k1", "artifacts.bin")
    assert path.parent != staged_file(ref, "compiled", "k1", "artifacts.bin").parent
    path.write_bytes(b"compiled")
    keep_file(ref, "compiled", "k1", path)
    assert not path.parent.exists()  # moved into the store, or removed
    monkeypatch.setenv("FINANCE_QLORA_CACHE", str(tmp_path / "another-worker"))
    found, state = kept_file(ref, "compiled", "k1", "artifacts.bin")
    assert state == "found" and found.read_bytes() == b"compiled"

    # another worker's copy, kept first, stays
    late = staged_file(ref, "compiled", "k1", "artifacts.bin")
    late.write_bytes(b"compiled later")
    keep_file(ref, "compiled", "k1", late)
    monkeypatch.setenv("FINANCE_QLORA_CACHE", str(tmp_path / "a-third-worker"))
    assert kept_file(ref, "compiled", "k1", "artifacts.bin")[0].read_bytes() == b"compiled"

    # changed on the store since, to as many bytes (an object store compares sizes): not
    # handed out, and replaced when told
    store = store_of(ref)
    store.fs.pipe_file(store.path("compiled", "k1", "artifacts.bin"), b"compilex")
    monkeypatch.setenv("FINANCE_QLORA_CACHE", str(tmp_path / "a-fourth-worker"))
    assert kept_file(ref, "compiled", "k1", "artifacts.bin") == (None, "damaged")
    path = staged_file(ref, "compiled", "k1", "artifacts.bin")
    path.write_bytes(b"compiled again")
    keep_file(ref, "compiled", "k1", path, replace=True)
    monkeypatch.setenv("FINANCE_QLORA_CACHE", str(tmp_path / "a-fifth-worker"))
    found, state = kept_file(ref, "compiled", "k1", "artifacts.bin")
    assert state == "found" and found.read_bytes() == b"compiled again"
