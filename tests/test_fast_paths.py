"""The fast training paths compute what the plain ones do: TRL's fused LM head gives the
loss of full logits, and fp32 upcasts happen only where fp16 needs them."""

import pytest
import torch
import torch.nn.functional as F

from finance_qlora.files import write_jsonl
from finance_qlora.presets import resolve_config
from finance_qlora.prompts import to_prompt_completion
from finance_qlora.training import build_trainer
from tests.conftest import make_rows

pytestmark = pytest.mark.slow


def trainer_for(tmp_path, **train):
    prompts = tmp_path / "train.jsonl"
    write_jsonl(prompts, [to_prompt_completion(r) for r in make_rows(8)])
    overrides = {"train": train, "model": train.pop("model", {})}
    config = resolve_config("tiny-cpu", overrides)
    return build_trainer(prompts, config.model, config.lora, config.train, tmp_path / "out")


@pytest.mark.parametrize("padding_free", [False, True])
def test_the_fused_lm_head_gives_the_loss_of_full_logits(tmp_path, padding_free):
    """The trainer's loss (TRL's chunked LM head: no batch x length x vocabulary logits) equals
    cross-entropy over the model's full logits on the completion tokens."""
    trainer = trainer_for(tmp_path, padding_free=padding_free)
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model
    with torch.no_grad():
        fused = trainer.compute_loss(model, dict(batch))
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits.float()
    labels = batch["labels"]
    assert (labels != -100).sum() < labels.numel()  # the prompt is masked out
    plain = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def norm_dtypes(trainer) -> set[torch.dtype]:
    return {p.dtype for n, p in trainer.model.named_parameters() if "norm" in n}


def test_bf16_keeps_the_norms_in_bf16(tmp_path):
    trainer = trainer_for(tmp_path, model={"compute_dtype": "bfloat16"})
    assert norm_dtypes(trainer) == {torch.bfloat16}
    embeddings = trainer.model.get_input_embeddings().weight
    assert embeddings.dtype == torch.bfloat16 and not embeddings.requires_grad


def test_fp16_upcasts_the_norms_to_fp32(tmp_path):
    trainer = trainer_for(tmp_path, model={"compute_dtype": "float16"})
    assert norm_dtypes(trainer) == {torch.float32}
    lora = [p for n, p in trainer.model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
