"""Checks that run before any data is split or any GPU time is spent: one clear line each."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finance_qlora import builtin_models
from finance_qlora.config import FinetuneConfig
from finance_qlora.data import (
    check_rows,
    drop_duplicates,
    hub_offline,
    hub_revision,
    is_store_url,
    local_path,
    read_rows,
    split_rows,
)
from finance_qlora.errors import ConfigError
from finance_qlora.prompts import fit_prompts, prompt_length, shortest_form, to_prompt_completion
from finance_qlora.registry import read_champion
from finance_qlora.store import Store, gets_store_credentials
from finance_qlora.toolchain import triton_missing
from finance_qlora.training import check_targets, no_row_fits, row_length

Rows = list[dict[str, str]]


def check_data(
    config: FinetuneConfig, token: str | None, options: dict[str, Any]
) -> tuple[Rows, Rows] | None:
    """A data file (local or on a store) is read and checked whole, and its training rows and
    the rows evaluated (test or validation) returned; a hub data set is looked up (a missing
    one is bad input; an unreachable hub is left to the load step's retries) and None
    returned."""
    data = config.data
    if local_path(data.dataset) is not None or is_store_url(data.dataset):
        same_store = gets_store_credentials(data.dataset, config.output_dir)
        rows = read_rows(data.dataset, options=options if same_store else None)
        rows = drop_duplicates(check_rows(rows, data.dataset))
        train, test, validation = split_rows(
            rows, data.train_size, data.test_size, data.seed, data.validation_size
        )
        return train, validation if data.evaluate_on == "validation" else test
    try:
        hub_revision(data.dataset, data.revision, token)
    except (OSError, ConnectionError, TimeoutError):
        pass
    return None


def check_quantization(config: FinetuneConfig) -> None:
    if config.model.load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "model.load_in_4bit: bitsandbytes is not installed on this machine; "
            "pip install bitsandbytes, or set model.load_in_4bit=false"
        )


def check_fused_kernels(config: FinetuneConfig) -> None:
    """Liger's kernels are Triton GPU kernels: CUDA, Triton and the liger-kernel package."""
    if not config.train.fused_kernels:
        return
    import torch

    missing = None
    if not torch.cuda.is_available():
        missing = "this machine has no CUDA GPU"
    elif importlib.util.find_spec("liger_kernel") is None:
        missing = "liger-kernel is not installed (pip install 'finance-qlora[gpu]')"
    else:
        missing = triton_missing()
    if missing:
        raise ConfigError(
            f"train.fused_kernels: {missing}; set train.fused_kernels=false to train without them"
        )


def check_compile(config: FinetuneConfig) -> None:
    """Compiled layers need a compiler for the device: Triton on a CUDA GPU, a C++ compiler
    on the CPU (inductor builds its CPU kernels with it)."""
    if not config.train.compile:
        return
    import torch

    missing = None
    if torch.cuda.is_available():
        missing = triton_missing()
    else:
        from torch._inductor.cpp_builder import get_cpp_compiler
        from torch._inductor.exc import InvalidCxxCompiler

        try:
            get_cpp_compiler()
        except InvalidCxxCompiler:
            missing = "no CUDA GPU here, and inductor finds no C++ compiler (g++) for the CPU"
    if missing:
        raise ConfigError(
            f"train.compile: {missing}; install it, or set train.compile=false to train eagerly"
        )


def check_decode_kernel(config: FinetuneConfig) -> None:
    """The decode steps' Triton kernel, where a GPU will run it (on the CPU generation attends
    with SDPA, as `decode_attention.decode_kernel` logs)."""
    if config.generation.decode_kernel != "triton":
        return
    import torch

    missing = triton_missing() if torch.cuda.is_available() else None
    if missing:
        raise ConfigError(
            f"generation.decode_kernel: {missing}; install it, or set "
            "generation.decode_kernel=sdpa to attend with torch's kernels"
        )


def check_devices(config: FinetuneConfig) -> None:
    """The GPUs asked for are there (a step's rows split over any number of processes)."""
    from finance_qlora.parallel import process_count

    process_count(config.devices)


def is_hub_model(name: str) -> bool:
    return not (name.startswith("builtin:") or Path(name).exists())


def check_model_name(config: FinetuneConfig) -> None:
    """A local path is a model folder; anything else is a hub id, which offline must already
    be in the local Hugging Face cache (nothing else can load it)."""
    name = config.model.name
    if name.startswith("builtin:"):
        return
    path = Path(name)
    if path.exists():
        if not (path / "config.json").is_file():
            what = "a file" if path.is_file() else "a folder without config.json"
            raise ConfigError(
                f"model.name: {name} is {what}, not a model; pass a folder written by "
                "save_pretrained, a hub id or builtin:tiny-llama"
            )
        return
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ConfigError(
            f"model.name: {name} is neither a folder here nor a hub id (owner/name); check the path"
        ) from None
    if hub_offline():
        cached = try_to_load_from_cache(name, "config.json", revision=config.model.revision)
        if not isinstance(cached, str):
            raise ConfigError(
                f"model.name: {name} is not in the local Hugging Face cache and the Hub is "
                "offline (HF_HUB_OFFLINE); unset HF_HUB_OFFLINE to download it, or pass a "
                "local model folder"
            )


def check_hub_access(config: FinetuneConfig, token: str | None) -> None:
    """A gated or private hub model needs a token; offline, nothing can be told: skip."""
    name = config.model.name
    if not is_hub_model(name) or hub_offline():
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


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def read_model_config(config: FinetuneConfig, token: str | None = None):
    """The model's configuration (config.json only, no weights); None when the hub cannot be
    reached (the load task reports that, and retries)."""
    from transformers import AutoConfig

    name = config.model.name
    try:
        return AutoConfig.from_pretrained(
            builtin_models.resolve(name),
            revision=config.model.revision,
            token=token,
            trust_remote_code=config.model.trust_remote_code,
        )
    except OSError as exc:
        if is_hub_model(name):
            return None
        raise ConfigError(
            f"model.name: {name}: its config.json cannot be read ({_reason(exc)})"
        ) from None
    except ValueError as exc:  # an unknown model type, a malformed config
        raise ConfigError(
            f"model.name: {name}: its configuration is not usable ({_reason(exc)})"
        ) from None


def check_lora_targets(config: FinetuneConfig, model_config) -> None:
    """The LoRA target modules exist in the model, found on the meta device (no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    targets = config.lora.target_modules
    if targets == ["all-linear"] or model_config is None:
        return
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            model_config, trust_remote_code=config.model.trust_remote_code
        )
    check_targets(model, targets, config.model.name)


def check_lora_rank(config: FinetuneConfig, model_config) -> None:
    """A LoRA rank above the model's width: B @ A cannot have a higher rank than the layer's
    width, so the extra weights only cost memory (a rank of a billion asked 256 GB)."""
    hidden = getattr(model_config.get_text_config(), "hidden_size", None) if model_config else None
    if isinstance(hidden, int) and config.lora.r > hidden:
        raise ConfigError(
            f"lora.r: {config.lora.r} exceeds the width of {config.model.name} ({hidden}); a "
            f"rank above it adds weights, not capacity: lower it to at most {hidden}"
        )


def check_metrics(config: FinetuneConfig) -> None:
    """Every extra metric loads now (evaluate.load), not after the first evaluation."""
    from finance_qlora.evaluation import load_metric

    for name in dict.fromkeys(config.evaluation.metrics):
        if name != "rouge":
            load_metric(name)


def check_padding_free(config: FinetuneConfig, model_config) -> None:
    """Padding-free batches need a model whose attention is transformers' pluggable kind (the
    packed-rows attention replaces it); remote code is checked when the model is built."""
    from transformers import AutoModelForCausalLM

    from finance_qlora.packing import not_pluggable

    if not config.train.padding_free or model_config is None:
        return
    # The auto class's private mapping names the model class without loading any weights
    # (no public lookup from a config to its class exists).
    model_class = AutoModelForCausalLM._model_mapping.get(type(model_config), None)
    if model_class is not None and not getattr(model_class, "_supports_attention_backend", False):
        raise not_pluggable(config.model.name, model_class.__name__)


def check_context(config: FinetuneConfig, model_config) -> None:
    """Answers and training rows fit the model's context."""
    from finance_qlora.modeling import context_length

    context = context_length(model_config) if model_config is not None else None
    if context is None:
        return
    name, new_tokens = config.model.name, config.generation.max_new_tokens
    if new_tokens >= context:
        raise ConfigError(
            f"generation.max_new_tokens: {new_tokens} does not fit the context of {name} "
            f"({context} tokens, the prompt included); lower it below {context}"
        )
    if config.train.max_seq_length > context:
        raise ConfigError(
            f"train.max_seq_length: {config.train.max_seq_length} exceeds the context of {name} "
            f"({context} tokens); lower it to at most {context}"
        )


