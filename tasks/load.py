"""Step 1: read Finance-Alpaca, check it, and write a seeded disjoint train/test sample."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from finance_qlora.config import DataConfig
from finance_qlora.data import local_path, write_splits
from finance_qlora.files import fingerprint
from finance_qlora.records import SplitRecord
from tasks.common import (
    CACHE_POLICY,
    HUB_RETRIES,
    HUB_RETRY_DELAY_S,
    hf_token,
    retry_unless_bad_input,
    step_dir,
)


def source_fingerprint(data: DataConfig) -> str:
    """Identifies the source rows: a local file's bytes, or a hub id at a revision."""
    path = local_path(data.dataset)
    return fingerprint(path) if path else f"hub:{data.dataset}@{data.revision or 'main'}"


@task(
    name="load",
    cache_policy=CACHE_POLICY,
    persist_result=True,
    retries=HUB_RETRIES,
    retry_delay_seconds=HUB_RETRY_DELAY_S,
    retry_condition_fn=retry_unless_bad_input,
)
def load_splits(data: DataConfig, source: str, output_dir: Path, token_block: str) -> SplitRecord:
    out = step_dir(output_dir, "data", data, source) / "splits"
    token = hf_token(token_block, data.dataset)
    return write_splits(
        data.dataset, data.revision, data.train_size, data.test_size, data.seed, out, token
    )
