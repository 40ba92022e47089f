"""Step 5: the versioned adapter folder (weights, tokenizer, config, metrics), atomically."""

from __future__ import annotations

import shutil

from prefect import task
from prefect.transactions import Transaction, get_transaction

from finance_qlora.adapter import save_adapter as write_adapter
from finance_qlora.config import FinetuneConfig
from finance_qlora.records import AdapterRecord, TrainRecord
from tasks.common import CACHE_POLICY, hf_token


@task(name="save-adapter", cache_policy=CACHE_POLICY, persist_result=True)
def save_adapter(trained: TrainRecord, config: FinetuneConfig) -> AdapterRecord:
    # The version is the trained weights' fingerprint: one folder per distinct adapter.
    slug = config.model.name.replace("/", "--").replace(":", "-")
    dest = config.output_dir / "adapters" / f"{slug}-{trained.fingerprint[:12]}"
    transaction = get_transaction()
    if transaction is not None:
        transaction.set("adapter_folder", str(dest))  # for the rollback hook below
    return write_adapter(
        trained, config, dest, token=hf_token(config.model.hf_token_secret, config.model.name)
    )


@save_adapter.on_rollback
def remove_adapter(transaction: Transaction) -> None:
    """The adapter lost to the champion (or a later step failed): remove what this run saved."""
    folder = transaction.get("adapter_folder", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
