"""A merged export: the base model's weights dequantized from NF4 (the values the adapter was
trained and scored against, not the original checkpoint's) with the LoRA merged in, saved as a
plain transformers model (safetensors), with the tokenizer and a model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finance_qlora.answering import Gated, adapter_settings
from finance_qlora.config import ModelConfig
from finance_qlora.files import atomic_dir
from finance_qlora.modeling import (
    compute_dtype,
    dequantize_4bit_layers,
    load_model,
    load_tokenizer,
    release_memory,
)
from finance_qlora.store import MANIFEST, Store, folder_manifest, manifest_digest


def merged_model(cfg: ModelConfig, adapter_dir: Path, token: str | None = None):
    """The base model as the adapter saw it (4-bit layers dequantized once into the compute
    dtype), the adapter merged in; a plain model that needs no bitsandbytes or PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = compute_dtype(cfg.compute_dtype)
    model = load_model(cfg, token)
    if cfg.load_in_4bit:
        dequantize_4bit_layers(model, dtype)
    model = PeftModel.from_pretrained(
        model, str(adapter_dir), is_trainable=False, use_safetensors=True
    ).merge_and_unload()
    # A fresh model from the config without its quantization: nothing in the saved config or
    # weights asks for bitsandbytes when loaded.
    config = model.config
    config.__dict__.pop("quantization_config", None)
    config.dtype = dtype
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()}, strict=True)
    plain.generation_config = model.generation_config
    del model
    release_memory()
    return plain.eval()


def model_card(gated: Gated, settings: dict[str, Any]) -> str:
    model = settings["model"]
    scores = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(gated.scores.items()))
    recipe = {k: settings.get(k) for k in ("lora", "train")}
    return "\n".join(
        [
            "---",
            f"base_model: {model['name']}",
            "library_name: transformers",
            "tags: [finance, qlora, lora-merged]",
            "---",
            "",
            "# finance-qlora merged export",
            "",
            f"- base model: `{model['name']}` at revision `{model.get('revision') or 'default'}`",
            f"- data version: `{settings.get('data_version')}`",
            f"- adapter: `{gated.folder}` (fingerprint `{gated.fingerprint}`)",
            "- weights: the base model's NF4 weights dequantized (the values the adapter was "
            "trained and scored against), with the LoRA merged in",
            "",
            "## ROUGE at the promotion gate",
            "",
            "| metric | score |",
            "|---|---|",
            scores or "| (not scored by the gate) | |",
            "",
            "## Recipe",
            "",
            "```json",
            json.dumps(recipe, indent=2, sort_keys=True),
            "```",
            "",
            "Prompt template: the Alpaca template of finance_qlora/prompts.py; generation stops "
            "at the model's end-of-turn tokens.",
            "",
        ]
    )


def export_merged(
    gated: Gated, adapter_dir: Path, dest: Path, token: str | None = None
) -> ModelConfig:
    """Write the merged model, tokenizer and model card to `dest` (a local folder), whole."""
    settings = adapter_settings(adapter_dir)
    cfg = ModelConfig.model_validate(settings["model"])
    model = merged_model(cfg, adapter_dir, token)
    with atomic_dir(dest) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(cfg, token).save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(gated, settings))
    return cfg


def upload(folder: Path, url: str, options: dict[str, Any] | None = None) -> str:
    """A finished local folder to a store URL, files first and MANIFEST.json last (a folder
    without it is unfinished); returns its fingerprint."""
    target = Store(url, options or {})
    if target.manifest(target.url) is not None:
        target.remove(target.url)  # an older export: its manifest goes first
    files = folder_manifest(folder)
    for name in files:
        target.fs.put_file(str(folder / name), target.path(name))
    sizes = {name: (folder / name).stat().st_size for name in files}
    document = {"files": files, "sizes": sizes}
    target.write_text(json.dumps(document, indent=1, sort_keys=True), MANIFEST)
    return manifest_digest(files)
