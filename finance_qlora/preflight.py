"""Checks that run before any data is split or any GPU time is spent: one clear line each."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from finance_qlora import builtin_models
from finance_qlora.config import FinetuneConfig
from finance_qlora.data import (
    check_rows,
    drop_duplicates,
    hub_revision,
    is_store_url,
    local_path,
    read_rows,
    split_rows,
)
from finance_qlora.errors import ConfigError
from finance_qlora.store import Store
from finance_qlora.training import check_targets


def check_data(config: FinetuneConfig, token: str | None, options: dict[str, Any]) -> None:
    """A data file (local or on a store) is read and checked whole; a hub data set is looked up
    (a missing one is bad input; an unreachable hub is left to the load step's retries)."""
    data = config.data
    if local_path(data.dataset) is not None or is_store_url(data.dataset):
        same_store = urlsplit(data.dataset).scheme in config.output_dir
        rows = read_rows(data.dataset, options=options if same_store else None)
        rows = drop_duplicates(check_rows(rows, data.dataset))
        split_rows(rows, data.train_size, data.test_size, data.seed, data.validation_size)
        return
    try:
        hub_revision(data.dataset, data.revision, token)
    except (OSError, ConnectionError, TimeoutError):
        return


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


def preflight(
    config: FinetuneConfig,
    get_token: Callable[[], str | None] = lambda: None,
    store_options: dict[str, Any] | None = None,
) -> None:
    """Every check, cheapest first, before anything is written; the token is looked up only
    for a hub model or data set."""
    store = Store(config.output_dir, store_options or {})  # a malformed URL fails here
    check_quantization(config)
    hub_data = local_path(config.data.dataset) is None and not is_store_url(config.data.dataset)
    hub = is_hub_model(config.model.name) or hub_data
    token = get_token() if hub else None
    check_data(config, token, store.options)
    check_hub_access(config, token)
    check_lora_targets(config, token)
    store.check_writable()
