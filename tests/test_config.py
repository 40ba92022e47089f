import pytest
from pydantic import ValidationError

from finance_qlora.errors import ConfigError
from finance_qlora.presets import (
    PRESETS,
    ConfigOverrides,
    merge_assignments,
    parse_assignment,
    resolve_config,
)


def test_default_preset_is_the_reference_recipe():
    config = resolve_config()
    assert config.preset == "llama2-7b-t4"
    assert config.model.name == "meta-llama/Llama-2-7b-hf"
    assert config.data.dataset == "gbharti/finance-alpaca"
    assert (config.data.train_size, config.data.test_size) == (1000, 300)
    assert config.model.load_in_4bit and config.model.quant_type == "nf4"
    assert config.model.double_quant
    assert (config.lora.r, config.lora.alpha, config.lora.dropout) == (16, 16, 0.05)
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert (config.train.epochs, config.train.learning_rate) == (1, 2e-4)
    assert config.train.max_seq_length == 512
    assert config.generation.max_new_tokens == 128


def test_every_preset_validates():
    for name in PRESETS:
        assert resolve_config(name).preset == name


def test_overrides_apply_and_keep_the_rest_of_the_preset():
    base = resolve_config("tiny-cpu")
    changed = resolve_config("tiny-cpu", {"train": {"learning_rate": 1e-3}})
    assert changed.train.learning_rate == 1e-3
    assert changed.train.epochs == base.train.epochs  # the rest of the preset stays
    assert changed.lora == base.lora


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"train": {"learning_rate": -1}}, "train.learning_rate"),
        ({"data": {"test_size": 0}}, "data.test_size"),
        ({"lora": {"dropout": 1.5}}, "lora.dropout"),
        ({"train": {"epoch": 2}}, "train.epoch"),
    ],
)
def test_bad_values_name_the_field_in_one_line(overrides, field):
    with pytest.raises(ConfigError) as info:
        resolve_config("tiny-cpu", overrides)
    message = str(info.value)
    assert message.startswith(field) and "\n" not in message


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'gpt-5'.*tiny-cpu"):
        resolve_config("gpt-5")


def test_command_line_assignments():
    assert parse_assignment("train.learning_rate=1e-4") == {"train": {"learning_rate": 1e-4}}
    assert parse_assignment("model.name=meta-llama/Llama-2-13b-hf") == {
        "model": {"name": "meta-llama/Llama-2-13b-hf"}
    }
    merged = merge_assignments(["lora.r=8", 'lora.target_modules=["q_proj"]', "lora.alpha=32"])
    assert merged == {"lora": {"r": 8, "target_modules": ["q_proj"], "alpha": 32}}
    with pytest.raises(ConfigError, match="expected section.field=value"):
        parse_assignment("train.learning_rate")


def test_flow_overrides_schema_keeps_constraints():
    assert ConfigOverrides.model_validate({"train": {"epochs": 2}}).train.epochs == 2
    for bad in ({"train": {"epochs": -1}}, {"trian": {}}, {"preset": "tiny-cpu"}):
        with pytest.raises(ValidationError):
            ConfigOverrides.model_validate(bad)


@pytest.mark.parametrize(
    "overrides",
    [
        {"train": {"epochs": -1}},
        {"train": {"epochs": 5000}},
        {"data": {"seed": -1}},
        {"lora": {"dropout": 1.5}},
        {"trian": {}},
        {"train": {"epoch": 2}},
    ],
)
def test_the_flow_parameter_schema_enforces_the_constraints(overrides):
    """What the server checks a deployment run against: the flow's parameter JSON schema,
    validated the way Prefect's server validates it (not the pydantic model)."""
    from prefect.utilities.schema_tools.validation import validate

    from flows.finetune import finetune

    schema = finetune.parameters.model_dump_for_openapi()
    assert validate({"preset": "tiny-cpu", "overrides": {"train": {"epochs": 2}}}, schema) == []
    assert validate({"preset": "tiny-cpu", "overrides": overrides}, schema) != []


def test_evaluation_metrics_default_to_rouge_and_keep_it():
    assert resolve_config("tiny-cpu").evaluation.metrics == ["rouge"]
    both = resolve_config("tiny-cpu", {"evaluation": {"metrics": ["rouge", "bleu"]}})
    assert both.evaluation.metrics == ["rouge", "bleu"]
    with pytest.raises(ConfigError, match=r"^evaluation.metrics: .*must include 'rouge'"):
        resolve_config("tiny-cpu", {"evaluation": {"metrics": ["bleu"]}})


def test_a_metric_that_cannot_be_loaded_is_one_config_line(monkeypatch):
    from huggingface_hub import constants

    from finance_qlora.evaluation import load_metric

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # cached modules only: no network
    with pytest.raises(ConfigError) as info:
        load_metric("finance-qlora-no-such-metric")
    message = str(info.value)
    assert message.startswith("evaluation.metrics: cannot load 'finance-qlora-no-such-metric'")
    assert "offline" in message and "\n" not in message


def test_an_override_model_is_every_field_optional_with_its_constraints():
    """`_partial` builds the flow's parameter model (at import, so it is called again here)."""
    from finance_qlora.config import FinetuneConfig, TrainSettings
    from finance_qlora.presets import _partial

    train = _partial(TrainSettings)
    assert train.__name__ == "TrainSettingsOverride"
    assert train().model_dump() == {name: None for name in TrainSettings.model_fields}
    assert train(epochs=2).epochs == 2
    bad_values = ({"epochs": -1}, {"learning_rate": float("inf")}, {"seed": -1}, {"epoch": 2})
    for bad in bad_values:
        with pytest.raises(ValidationError):
            train.model_validate(bad)

    whole = _partial(FinetuneConfig, exclude=frozenset({"preset"}))
    assert set(whole.model_fields) == set(FinetuneConfig.model_fields) - {"preset"}
    nested = whole.model_validate({"train": {"epochs": 3}, "lora": {}})
    assert nested.train.epochs == 3 and nested.train.learning_rate is None
    assert nested.output_dir is None
    with pytest.raises(ValidationError):
        whole.model_validate({"train": {"epochs": 0}})
