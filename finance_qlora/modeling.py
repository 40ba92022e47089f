"""Load the tokenizer and the base model in 4-bit (optionally with a saved adapter)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any

import torch

from finance_qlora import builtin_models, heap
from finance_qlora.config import ModelConfig
from finance_qlora.errors import ConfigError, FinanceQLoRAError

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def compute_dtype(name: str) -> torch.dtype:
    """bf16 on Ampere and newer, fp16 on older GPUs such as the T4, fp32 on the CPU."""
    if name != "auto":
        return _DTYPES[name]
    if not torch.cuda.is_available():
        return torch.float32
    # By compute capability: is_bf16_supported() is also true on a T4 (7.5), where bf16 is
    # emulated and slow; native bf16 starts with Ampere (8.0).
    return torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else torch.float16


def context_length(model_config) -> int | None:
    """Positions the model has (prompt and answer together); None where the config does not
    say (a position scheme without a limit)."""
    text_config = model_config.get_text_config()
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def read_model_config(cfg: ModelConfig, token: str | None = None):
    """The config of the model `cfg` names (no weights)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(
        builtin_models.resolve(cfg.name),
        revision=cfg.revision,
        token=token,
        trust_remote_code=cfg.trust_remote_code,
    )


def model_context(cfg: ModelConfig, token: str | None = None) -> int | None:
    """`context_length` of the model `cfg` names, from its config alone (no weights)."""
    return context_length(read_model_config(cfg, token))


def device_map() -> dict[str, Any]:
    return {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}


def quantization_config(cfg: ModelConfig):
    from transformers import BitsAndBytesConfig

    if not cfg.load_in_4bit:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(cfg.compute_dtype),
    )


def load_tokenizer(cfg: ModelConfig, token: str | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        builtin_models.resolve(cfg.name),
        revision=cfg.revision,
        token=token,
        trust_remote_code=cfg.trust_remote_code,
    )
    if tokenizer.pad_token is None:
        # LLaMA-2 has no pad token; <unk> keeps EOS (which the model must learn) out of padding.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def generation_eos_ids(model) -> list[int]:
    """The ids the model itself ends a turn with: its generation config's (an int or a list),
    else its config's."""
    config = getattr(model, "generation_config", None)
    ids = getattr(config, "eos_token_id", None)
    if ids is None:
        ids = getattr(model.config, "eos_token_id", None)
    if ids is None:
        return []
    return [int(i) for i in ([ids] if isinstance(ids, int) else ids)]


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every end-of-turn id: the model's, and the tokenizer's EOS (what training appends)."""
    ids = generation_eos_ids(model)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def check_special_tokens(model, tokenizer, model_name: str) -> None:
    """Refuse a tokenizer whose EOS the model does not end on: training would teach the model
    to stop on a token its generation does not stop at (or the other way round)."""
    eos = tokenizer.eos_token_id
    ids = generation_eos_ids(model)
    if eos is None or eos not in ids:
        raise ConfigError(
            f"model.name: {model_name}: the tokenizer's EOS {tokenizer.eos_token!r} (id {eos}) is "
            f"not among the model's generation EOS ids {ids}; make the tokenizer's eos_token and "
            "generation_config.json's eos_token_id agree (a builtin model: delete its folder under "
            "FINANCE_QLORA_CACHE to rebuild it)"
        )


def load_model(cfg: ModelConfig, token: str | None = None, adapter_dir: Path | None = None):
    """The base model (4-bit if configured), with the adapter at `adapter_dir` applied.

    The first 4-bit load quantizes the source's weights and keeps the result (about a quarter
    of their size, see `quantized_folder`); later loads, in this process or another, read it.
    """
    from transformers import AutoModelForCausalLM

    from finance_qlora.quantized import load_kept, quantized_folder, save_quantized

    source = builtin_models.resolve(cfg.name)
    common = {
        "dtype": compute_dtype(cfg.compute_dtype),
        "device_map": device_map(),
        "trust_remote_code": cfg.trust_remote_code,
        "use_safetensors": True,
    }
    kept = quantized_folder(cfg, source, token, common["dtype"])
    model = load_kept(kept, common) if kept is not None else None
    if model is not None:
        # adapters (PEFT's base_model_name_or_path) name the model, not the kept copy; PEFT
        # reads the config's private _name_or_path, which no public setter changes
        model.name_or_path = model.config._name_or_path = source
    else:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            revision=cfg.revision,
            token=token,
            quantization_config=quantization_config(cfg),
            **common,
        )
        if kept is not None:
            save_quantized(model, kept)
    if adapter_dir is not None:
        from peft import PeftModel

        # safetensors only: a pickled adapter_model.bin could run code when loaded
        if not (Path(adapter_dir) / "adapter_model.safetensors").is_file():
            raise FinanceQLoRAError(
                f"adapter: {adapter_dir} has no adapter_model.safetensors; only safetensors "
                "adapters are loaded"
            )
        model = PeftModel.from_pretrained(
            model, str(adapter_dir), is_trainable=False, use_safetensors=True
        )
    return model


def dequantize_4bit_layers(model, dtype: torch.dtype) -> int:
    """Replace each bitsandbytes 4-bit linear layer by a plain one holding its weights,
    dequantized once: the same matrix the 4-bit kernels rebuild on every call, kept in
    `dtype`. Costs 2 bytes a parameter (bf16/fp16) instead of about 0.5. Returns the count."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                data, state = child.weight.data, child.weight.quant_state
                if getattr(state, "packing_format_for_cpu", False):
                    # bitsandbytes repacks weights for its AVX512 CPU kernel on first use; only
                    # its private inverse undoes that (transformers' model.dequantize() does
                    # not, and gave weights off by up to 0.10 on the tiny model, 2026-11-28)
                    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

                    data, state = _convert_weight_packed_for_cpu_inverse(data, state)
                weight = dequantize_4bit(data, state).to(dtype)
                linear = torch.nn.Linear(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    device=weight.device,
                    dtype=dtype,
                )
                linear.weight = torch.nn.Parameter(weight, requires_grad=False)
                if child.bias is not None:
                    linear.bias = torch.nn.Parameter(child.bias.data.to(dtype), requires_grad=False)
                setattr(module, name, linear)
                replaced += 1
    release_memory()
    return replaced


