"""What the host does around a training step, done once or off the critical path, with nothing
computed changed: the parameter count for the Trainer's FLOPs estimate taken once, the clip and
the zeroing over the trainable weights listed once, and batches collated by a loader process
while the step runs (train.loader_workers)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback

from finance_qlora.files import write_jsonl
from finance_qlora.presets import resolve_config
from finance_qlora.prompts import to_prompt_completion
from finance_qlora.step_trainer import zero_trainable_only
from finance_qlora.training import build_trainer, train_adapter
from tests.conftest import make_rows

pytestmark = pytest.mark.slow


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    write_jsonl(path, [to_prompt_completion(r) for r in make_rows(12)])
    return path


def test_the_flops_estimate_is_the_trainers_with_parameters_counted_once(
    prompts, tmp_path, monkeypatch
):
    config = resolve_config("tiny-cpu", {"train": {"epochs": 1}})
    trainer = build_trainer(prompts, config.model, config.lora, config.train, tmp_path / "out")
    batch = next(iter(trainer.get_train_dataloader()))
    assert trainer.floating_point_ops(batch) == Trainer.floating_point_ops(trainer, batch) > 0
    base = type(trainer.model.get_base_model())
    counts = []
    count = base.num_parameters
    monkeypatch.setattr(
        base, "num_parameters", lambda self, **k: counts.append(1) or count(self, **k)
    )
    trainer.counted_parameters = None
    trainer.train()
    assert trainer.state.global_step == 3 and len(counts) == 1  # not once a step
    tokens = sum(b["input_ids"].numel() for b in trainer.get_train_dataloader())
    assert trainer.state.total_flos == 6 * tokens * trainer.counted_parameters


def test_a_loader_process_collates_the_same_batches(prompts, tmp_path):
    """train.loader_workers=1: the same losses and adapter, bit for bit, as collating in the
    training process (the step sampler still decides every batch)."""
    adapters, losses = [], []
    for workers in (0, 1):
        config = resolve_config("tiny-cpu", {"train": {"epochs": 1, "loader_workers": workers}})
        trainer = build_trainer(
            prompts, config.model, config.lora, config.train, tmp_path / str(workers)
        )
        assert trainer.get_train_dataloader().num_workers == workers
        record = train_adapter(
            prompts, config.model, config.lora, config.train, tmp_path / f"run{workers}"
        )
        losses.append(record.losses)
        adapters.append(load_file(Path(record.folder, "adapter_model.safetensors")))
    assert losses[0] == losses[1]
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])


def test_clipping_the_trainable_weights_clips_what_the_trainer_clips(prompts, tmp_path):
    """The same norm and the same clipped gradients as the Trainer's clip over all of the
    model's parameters, with the model's parameters walked once, not once a step."""
    config = resolve_config("tiny-cpu", {"train": {"epochs": 1}})
    trainer = build_trainer(prompts, config.model, config.lora, config.train, tmp_path / "out")
    model = trainer.model
    trainable = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=generator) * 10 for p in trainable]
    clipped = []
    for clip in (Trainer._clip_grad_norm.__get__(trainer), trainer._clip_grad_norm):
        for p, g in zip(trainable, grads, strict=True):
            p.grad = g.clone()
        norm = clip(model)
        clipped.append((norm, [p.grad.clone() for p in trainable]))
    (norm_all, grads_all), (norm_ours, grads_ours) = clipped
    assert norm_all > trainer.args.max_grad_norm  # clipped, not left alone
    assert torch.equal(norm_all, norm_ours)
    assert all(torch.equal(a, b) for a, b in zip(grads_all, grads_ours, strict=True))
    walks = []
    model.parameters = lambda *a, **k: walks.append(1) or iter(trainable)
    trainer._clip_grad_norm(model)
    assert walks == []  # the list taken on the first clip


def test_zeroing_the_trainable_weights_zeroes_what_the_model_zeroes(prompts, tmp_path):
    """After the first call (the model's own, which also drops a stale gradient of a frozen
    weight) the Trainer's `model.zero_grad()` drops the trainable weights' gradients without
    walking the model; set_to_none=False is the model's own; put back after training."""
    config = resolve_config("tiny-cpu", {"train": {"epochs": 1}})
    trainer = build_trainer(prompts, config.model, config.lora, config.train, tmp_path / "out")
    model = trainer.model
    weights = list(model.parameters())
    trainable = [p for p in weights if p.requires_grad]
    frozen = next(p for p in weights if not p.requires_grad and p.is_floating_point())
    put_back = zero_trainable_only(model, trainer.trainable_weights)
    walks = []
    model.parameters = lambda *a, **k: walks.append(1) or iter(weights)
    for p in [*trainable, frozen]:
        p.grad = torch.ones_like(p)
    model.zero_grad()
    assert all(p.grad is None for p in weights) and walks == [1]  # its own walk
    for _ in range(2):
        for p in trainable:
            p.grad = torch.ones_like(p)
        model.zero_grad()
        # the trainer's list taken at the first of these, no walk at the second
        assert all(p.grad is None for p in trainable) and walks == [1, 1]
    assert all(a is b for a, b in zip(trainer.trainable_weights(), trainable, strict=True))
    trainable[0].grad = torch.ones_like(trainable[0])
    model.zero_grad(set_to_none=False)
    assert torch.equal(trainable[0].grad, torch.zeros_like(trainable[0])) and len(walks) == 3
    put_back()
    del model.parameters
    assert "zero_grad" not in vars(model)

    class InEffect(TrainerCallback):
        seen: list[bool] = []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            InEffect.seen.append("zero_grad" in vars(model))

    trainer.add_callback(InEffect())
    trainer.train()
    assert InEffect.seen == [True] * trainer.state.global_step and InEffect.seen
    assert "zero_grad" not in vars(trainer.model)
