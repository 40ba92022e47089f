"""The 4-bit weights are quantized once and kept; later loads read them and answer alike."""

import json
import logging
import os
import shutil

import pytest
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM

from finance_qlora import builtin_models
from finance_qlora.files import write_jsonl
from finance_qlora.modeling import compute_dtype, load_model, loaded
from finance_qlora.presets import resolve_config
from finance_qlora.prompts import to_prompt_completion
from finance_qlora.quantized import quantized_folder
from finance_qlora.training import train_adapter
from tests.conftest import generate, make_rows


def dtype_of(model_config):
    return compute_dtype(model_config.compute_dtype)


PROMPTS = [to_prompt_completion(r)["prompt"] for r in make_rows(6)]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh model cache, and the folders each load read its weights from."""
    monkeypatch.setenv("FINANCE_QLORA_CACHE", str(tmp_path / "cache"))
    reads: list[str] = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, name, *args, **kwargs):
        reads.append(str(name))
        return original(cls, name, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    return reads


def answers(config):
    with loaded(config.model) as (model, tokenizer):
        return generate(model, tokenizer, PROMPTS, 12, batch_size=3)


def test_the_kept_4bit_weights_give_identical_greedy_answers(cache):
    config = resolve_config("tiny-cpu")
    source = builtin_models.resolve(config.model.name)
    kept = quantized_folder(config.model, source, None, dtype_of(config.model))
    assert not kept.exists()

    first = answers(config)  # quantizes the source and keeps the result
    assert (kept / "model.safetensors").is_file()
    second = answers(config)  # reads the kept 4-bit weights: no quantization
    assert cache == [source, str(kept)]
    assert second == first


def test_the_kept_weights_are_found_again_only_for_the_same_source_and_settings(cache):
    config = resolve_config("tiny-cpu").model
    source = builtin_models.resolve(config.name)
    kept = quantized_folder(config, source, None, dtype_of(config))
    assert quantized_folder(config, source, None, dtype_of(config)) == kept
    other_settings = [
        config.model_copy(update={"double_quant": False}),
        config.model_copy(update={"quant_type": "fp4"}),
        config.model_copy(update={"compute_dtype": "bfloat16"}),
    ]
    assert kept not in {quantized_folder(c, source, None, dtype_of(c)) for c in other_settings}
    # new weights in the source folder: a new copy
    weights = os.path.join(source, "model.safetensors")
    stat = os.stat(weights)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert quantized_folder(config, source, None, dtype_of(config)) != kept
    never = config.model_copy(update={"reuse_quantized": False})
    assert quantized_folder(never, source, None, dtype_of(never)) is None


def test_an_adapter_trained_on_the_kept_weights_names_the_source_model(cache, tmp_path):
    config = resolve_config("tiny-cpu")
    load_model(config.model)  # keep the 4-bit copy first
    prompts = tmp_path / "train.jsonl"
    write_jsonl(prompts, [to_prompt_completion(r) for r in make_rows(4)])
    record = train_adapter(prompts, config.model, config.lora, config.train, tmp_path / "out")
    assert cache[-1] == str(quantized_folder(config.model, cache[0], None, dtype_of(config.model)))
    adapter_config = json.loads((record.path / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == cache[0]


def test_a_cache_that_cannot_be_written_costs_speed_not_the_run(cache, monkeypatch, caplog):
    from transformers import LlamaForCausalLM

    def refuse(model, folder, **kwargs):
        # what safetensors raises on a full disk: not an OSError
        raise SafetensorError("Error while serializing: No space left on device (os error 28)")

    config = resolve_config("tiny-cpu")
    expected = answers(config)
    kept = quantized_folder(config.model, cache[0], None, dtype_of(config.model))
    shutil.rmtree(kept)
    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", refuse)
    with caplog.at_level(logging.WARNING, logger="finance_qlora.quantized"):
        assert answers(config) == expected
    assert "could not keep the 4-bit weights" in caplog.text
    assert not kept.exists() and not list(kept.parent.glob(".tmp-*"))


def test_an_unreadable_kept_copy_is_quantized_again(cache, caplog):
    """A truncated copy (a full disk, a killed copy by hand) costs a new quantization only."""
    config = resolve_config("tiny-cpu")
    expected = answers(config)
    kept = quantized_folder(config.model, cache[0], None, dtype_of(config.model))
    weights = kept / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="finance_qlora.quantized"):
        assert answers(config) == expected
    assert "unreadable" in caplog.text and "quantizing again" in caplog.text
    assert cache == [cache[0], str(kept), cache[0]]  # tried the copy, then the source
    assert answers(config) == expected and cache[-1] == str(kept)  # kept anew, and read


def test_one_writer_keeps_the_copy_and_a_dead_writers_claim_expires(cache, tmp_path):
    config = resolve_config("tiny-cpu")
    kept = quantized_folder(
        config.model, builtin_models.resolve(config.model.name), None, dtype_of(config.model)
    )
    claim = kept.with_name(f".claim-{kept.name}")
    kept.parent.mkdir(parents=True)
    claim.touch()  # another process is writing the copy
    load_model(config.model)
    assert not kept.exists() and claim.exists()  # it was left to that process
    os.utime(claim, (0, 0))  # ... which died long ago
    load_model(config.model)
    assert not claim.exists() and not kept.exists()  # the stale claim is cleared
    load_model(config.model)
    assert (kept / "config.json").is_file() and not claim.exists()
