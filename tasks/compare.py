"""Then: pretrained vs fine-tuned ROUGE, saved and published as Prefect artifacts."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from finance_qlora.config import BootstrapSettings
from finance_qlora.records import ComparisonRecord, EvalRecord
from finance_qlora.report import compare, rouge_table
from tasks.common import CACHE_POLICY, step_dir


@task(name="compare", cache_policy=CACHE_POLICY, persist_result=True)
def compare_rouge(
    pretrained: EvalRecord,
    finetuned: EvalRecord,
    bootstrap: BootstrapSettings,
    output_dir: Path,
) -> ComparisonRecord:
    out = step_dir(output_dir, "reports", pretrained.fingerprint, finetuned.fingerprint, bootstrap)
    record = compare(pretrained, finetuned, bootstrap, out)
    create_table_artifact(
        rouge_table(record.rouge),
        key="rouge",
        description="ROUGE F1, pretrained vs fine-tuned, with 95% paired-bootstrap intervals",
    )
    create_markdown_artifact(
        record.markdown, key="rouge-report", description="ROUGE comparison and sample predictions"
    )
    return record
