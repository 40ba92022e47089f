"""Then: pretrained vs fine-tuned ROUGE, saved and published as Prefect artifacts."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from finance_qlora.config import BootstrapSettings
from finance_qlora.records import ComparisonRecord, EvalRecord
from finance_qlora.report import compare, rouge_table
from tasks.identity import StepIdentity, step_key
from tasks.store_access import StoreRef, local, publish, store_of


@task(
    name="compare",
    cache_policy=StepIdentity(kind="reports", entry=__name__),
)
def compare_rouge(
    store: StoreRef,
    pretrained: EvalRecord,
    finetuned: EvalRecord,
    bootstrap: BootstrapSettings,
) -> ComparisonRecord:
    key = step_key()
    staging = store_of(store).staging("reports", key) / "report"
    record = compare(local(store, pretrained), local(store, finetuned), bootstrap, staging)
    create_table_artifact(
        rouge_table(record.rouge),
        key="rouge",
        description="ROUGE F1, pretrained vs fine-tuned, with 95% paired-bootstrap intervals",
    )
    create_markdown_artifact(
        record.markdown, key="rouge-report", description="ROUGE comparison and sample predictions"
    )
    return publish(store, record, "reports", key)
