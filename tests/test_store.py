"""The durable store on a local folder, a file:// URL and a real S3 endpoint: immutable
folders whose manifest is written last, verified reads, atomic small objects."""

from __future__ import annotations

import json

import pytest

from finance_qlora.errors import ConfigError
from finance_qlora.store import MANIFEST, StaleOutput, Store, normalize_url


@pytest.fixture(params=["folder", "file-url", "s3"])
def store(request, tmp_path, monkeypatch):
    monkeypatch.setenv("FINANCE_QLORA_CACHE", str(tmp_path / "cache"))
    if request.param == "folder":
        return Store(str(tmp_path / "store"))
    if request.param == "file-url":
        return Store(f"file://{tmp_path}/store")
    return Store(request.getfixturevalue("bucket") + "/runs")


def local_folder(tmp_path, name="out", text="hello"):
    folder = tmp_path / name
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(text)
    (folder / "sub" / "b.json").write_text("{}")
    return folder


def test_publish_then_read_back_verified(store, tmp_path):
    uri, digest = store.publish(local_folder(tmp_path), "eval", "k1")
    assert uri == store.uri("eval", "k1") and store.intact(uri, digest)
    copy = store.materialize(uri, digest)
    assert (copy / "a.txt").read_text() == "hello" and (copy / "sub" / "b.json").is_file()


def test_a_published_folder_is_immutable(store, tmp_path):
    uri, first = store.publish(local_folder(tmp_path, "one", "first"), "eval", "k1")
    _, second = store.publish(local_folder(tmp_path, "two", "second"), "eval", "k1")
    assert second == first  # the complete folder already there is kept
    assert (store.materialize(uri, first) / "a.txt").read_text() == "first"


def test_a_killed_upload_is_not_a_folder(store, tmp_path):
    """Files without their manifest (an upload killed before its last write) are unfinished:
    never intact, never read, and completed by the next publish."""
    folder = local_folder(tmp_path)
    for name in ("a.txt", "sub/b.json"):
        store.fs.makedirs(store.path("eval", "k1", name).rsplit("/", 1)[0], exist_ok=True)
        store.fs.pipe_file(store.path("eval", "k1", name), (folder / name).read_bytes())
    uri = store.uri("eval", "k1")
    assert store.manifest(uri) is None
    with pytest.raises(StaleOutput):
        store.materialize(uri, "anything")
    uri, digest = store.publish(folder, "eval", "k1")
    assert store.intact(uri, digest)


def test_changed_or_vanished_files_are_stale(store, tmp_path):
    uri, digest = store.publish(local_folder(tmp_path), "eval", "k1")
    store.fs.pipe_file(store.path("eval", "k1", "a.txt"), b"tampered")
    if store.is_local:  # a local store is read in place: every read checks the bytes
        with pytest.raises(StaleOutput):
            store.materialize(uri, digest)
    store.fs.rm_file(store.path("eval", "k1", "sub", "b.json"))
    assert not store.intact(uri, digest)
    store.remove(uri)
    assert not store.intact(uri, digest)


def test_small_objects_are_replaced_whole(store):
    assert store.read_text("registry", "champion.json") is None
    store.write_text(json.dumps({"v": 1}), "registry", "champion.json")
    store.write_text(json.dumps({"v": 2}), "registry", "champion.json")
    assert json.loads(store.read_text("registry", "champion.json")) == {"v": 2}
    assert store.listdir("registry") == ["champion.json"]  # no temporary files left


def test_writable_check_leaves_nothing(store):
    store.check_writable()
    assert store.listdir() == []


@pytest.mark.parametrize(
    "url, message",
    [
        ("", "output_dir: empty"),
        ("ftp://host/runs", "unsupported URL scheme 'ftp'"),
        ("s3:///runs", "names no bucket"),
    ],
)
def test_malformed_urls_get_one_line(url, message):
    with pytest.raises(ConfigError, match=message):
        normalize_url(url)


def test_unwritable_and_unreachable_stores(tmp_path, s3_endpoint, monkeypatch):
    with pytest.raises(ConfigError, match="output_dir: cannot write to"):
        Store("/proc/finance-qlora/runs").check_writable()
    with pytest.raises(ConfigError, match="output_dir: cannot write to s3://no-such-bucket-"):
        Store("s3://no-such-bucket-x1/runs").check_writable()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(ConfigError, match="output_dir: cannot write to"):
        Store("s3://bucket/runs").check_writable()


def test_manifest_is_written_last(tmp_path, bucket, monkeypatch):
    store = Store(bucket + "/runs")
    order = []
    real = store.fs.pipe_file

    def spy(path, data, **kwargs):
        order.append(path.rsplit("/", 1)[-1])
        return real(path, data, **kwargs)

    monkeypatch.setattr(
        store.fs, "put_file", lambda src, dst, **kw: spy(dst, open(src, "rb").read())
    )
    monkeypatch.setattr(store.fs, "pipe_file", spy)
    store.publish(local_folder(tmp_path), "eval", "k1")
    assert order[-1] == MANIFEST and sorted(order[:-1]) == ["a.txt", "b.json"]


def test_a_damaged_folder_is_replaced_on_publish(store, tmp_path):
    uri, digest = store.publish(local_folder(tmp_path, "one"), "eval", "k1")
    store.fs.rm_file(store.path("eval", "k1", "a.txt"))
    again, second = store.publish(local_folder(tmp_path, "two"), "eval", "k1")
    assert second == digest and store.intact(again, second)


def test_a_download_with_one_changed_file_of_the_same_size_is_refused(
    bucket, tmp_path, monkeypatch
):
    """On an object store `intact` checks sizes only; the download itself is checked against
    every file's sha256 in the manifest."""
    monkeypatch.setenv("FINANCE_QLORA_CACHE", str(tmp_path / "cache"))
    store = Store(bucket + "/runs")
    uri, digest = store.publish(local_folder(tmp_path, text="hello"), "prompts", "k1")
    store.fs.pipe_file(store.path("prompts", "k1", "a.txt"), b"jello")  # same size
    import shutil

    shutil.rmtree(tmp_path / "cache")  # no verified copy on this machine: a download
    assert store.intact(uri, digest)  # the sizes alone cannot tell
    with pytest.raises(StaleOutput, match="changed"):
        store.materialize(uri, digest)
    assert not (tmp_path / "cache" / "objects" / digest).exists()


@pytest.mark.parametrize(
    ("url", "store_url", "gets"),
    [
        ("s3://bucket/incoming/rows.jsonl", "s3://bucket/runs", True),
        ("s3://other-bucket/rows.jsonl", "s3://bucket/runs", True),  # the same provider's keys
        ("gs://bucket/rows.jsonl", "s3://bucket/runs", False),
        ("/data/rows.jsonl", "s3://bucket/runs", False),
        ("file:///data/rows.jsonl", "/mnt/store", False),
        ("s3://bucket/rows.jsonl", "/mnt/s3-store", False),  # a path containing "s3"
    ],
)
def test_one_rule_says_which_data_urls_get_the_stores_credentials(url, store_url, gets):
    from finance_qlora.store import gets_store_credentials

    assert gets_store_credentials(url, store_url) is gets


def test_preflight_and_load_ask_the_same_rule():
    import inspect

    import finance_qlora.preflight
    import tasks.load

    for module in (finance_qlora.preflight, tasks.load):
        assert "gets_store_credentials(" in inspect.getsource(module)