def has_room_to_dequantize(model) -> bool:
    """On a GPU with the dequantized weights (2 bytes a parameter) fitting twice in free memory;
    never on the CPU, where the 4-bit path is what tests and CI exercise."""
    if not torch.cuda.is_available():
        return False
    free, _ = torch.cuda.mem_get_info()
    params = sum(p.numel() * (2 if p.dtype == torch.uint8 else 1) for p in model.parameters())
    return 2 * 2 * params < free


def maybe_dequantize(model, mode: str, dtype: torch.dtype) -> bool:
    if mode == "never" or (mode == "auto" and not has_room_to_dequantize(model)):
        return False
    return dequantize_4bit_layers(model, dtype) > 0


def release_memory() -> None:
    """Give GPU memory back between tasks (several tasks share one worker process)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def loaded(
    cfg: ModelConfig,
    token: str | None = None,
    adapter_dir: Path | None = None,
    dequantize: str = "never",
    decode_kernel_ahead: bool = False,
) -> Iterator[tuple[Any, Any]]:
    """The model and tokenizer for generating: 4-bit weights dequantized per `dequantize`;
    with `decode_kernel_ahead` (a generation through `generation.decode_kernel` "triton") the
    decode steps' kernel compiles while the model loads. Freed on exit."""
    from finance_qlora.decode_attention import compiled_ahead, head_layout

    dtype, device = compute_dtype(cfg.compute_dtype), torch.device(device_map()[""])
    ahead = nullcontext()
    if decode_kernel_ahead:
        # read here, not in the thread: the first reader of a builtin model builds its folder;
        # a config that cannot be read: load_model meets it below and says so in its own words
        with suppress(Exception):
            ahead = compiled_ahead(*head_layout(read_model_config(cfg, token)), dtype, device)
    # the heap alive before the model stays out of the collections that let it go
    with heap.frozen():
        with ahead:
            model = load_model(cfg, token, adapter_dir)
            tokenizer = load_tokenizer(cfg, token)
        check_special_tokens(model, tokenizer, cfg.name)
        if cfg.load_in_4bit:  # after the thread: `auto` weighs the memory free
            maybe_dequantize(model, dequantize, dtype)
        try:
            model.eval()
            yield model, tokenizer
        finally:
            del model
            release_memory()
