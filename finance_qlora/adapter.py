"""The adapter folder users keep: weights, tokenizer, the settings that made it, and metrics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from finance_qlora.config import ModelConfig
from finance_qlora.errors import FinanceQLoRAError
from finance_qlora.files import atomic_dir, fingerprint
from finance_qlora.modeling import load_tokenizer
from finance_qlora.records import AdapterRecord, TrainRecord

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def normalize_adapter_config(folder: Path, base_model: str, revision: str | None = None) -> None:
    """PEFT writes `target_modules` in set order, which follows PYTHONHASHSEED, and the base
    model as this machine's path to it: sort the one, name the other as configured (with the
    revision it was trained on), so the same weights always give the same bytes, and one
    adapter id, on every machine."""
    path = Path(folder) / "adapter_config.json"
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config["base_model_name_or_path"] = base_model
    config["revision"] = revision
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_adapter(
    trained: TrainRecord,
    model: ModelConfig,
    settings: dict[str, Any],
    dest: Path,
    token: str | None = None,
    trained_rows: list[str] | None = None,
) -> AdapterRecord:
    """Write the adapter folder atomically: it appears complete under `dest`, or not at all.

    `settings` are what made the weights (model, LoRA, training, data version): nothing that
    only changes evaluation or promotion goes in, so those never make a new adapter.
    `trained_rows`: the ids of the rows it trained on (train_rows.json), so that the gate
    never scores it on them."""
    for name in ADAPTER_FILES:
        if not (trained.path / name).is_file():
            raise FinanceQLoRAError(f"adapter: {trained.path / name} is missing; re-run training")
    with atomic_dir(dest) as tmp:
        for name in ADAPTER_FILES:
            shutil.copy2(trained.path / name, tmp / name)
        normalize_adapter_config(tmp, model.name, model.revision)
        (tmp / "train_rows.json").write_text(json.dumps(sorted(trained_rows or [])))
        load_tokenizer(model, token).save_pretrained(tmp)
        (tmp / "training_settings.json").write_text(json.dumps(settings, indent=2, sort_keys=True))
        metrics = {"steps": trained.steps, "seconds": trained.seconds, "losses": trained.losses}
        (tmp / "training_metrics.json").write_text(json.dumps(metrics, indent=2))
    return AdapterRecord(folder=dest, fingerprint=fingerprint(dest))
