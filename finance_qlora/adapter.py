"""The adapter folder users keep: weights, tokenizer, resolved config and training metrics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from finance_qlora.config import FinetuneConfig
from finance_qlora.errors import FinanceQLoRAError
from finance_qlora.files import atomic_dir, fingerprint
from finance_qlora.modeling import load_tokenizer
from finance_qlora.records import AdapterRecord, TrainRecord

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def save_adapter(
    trained: TrainRecord, cfg: FinetuneConfig, dest: Path, token: str | None = None
) -> AdapterRecord:
    """Write the adapter folder atomically: it appears complete under `dest`, or not at all."""
    for name in ADAPTER_FILES:
        if not (trained.folder / name).is_file():
            raise FinanceQLoRAError(f"adapter: {trained.folder / name} is missing; re-run training")
    with atomic_dir(dest) as tmp:
        for name in ADAPTER_FILES:
            shutil.copy2(trained.folder / name, tmp / name)
        load_tokenizer(cfg.model, token).save_pretrained(tmp)
        (tmp / "finetune_config.json").write_text(cfg.model_dump_json(indent=2))
        metrics = {"steps": trained.steps, "seconds": trained.seconds, "losses": trained.losses}
        (tmp / "training_metrics.json").write_text(json.dumps(metrics, indent=2))
    return AdapterRecord(folder=dest, fingerprint=fingerprint(dest))
