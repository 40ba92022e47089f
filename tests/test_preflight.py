"""Preflight's checks one by one, with the hub and transformers' loaders simulated where the
real ones would need a network (tests/test_bad_inputs.py runs them whole, from the CLI)."""

from __future__ import annotations

import pytest
from transformers import PretrainedConfig

from finance_qlora import modeling, preflight
from finance_qlora.data import hub_offline
from finance_qlora.errors import ConfigError
from finance_qlora.presets import resolve_config


def _config(**model):
    return resolve_config("tiny-cpu", {"model": model} if model else None)


@pytest.mark.parametrize("value", ["1", "on", "ON", "yes", "Yes", "true", "TRUE"])
def test_hub_offline_reads_the_variable_as_huggingface_hub_does(monkeypatch, value):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub_offline()


@pytest.mark.parametrize("value", ["", "0", "off", "false", "no"])
def test_hub_online(monkeypatch, value):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert not hub_offline()


def _model_info(monkeypatch, error=None):
    import httpx2
    import huggingface_hub

    calls = []

    def model_info(name, **kwargs):
        calls.append((name, kwargs))
        if error is not None:
            url = f"https://huggingface.co/api/models/{name}"
            response = httpx2.Response(404, request=httpx2.Request("GET", url))
            raise error(f"{name}: not found", response=response)

    monkeypatch.setattr(huggingface_hub, "model_info", model_info)
    return calls