def _tokenizer(config: FinetuneConfig, token: str | None):
    """The model's tokenizer; None for a hub model that cannot be reached (the load task
    reports it)."""
    from finance_qlora.modeling import load_tokenizer

    try:
        return load_tokenizer(config.model, token)
    except (OSError, ValueError) as exc:
        if is_hub_model(config.model.name):
            return None
        raise ConfigError(
            f"model.name: {config.model.name}: its tokenizer cannot be loaded ({_reason(exc)})"
        ) from None


def check_sequence_length(
    config: FinetuneConfig, train_rows: Rows | None, token: str | None, tokenizer=None
) -> None:
    """Some training row fits train.max_seq_length (training drops the rows that do not), told
    with the tokenizer alone; rows of a hub data set are not known yet: the train step tells."""
    if not train_rows:
        return
    tokenizer = tokenizer or _tokenizer(config, token)
    if tokenizer is None:
        return
    length, limit = row_length(tokenizer), config.train.max_seq_length
    pairs = [to_prompt_completion(r) for r in train_rows]
    # a row fits once its first sentence does: one short tokenization a row (the train step
    # cuts the long answers, once)
    if not any(length(p["prompt"], shortest_form(p["completion"])) <= limit for p in pairs):
        raise no_row_fits(pairs, length, limit)


