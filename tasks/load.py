"""Step 1: resolve the data to a version, read it, check it, and write a seeded disjoint
train/test sample."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from finance_qlora.config import DataConfig
from finance_qlora.data import resolve_version, write_splits
from finance_qlora.records import DataVersion, SplitRecord
from finance_qlora.store import gets_store_credentials
from tasks.identity import StepIdentity, step_key
from tasks.retries import HUB_RETRIES, HUB_RETRY_DELAY_S, retry_unless_bad_input
from tasks.secrets import hf_token
from tasks.store_access import StoreRef, publish, store_of


def data_options(store: StoreRef, dataset: str) -> dict:
    """A data file on the store's kind of file system is read with the store's credentials."""
    return store_of(store).options if gets_store_credentials(dataset, store.url) else {}


@task(
    name="data-version",
    cache_policy=NO_CACHE,  # the point: ask again every run what the data is now
    retries=HUB_RETRIES,
    retry_delay_seconds=HUB_RETRY_DELAY_S,
    retry_condition_fn=retry_unless_bad_input,
)
def data_version(store: StoreRef, data: DataConfig, token_block: str) -> DataVersion:
    token = hf_token(token_block, data.dataset)
    return resolve_version(data.dataset, data.revision, token, data_options(store, data.dataset))


@task(
    name="load",
    cache_policy=StepIdentity(kind="data", entry=__name__),
    retries=HUB_RETRIES,
    retry_delay_seconds=HUB_RETRY_DELAY_S,
    retry_condition_fn=retry_unless_bad_input,
)
def load_splits(
    store: StoreRef, data: DataConfig, source: DataVersion, token_block: str
) -> SplitRecord:
    key = step_key()
    staging = store_of(store).staging("data", key)
    token = hf_token(token_block, data.dataset)
    record = write_splits(
        source, data, staging / "splits", token, data_options(store, source.source)
    )
    return publish(store, record, "data", key)
