"""Checks that run before any data is split or any GPU time is spent: one clear line each."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from finance_qlora import builtin_models
from finance_qlora.config import FinetuneConfig
from finance_qlora.data import check_rows, drop_duplicates, local_path, read_rows, split_rows
from finance_qlora.errors import ConfigError
from finance_qlora.training import check_targets


def check_output_dir(output_dir: Path) -> None:
    """The output folder exists or can be made, and a file can be written in it."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"output_dir: cannot write to {output_dir} ({exc.strerror or exc}); "
            "choose a writable folder with --output-dir"
        ) from None


def check_local_data(config: FinetuneConfig) -> None:
    """A local data file is read and checked whole (a hub data set is checked when loaded)."""
    data = config.data
    if local_path(data.dataset) is not None:
        rows = drop_duplicates(check_rows(read_rows(data.dataset), data.dataset))
        split_rows(rows, data.train_size, data.test_size, data.seed)


def check_quantization(config: FinetuneConfig) -> None:
    if config.model.load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "model.load_in_4bit: bitsandbytes is not installed on this machine; "
            "pip install bitsandbytes, or set model.load_in_4bit=false"
        )


def check_lora_targets(config: FinetuneConfig, token: str | None = None) -> None:
    """The LoRA target modules exist in the model, found on the meta device (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    targets = config.lora.target_modules
    if targets == ["all-linear"]:
        return
    try:
        model_config = AutoConfig.from_pretrained(
            builtin_models.resolve(config.model.name),
            revision=config.model.revision,
            token=token,
            trust_remote_code=config.model.trust_remote_code,
        )
    except OSError:  # unreachable hub: the load task reports it (and retries)
        return
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            model_config, trust_remote_code=config.model.trust_remote_code
        )
    check_targets(model, targets, config.model.name)


def is_hub_model(name: str) -> bool:
    return not (name.startswith("builtin:") or Path(name).exists())


def check_hub_access(config: FinetuneConfig, token: str | None) -> None:
    """A gated or private hub model needs a token; offline, nothing can be told: skip."""
    name = config.model.name
    if not is_hub_model(name) or os.environ.get("HF_HUB_OFFLINE"):
        return
    from huggingface_hub import model_info
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        model_info(name, revision=config.model.revision, token=token)
    except GatedRepoError:
        raise ConfigError(
            f"model.name: {name} is gated and no token was given; accept its licence on the "
            f"Hub, then save a token in the Prefect Secret block "
            f"'{config.model.hf_token_secret}' or set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise ConfigError(
            f"model.name: {name} not found on the Hub (or private without a token)"
        ) from None
    except Exception:  # no network or a hub hiccup: nothing can be told here, the load will
        return


def preflight(config: FinetuneConfig, get_token: Callable[[], str | None] = lambda: None) -> None:
    """Every check, cheapest first; the token is looked up only for a hub model."""
    check_output_dir(config.output_dir)
    check_quantization(config)
    check_local_data(config)
    token = get_token() if is_hub_model(config.model.name) else None
    check_hub_access(config, token)
    check_lora_targets(config, token)
