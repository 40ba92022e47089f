"""Bad store and data URLs: one `error:` line and exit code 2 before any model is loaded, and
nothing written to the store."""

from __future__ import annotations

import pytest
import s3fs

from flows.finetune import main
from tests.conftest import make_rows

TINY = ["--preset", "tiny-cpu"]


@pytest.fixture(autouse=True)
def fresh_filesystems():
    """fsspec caches file system instances by their arguments, not the environment: tests that
    change the endpoint or credentials must not leave an instance behind."""
    yield
    s3fs.S3FileSystem.clear_instance_cache()


def one_line(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize(
    "url, expected",
    [
        ("ftp://host/runs", "output_dir: unsupported URL scheme 'ftp'"),
        ("s3:///runs", "output_dir: s3:///runs names no bucket"),
        ("", "output_dir: String should have at least 1 character"),
    ],
)
def test_malformed_store_urls(capsys, url, expected):
    assert expected in one_line(capsys, [*TINY, "--output-dir", url])


def test_a_bucket_that_does_not_exist(capsys, s3_endpoint):
    line = one_line(capsys, [*TINY, "--output-dir", "s3://no-such-bucket-here/runs"])
    assert "output_dir: cannot write to s3://no-such-bucket-here/runs (" in line


def test_missing_credentials(capsys, bucket, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookups
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    line = one_line(capsys, [*TINY, "--output-dir", f"{bucket}/runs"])
    assert f"output_dir: cannot write to {bucket}/runs (" in line and "credentials" in line


def test_an_unreachable_store(capsys, monkeypatch, s3_endpoint):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    line = one_line(capsys, [*TINY, "--output-dir", "s3://bucket/runs"])
    assert "output_dir: cannot write to s3://bucket/runs (" in line


def test_a_missing_data_url_writes_nothing(capsys, bucket, tmp_path):
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    line = one_line(
        capsys, [*TINY, "--output-dir", f"{bucket}/runs", "--data", f"{bucket}/in/rows.jsonl"]
    )
    assert f"data file {bucket}/in/rows.jsonl does not exist on the store" in line
    assert fs.ls(bucket, refresh=True) == []  # not even the store's folder
    local = tmp_path / "store"
    one_line(capsys, [*TINY, "--output-dir", str(local), "--data", str(tmp_path / "x.jsonl")])
    assert not local.exists()


def test_data_on_the_store_is_checked_whole_before_any_work(capsys, bucket, tmp_path):
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    rows = "".join(__import__("json").dumps(r) + "\n" for r in make_rows(10))
    fs.pipe(f"{bucket}/in/rows.jsonl", rows.encode())
    line = one_line(
        capsys, [*TINY, "--output-dir", f"{bucket}/runs", "--data", f"{bucket}/in/rows.jsonl"]
    )
    assert "data.train_size + data.test_size = 36 exceeds the 10 distinct rows" in line
    assert fs.ls(bucket, refresh=True) == [f"{bucket.removeprefix('s3://')}/in"]
