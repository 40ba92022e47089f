"""QLoRA on the tiny model through the real stack: bitsandbytes 4-bit on the CPU, PEFT, TRL."""

import pytest
import torch
from safetensors.torch import load_file

from finance_qlora.errors import ConfigError
from finance_qlora.files import fingerprint, write_jsonl
from finance_qlora.modeling import load_model
from finance_qlora.presets import resolve_config
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
        p.name for p in record.path.iterdir()
    }
    weights = load_file(record.path / "adapter_model.safetensors")
    assert weights and all("lora_" in name for name in weights)
    assert {n.split(".")[-3] for n in weights} == {"q_proj", "v_proj"}
    # LoRA B starts at zero: non-zero B means training moved the adapter
    assert any(w.abs().sum() > 0 for n, w in weights.items() if "lora_B" in n)
    assert record.fingerprint == fingerprint(record.path)  # the record names these bytes


def test_adapter_loads_with_peft_on_the_4bit_base(trained):
    import bitsandbytes as bnb
    from peft import PeftModel

    config, record = trained
    model = load_model(config.model, adapter_dir=record.path)
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


def test_every_training_example_ends_with_eos_even_when_too_long(tmp_path, caplog):
    """A row longer than train.max_seq_length keeps its EOS: its answer is cut after a
    sentence (not mid-word by truncation), and a row that cannot fit is dropped."""
    from finance_qlora.modeling import load_tokenizer
    from finance_qlora.training import build_trainer

    config = resolve_config("tiny-cpu")
    tokenizer = load_tokenizer(config.model)
    pairs = [to_prompt_completion(r) for r in make_rows(3)]
    kept = pairs[0]["completion"] + " It pays interest."
    long = dict(pairs[0], completion=kept + " It ends at maturity, when it is repaid.")
    pairs.append(long)

    def length(prompt: str, completion: str) -> int:
        return len(tokenizer(prompt + completion + tokenizer.eos_token)["input_ids"])

    limit = length(long["prompt"], kept)
    assert length(long["prompt"], long["completion"]) > limit
    assert limit >= max(length(p["prompt"], p["completion"]) for p in pairs[:3])
    prompts = tmp_path / "train.jsonl"
    write_jsonl(prompts, pairs)
    train = config.train.model_copy(update={"max_seq_length": limit})
    with caplog.at_level("WARNING", logger="finance_qlora.training"):
        trainer = build_trainer(prompts, config.model, config.lora, train, tmp_path / "out")
    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = trainer.data_collator(examples)
    eos = tokenizer.eos_token_id
    for labels in batch["labels"]:
        answer = labels[labels != -100]
        assert answer[-1].item() == eos and (answer[:-1] != eos).all()
    trimmed = tokenizer.decode(batch["input_ids"][3][batch["labels"][3] != -100])
    assert trimmed == f"{kept}</s>"
    assert "1 of 4 training rows exceed train.max_seq_length" in caplog.text


@pytest.mark.parametrize("dequantize", ["never", "always"])
def test_trainable_weights_are_fp32_on_the_4bit_and_dequantized_paths(tmp_path, dequantize):
    """compute_dtype bfloat16 is what an Ampere card gets: TRL would keep the QLoRA adapters
    in bf16 there, on both paths (a dequantized model still says it is quantized)."""
    import bitsandbytes as bnb

    from finance_qlora.training import build_trainer

    prompts = tmp_path / "train.jsonl"
    write_jsonl(prompts, [to_prompt_completion(r) for r in make_rows(4)])
    config = resolve_config(
        "tiny-cpu",
        {"model": {"compute_dtype": "bfloat16"}, "train": {"dequantize": dequantize}},
    )
    trainer = build_trainer(prompts, config.model, config.lora, config.train, tmp_path / "out")
    quantized = any(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules())
    assert quantized == (dequantize == "never")
    trainable = {n: p.dtype for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert set(trainable.values()) == {torch.float32}, trainable


def test_cosine_schedule_decays_to_zero(tmp_path):
    from finance_qlora.training import build_trainer

    prompts = tmp_path / "train.jsonl"
    write_jsonl(prompts, [to_prompt_completion(r) for r in make_rows(4)])
    config = resolve_config("tiny-cpu", {"train": {"lr_scheduler": "cosine", "warmup_ratio": 0}})
    trainer = build_trainer(prompts, config.model, config.lora, config.train, tmp_path / "out")
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    rates = []
    for _ in range(10):
        rates.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert rates[0] == pytest.approx(config.train.learning_rate)
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False))
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


def test_the_last_loss_is_logged_whatever_the_interval_and_nothing_printed(tmp_path, capsys):
    """logging_steps above the step count still logs the last step's loss (the train task
    reports first and last); Trainer's own printing of its log dicts is off."""
    prompts = tmp_path / "train.jsonl"
    write_jsonl(prompts, [to_prompt_completion(r) for r in make_rows(8)])
    config = resolve_config("tiny-cpu", {"train": {"epochs": 1, "logging_steps": 1000}})
    record = train_adapter(prompts, config.model, config.lora, config.train, tmp_path / "out")
    assert record.steps == 2 and len(record.losses) == 1
    assert "'loss'" not in capsys.readouterr().out
