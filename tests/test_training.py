"""QLoRA on the tiny model through the real stack: bitsandbytes 4-bit on the CPU, PEFT, TRL."""

import pytest
import torch
from safetensors.torch import load_file

from finance_qlora.config import resolve_config
from finance_qlora.errors import ConfigError
from finance_qlora.files import write_jsonl
from finance_qlora.modeling import load_model
from finance_qlora.prompts import to_prompt_completion
from finance_qlora.training import train_adapter
from tests.conftest import make_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Eight rows repeated four times, six epochs: a data set the model can memorise."""
    tmp = tmp_path_factory.mktemp("train")
    prompts = tmp / "train.jsonl"
    write_jsonl(prompts, [to_prompt_completion(r) for r in make_rows(8) * 4])
    config = resolve_config(
        "tiny-cpu", {"train": {"epochs": 6, "learning_rate": 1e-2, "warmup_ratio": 0}}
    )
    record = train_adapter(prompts, config.model, config.lora, config.train, tmp / "out")
    return config, record


def test_loss_goes_down_on_repeated_data(trained):
    _, record = trained
    assert record.steps == 6 * 32 // 4
    assert len(record.losses) == record.steps  # logged every step
    first, last = sum(record.losses[:3]) / 3, sum(record.losses[-3:]) / 3
    assert last < first - 0.3, record.losses  # about 0.5 nats on this seed


def test_adapter_holds_trained_lora_weights_only(trained):
    config, record = trained
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {
        p.name for p in record.folder.iterdir()
    }
    weights = load_file(record.folder / "adapter_model.safetensors")
    assert weights and all("lora_" in name for name in weights)
    assert {n.split(".")[-3] for n in weights} == {"q_proj", "v_proj"}
    # LoRA B starts at zero: non-zero B means training moved the adapter
    assert any(w.abs().sum() > 0 for n, w in weights.items() if "lora_B" in n)
    assert record.intact()


def test_adapter_loads_with_peft_on_the_4bit_base(trained):
    import bitsandbytes as bnb
    from peft import PeftModel

    config, record = trained
    model = load_model(config.model, adapter_dir=record.folder)
    assert isinstance(model, PeftModel)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    ids = torch.tensor([[1, 5, 6, 7]])
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_unknown_lora_target_is_a_config_error(tmp_path):
    prompts = tmp_path / "train.jsonl"
    write_jsonl(prompts, [to_prompt_completion(r) for r in make_rows(4)])
    config = resolve_config("tiny-cpu", {"lora": {"target_modules": ["query_key_value"]}})
    with pytest.raises(ConfigError, match="lora.target_modules: query_key_value"):
        train_adapter(prompts, config.model, config.lora, config.train, tmp_path / "out")
