"""Padding-free batches: rows end to end, attention kept within each row. The same loss and
gradients as padded rows, on a tiny model and through the real 4-bit training path."""

import pytest
import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from finance_qlora.batching import token_budget_batches
from finance_qlora.errors import ConfigError
from finance_qlora.files import write_jsonl
from finance_qlora.packing import ATTENTION, use_varlen_attention
from finance_qlora.presets import resolve_config
from finance_qlora.prompts import to_prompt_completion
from finance_qlora.training import build_trainer, train_adapter
from tests.conftest import make_rows, tiny_llama


def rows(lengths: list[int]) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    return [
        {"input_ids": torch.randint(3, 128, (n,), generator=generator).tolist()} for n in lengths
    ]


@pytest.mark.parametrize("kv_heads", [4, 2])  # plain and grouped-query attention
def test_packed_rows_give_the_padded_loss_and_gradients(kv_heads):
    batch = rows([5, 17, 3, 12, 9])
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(batch)
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(batch)
    assert packed["input_ids"].shape == (1, 46)  # no padding token at all

    reference = tiny_llama(kv_heads)
    loss_padded = reference(**padded).loss
    loss_padded.backward()
    model = tiny_llama(kv_heads)
    use_varlen_attention(model, "tiny")
    loss_packed = model(**packed).loss
    loss_packed.backward()

    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=1e-6)
    for (name, a), (_, b) in zip(
        model.named_parameters(), reference.named_parameters(), strict=True
    ):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_rows_do_not_attend_across_their_boundary():
    """Changing one row's tokens leaves the next row's logits unchanged."""
    model = tiny_llama(4)
    use_varlen_attention(model, "tiny")
    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    first, second = rows([6, 8])
    changed = {"input_ids": [t % 100 + 5 for t in first["input_ids"]]}
    logits = model(**collate([first, second])).logits[0, 6:]
    logits_changed = model(**collate([changed, second])).logits[0, 6:]
    torch.testing.assert_close(logits, logits_changed)


def test_the_packed_attention_refuses_a_batch_without_row_boundaries():
    model = tiny_llama(4)
    use_varlen_attention(model, "tiny")
    with pytest.raises(ValueError, match=f"{ATTENTION} attends padding-free batches only"):
        model(input_ids=torch.tensor([[5, 6, 7]]))


def test_a_model_with_its_own_attention_is_refused():
    """Bloom's attention does not go through transformers' interface: packed rows would see
    each other, so padding-free training is refused in one line."""
    from transformers import BloomConfig, BloomForCausalLM

    model = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2))
    with pytest.raises(ConfigError, match="train.padding_free: bloom-ish .* set train.padding_fr"):
        use_varlen_attention(model, "bloom-ish")


def test_padding_free_budgets_count_real_tokens():
    lengths = [10, 30, 20, 40, 50]
    assert token_budget_batches(lengths, 60, padded=False) == [[0, 2, 1], [3], [4]]
    # padded: rows x longest row, so fewer rows fit
    assert token_budget_batches(lengths, 60, padded=True) == [[0, 2], [1], [3], [4]]


@pytest.mark.slow
def test_padding_free_training_follows_the_padded_loss_curve(tmp_path):
    """The real path (bitsandbytes 4-bit on the CPU, PEFT, TRL): the same rows in the same
    batches, padded or end to end, give the same loss at every step."""
    prompts = tmp_path / "train.jsonl"
    write_jsonl(prompts, [to_prompt_completion(r) for r in make_rows(12)])
    curves = {}
    for padding_free in (False, True):
        config = resolve_config(
            "tiny-cpu",
            {
                "train": {"epochs": 2, "padding_free": padding_free, "learning_rate": 1e-2},
                # dropout draws its masks by the batch's shape, which padding changes
                "lora": {"dropout": 0.0},
            },
        )
        record = train_adapter(
            prompts, config.model, config.lora, config.train, tmp_path / str(padding_free)
        )
        curves[padding_free] = record.losses
    assert len(curves[True]) == len(curves[False]) == 6
    # training moves the weights (lr 1e-2), so the later steps also check the gradients
    assert curves[True] == pytest.approx(curves[False], rel=1e-5)


@pytest.mark.slow
def test_the_trainer_packs_budget_batches_and_attends_within_rows(tmp_path):
    """The wiring in build_trainer: the packed-rows attention, and budget batches that count
    real tokens (more rows fit than when padded)."""
    prompts = tmp_path / "train.jsonl"
    write_jsonl(prompts, [to_prompt_completion(r) for r in make_rows(24)])
    sizes = {}
    for padding_free in (False, True):
        # one step of all 24 rows, in micro-batches of at most 256 tokens
        train = {"padding_free": padding_free, "max_tokens_per_batch": 256, "rows_per_step": 24}
        config = resolve_config("tiny-cpu", {"train": train})
        trainer = build_trainer(
            prompts, config.model, config.lora, config.train, tmp_path / str(padding_free)
        )
        attention = trainer.model.config._attn_implementation
        assert (attention == ATTENTION) is padding_free
        batches = list(trainer.get_train_dataloader())
        if padding_free:
            assert all(b["input_ids"].shape[0] == 1 for b in batches)  # one row of rows
            assert all((b["input_ids"].shape[1]) <= 256 for b in batches)
        sizes[padding_free] = len(batches)
    assert sizes[True] < sizes[False]
