"""Token-budget batches and dequantized evaluation: faster, and computing the same thing."""

from __future__ import annotations

import pytest
import torch

from finance_qlora.batching import token_budget_batches
from finance_qlora.files import write_jsonl
from finance_qlora.modeling import dequantize_4bit_layers, load_model, load_tokenizer
from finance_qlora.presets import resolve_config
from finance_qlora.prompts import to_prompt_completion
from finance_qlora.training import build_trainer, train_adapter
from tests.conftest import generate_cut, make_rows


def test_every_row_once_and_within_budget():
    lengths = [5, 90, 33, 33, 12, 250, 64, 7, 7, 120, 300, 41]
    batches = token_budget_batches(lengths, max_tokens=256)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert longest * len(batch) <= 256 or len(batch) == 1
    assert [300] in [[lengths[i] for i in b] for b in batches]  # too long: alone


def _rows(n: int) -> list[dict[str, str]]:
    rows = make_rows(n)
    for i, row in enumerate(rows):  # answers of very different lengths
        row["output"] = " ".join([row["output"]] * (1 + i % 4))
    return rows


@pytest.mark.slow
def test_batch_loss_equals_per_row_losses(tmp_path):
    """No attention across rows and no padding in the loss: the loss of a padded batch is the
    token-weighted mean of the same rows' losses computed one at a time."""
    prompts = tmp_path / "train.jsonl"
    write_jsonl(prompts, [to_prompt_completion(r) for r in _rows(12)])
    config = resolve_config("tiny-cpu", {"train": {"max_tokens_per_batch": 400}})
    trainer = build_trainer(prompts, config.model, config.lora, config.train, tmp_path / "out")
    loader = trainer.get_train_dataloader()
    batch = max(loader, key=lambda b: b["input_ids"].shape[0])
    rows, width = batch["input_ids"].shape
    assert rows > 1 and rows * width <= 400
    assert (batch["attention_mask"] == 0).any()  # there is padding to get wrong
    model = trainer.model.eval()
    with torch.no_grad():
        together = model(**batch).loss
        losses, counts = [], []
        for i in range(rows):
            keep = batch["attention_mask"][i].bool()
            one = {k: v[i : i + 1, keep] for k, v in batch.items() if v.dim() == 2}
            losses.append(model(**one).loss)
            counts.append(int((one["labels"][0, 1:] != -100).sum()))
    weighted = sum(x * c for x, c in zip(losses, counts, strict=True)) / sum(counts)
    torch.testing.assert_close(together, weighted, rtol=1e-5, atol=1e-5)
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


@pytest.mark.slow
def test_training_with_a_token_budget(tmp_path):
    prompts = tmp_path / "train.jsonl"
    write_jsonl(prompts, [to_prompt_completion(r) for r in _rows(24)])
    train = {"max_tokens_per_batch": 1024, "epochs": 1, "rows_per_step": 8}
    config = resolve_config("tiny-cpu", {"train": train})
    trainer = build_trainer(prompts, config.model, config.lora, config.train, tmp_path / "probe")
    micro_batches = len(trainer.get_train_dataloader())
    record = train_adapter(prompts, config.model, config.lora, config.train, tmp_path / "out")
    assert record.steps == 24 // 8  # the schedule's steps, whatever the budget
    assert micro_batches == record.steps * record.micro_batches_per_step
    assert record.tokens == sum(map(len, trainer.train_dataset["input_ids"]))


@pytest.mark.slow
def test_dequantized_weights_give_the_same_answers(tmp_path):
    config = resolve_config("tiny-cpu")
    texts = [to_prompt_completion(r)["prompt"] for r in make_rows(6)]
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model)
    ids = tokenizer(texts[0], return_tensors="pt")
    with torch.no_grad():
        quantized_logits = model(**ids).logits
        quantized = generate_cut(model, tokenizer, texts, 16, batch_size=3)
        assert dequantize_4bit_layers(model, torch.float32) == 2 * 7  # every linear in 2 layers
        assert not any("Linear4bit" in type(m).__name__ for m in model.modules())
        # bitsandbytes' CPU kernel multiplies in bf16 (AVX512-BF16); the dequantized layers in
        # fp32: the same weights, so the logits agree to bf16 rounding and the answers exactly.
        torch.testing.assert_close(model(**ids).logits, quantized_logits, rtol=1e-2, atol=1e-2)
        assert generate_cut(model, tokenizer, texts, 16, batch_size=3) == quantized


def test_batches_group_rows_by_length_and_fill_the_budget_exactly():
    # sorted by length: the two short rows together, the two long ones together
    assert token_budget_batches([100, 1, 100, 1], max_tokens=200) == [[1, 3], [0, 2]]
    assert token_budget_batches([50, 50, 50, 50], max_tokens=200) == [[0, 1, 2, 3]]  # 4 x 50
    assert token_budget_batches([50, 50, 50, 50], max_tokens=199) == [[0, 1, 2], [3]]


def test_rows_longer_than_the_budget_get_a_batch_each_and_no_empty_batch():
    assert token_budget_batches([300], max_tokens=256) == [[0]]
    assert token_budget_batches([400, 300], max_tokens=256) == [[1], [0]]