def test_hub_access_is_asked_with_revision_and_token_and_never_offline(monkeypatch):
    from huggingface_hub.errors import RepositoryNotFoundError

    config = _config(name="org/model", revision="r1")
    calls = _model_info(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    preflight.check_hub_access(config, "hf_x")
    assert calls == []  # offline: nothing can be told
    monkeypatch.delenv("HF_HUB_OFFLINE")
    preflight.check_hub_access(config, "hf_x")
    assert calls == [("org/model", {"revision": "r1", "token": "hf_x"})]

    _model_info(monkeypatch, RepositoryNotFoundError)
    with pytest.raises(ConfigError) as info:
        preflight.check_hub_access(config, None)
    assert str(info.value) == (
        "model.name: org/model not found on the Hub (or private without a token)"
    )


def _auto_config(monkeypatch, answer):
    from transformers import AutoConfig

    calls = []

    def from_pretrained(name, **kwargs):
        calls.append((name, kwargs))
        if isinstance(answer, BaseException):
            raise answer
        return answer

    monkeypatch.setattr(AutoConfig, "from_pretrained", from_pretrained)
    return calls


def test_the_model_config_is_read_with_revision_token_and_remote_code_setting(monkeypatch):
    found = PretrainedConfig(max_position_embeddings=64)
    calls = _auto_config(monkeypatch, found)
    config = _config(name="org/model", revision="r1", trust_remote_code=True)
    assert preflight.read_model_config(config, "hf_x") is found
    assert calls == [("org/model", {"revision": "r1", "token": "hf_x", "trust_remote_code": True})]


def test_an_unreachable_hub_model_config_is_left_to_the_load_step(monkeypatch):
    _auto_config(monkeypatch, OSError("connection refused"))
    assert preflight.read_model_config(_config(name="org/model")) is None


def test_a_local_model_config_that_cannot_be_read_is_one_line(monkeypatch, tmp_path):
    name = str(tmp_path)
    _auto_config(monkeypatch, OSError("config.json:\n  not valid JSON"))
    with pytest.raises(ConfigError) as info:
        preflight.read_model_config(_config(name=name))
    assert str(info.value) == (
        f"model.name: {name}: its config.json cannot be read (config.json: not valid JSON)"
    )
    _auto_config(monkeypatch, ValueError("Unrecognized model type 'nope'"))
    with pytest.raises(ConfigError) as info:
        preflight.read_model_config(_config(name="org/model"))
    assert str(info.value) == (
        "model.name: org/model: its configuration is not usable (Unrecognized model type 'nope')"
    )


def test_lora_targets_are_not_checked_without_a_model_config():
    config = resolve_config("tiny-cpu", {"lora": {"target_modules": ["no_such_module"]}})
    preflight.check_lora_targets(config, None)  # the hub was unreachable: nothing to check


@pytest.mark.parametrize(
    "attributes, context",
    [
        ({"max_position_embeddings": 64, "n_positions": 9}, 64),
        ({"n_positions": 77}, 77),
        ({"max_sequence_length": 55}, 55),
        ({"seq_length": 33}, 33),
        ({"seq_length": 1}, 1),
        ({"seq_length": 0}, None),
        ({"seq_length": "long"}, None),
        ({}, None),
    ],
)
def test_the_context_length_is_read_from_the_names_configs_use(attributes, context):
    assert modeling.context_length(PretrainedConfig(**attributes)) == context


def test_new_tokens_and_sequence_length_against_the_context():
    context = PretrainedConfig(max_position_embeddings=64)

    def check(generation: int, train: int) -> None:
        config = resolve_config(
            "tiny-cpu",
            {"generation": {"max_new_tokens": generation}, "train": {"max_seq_length": train}},
        )
        preflight.check_context(config, context)

    check(63, 64)  # one position left for the prompt; training rows may fill the context
    with pytest.raises(ConfigError, match="^generation.max_new_tokens: 64 does not fit"):
        check(64, 64)
    with pytest.raises(ConfigError, match="^train.max_seq_length: 65 exceeds the context"):
        check(24, 65)
    preflight.check_context(resolve_config("tiny-cpu"), None)  # nothing known: nothing told


def test_the_tokenizer_is_loaded_with_the_token_and_its_failures_told(monkeypatch, tmp_path):
    import finance_qlora.modeling

    calls = []

    def load_tokenizer(model, token=None):
        calls.append((model.name, token))
        raise OSError("tokenizer.json:\n  missing")

    monkeypatch.setattr(finance_qlora.modeling, "load_tokenizer", load_tokenizer)
    rows = [{"instruction": "Q", "input": "", "output": "A."}]
    preflight.check_sequence_length(_config(name="org/model"), rows, "hf_x")  # hub: left
    assert calls == [("org/model", "hf_x")]
    name = str(tmp_path)
    with pytest.raises(ConfigError) as info:
        preflight.check_sequence_length(_config(name=name), rows, None)
    assert str(info.value) == (
        f"model.name: {name}: its tokenizer cannot be loaded (tokenizer.json: missing)"
    )


def test_reasons_are_one_line_of_at_most_200_characters(monkeypatch, tmp_path):
    name = str(tmp_path)
    for error, reason in ((OSError("x" * 300), "x" * 200), (OSError(), "OSError")):
        _auto_config(monkeypatch, error)
        with pytest.raises(ConfigError) as info:
            preflight.read_model_config(_config(name=name))
        assert str(info.value) == f"model.name: {name}: its config.json cannot be read ({reason})"


def test_the_model_skeleton_honours_trust_remote_code_and_all_linear_needs_none(monkeypatch):
    from transformers import AutoModelForCausalLM

    built = []

    def from_config(model_config, **kwargs):
        built.append(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", from_config)
    found = PretrainedConfig(max_position_embeddings=64)
    everything = resolve_config("tiny-cpu", {"lora": {"target_modules": ["all-linear"]}})
    preflight.check_lora_targets(everything, found)
    assert built == []  # every linear layer: nothing to look up
    trusted = _config(name="org/model", trust_remote_code=True)
    with pytest.raises(RuntimeError, match="stop here"):
        preflight.check_lora_targets(trusted, found)
    assert built == [{"trust_remote_code": True}]


def test_padding_free_is_refused_for_a_model_with_its_own_attention():
    from transformers import BloomConfig, LlamaConfig

    from finance_qlora.preflight import check_padding_free

    config = resolve_config("tiny-cpu", {"train": {"padding_free": True}})
    check_padding_free(config, LlamaConfig())  # transformers' pluggable attention: fine
    check_padding_free(config, None)  # no configuration read: left to the build
    with pytest.raises(ConfigError, match=r"train.padding_free: .* \(BloomForCausalLM\) cannot"):
        check_padding_free(config, BloomConfig())
    unpacked = resolve_config("tiny-cpu")
    check_padding_free(unpacked, BloomConfig())  # not asked for: not checked


def test_compiled_layers_need_a_cpu_compiler_without_cuda(monkeypatch):
    import torch._inductor.config as inductor
    from torch._inductor.cpp_builder import cpp_compiler_search

    config = resolve_config("tiny-cpu", {"train": {"compile": True}})
    preflight.check_compile(config)  # this machine's g++: fine
    monkeypatch.setattr(inductor.cpp, "cxx", ("no-such-compiler++",))
    cpp_compiler_search.cache_clear()  # inductor keeps the compiler it found
    try:
        with pytest.raises(ConfigError, match=r"train.compile: no CUDA GPU here, and inductor"):
            preflight.check_compile(config)
        preflight.check_compile(resolve_config("tiny-cpu"))  # not asked for: not checked
    finally:
        cpp_compiler_search.cache_clear()


def test_triton_kernels_need_a_c_compiler_and_pythons_headers(monkeypatch, tmp_path):
    import sysconfig

    from finance_qlora import toolchain

    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(toolchain.shutil, "which", lambda name: None)
    monkeypatch.setattr(toolchain.importlib.util, "find_spec", lambda name: object())
    assert "needs a C compiler (gcc or clang, or $CC)" in toolchain.triton_missing()
    monkeypatch.setenv("CC", "/opt/cc")
    monkeypatch.setattr(sysconfig, "get_paths", lambda scheme: {"include": str(tmp_path)})
    assert "needs Python's headers (Python.h" in toolchain.triton_missing()
    (tmp_path / "Python.h").write_text("")
    assert toolchain.triton_missing() is None
    monkeypatch.setattr(toolchain.importlib.util, "find_spec", lambda name: None)
    assert toolchain.triton_missing().startswith("Triton is not installed")


def test_the_decode_kernel_needs_triton_where_a_gpu_will_run_it(monkeypatch):
    import torch

    config = resolve_config("llama2-7b-h100")
    assert config.generation.decode_kernel == "triton"
    missing = "Triton is not installed (it comes with torch's CUDA wheels)"
    monkeypatch.setattr(preflight, "triton_missing", lambda: missing)
    preflight.check_decode_kernel(config)  # no GPU here: generation attends with SDPA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match=r"^generation.decode_kernel: Triton is not installed"):
        preflight.check_decode_kernel(config)
    preflight.check_decode_kernel(
        resolve_config("llama2-7b-h100", {"generation": {"decode_kernel": "sdpa"}})
    )