def check_test_prompts(
    config: FinetuneConfig, test_rows: Rows | None, model_config, tokenizer
) -> None:
    """Some test prompt leaves room for generation.max_new_tokens in the context (evaluation
    leaves out, and counts, the prompts that do not: `prompts.fit_prompts`)."""
    from finance_qlora.modeling import context_length

    context = context_length(model_config) if model_config is not None else None
    if not test_rows or context is None or tokenizer is None:
        return
    new_tokens = config.generation.max_new_tokens
    prompts = [to_prompt_completion(r)["prompt"] for r in test_rows]
    _, dropped = fit_prompts(prompts, prompt_length(tokenizer), context - new_tokens)
    if dropped == len(prompts):
        shortest = min(map(prompt_length(tokenizer), prompts))
        raise ConfigError(
            f"generation.max_new_tokens: {new_tokens} new tokens leave no room for any test "
            f"prompt in the context of {config.model.name} ({context} tokens; the shortest "
            f"prompt takes {shortest}); lower it to at most {max(context - shortest, 0)}"
        )


def preflight(
    config: FinetuneConfig,
    get_token: Callable[[], str | None] = lambda: None,
    store_options: dict[str, Any] | None = None,
) -> None:
    """Every check, cheapest first, before anything is written and before any model is loaded
    (configuration and tokenizer only); the token is looked up only for a hub model or data
    set."""
    store = Store(config.output_dir, store_options or {})  # a malformed URL fails here
    check_quantization(config)
    check_fused_kernels(config)
    check_compile(config)
    check_decode_kernel(config)
    check_devices(config)
    check_model_name(config)
    hub_data = local_path(config.data.dataset) is None and not is_store_url(config.data.dataset)
    hub = is_hub_model(config.model.name) or hub_data
    token = get_token() if hub else None
    rows = check_data(config, token, store.options)
    check_hub_access(config, token)
    found = read_model_config(config, token)
    check_lora_targets(config, found)
    check_lora_rank(config, found)
    check_padding_free(config, found)
    check_context(config, found)
    check_metrics(config)
    if rows is not None:  # a data file: its rows are known now
        tokenizer = _tokenizer(config, token)
        check_sequence_length(config, rows[0], token, tokenizer)
        check_test_prompts(config, rows[1], found, tokenizer)
    store.check_writable()
    if config.promotion.enabled:
        read_champion(store)  # a damaged champion pointer: one line, before any work
