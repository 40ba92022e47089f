"""One 8-bit optimizer update for all adapter weights (finance_qlora.flat_optimizer): the same
numbers as bitsandbytes' update weight by weight, in one call a parameter group."""

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.lr_scheduler import LambdaLR

from finance_qlora import flat_optimizer, sync_free
from finance_qlora.files import write_jsonl
from finance_qlora.flat_optimizer import flatten_adapters
from finance_qlora.presets import resolve_config
from finance_qlora.prompts import to_prompt_completion
from finance_qlora.training import train_adapter
from tests.conftest import make_rows

pytest.importorskip("bitsandbytes")


@pytest.fixture(autouse=True)
def fresh_overrides():
    """bitsandbytes keeps weight overrides in one process-wide manager: none before or after."""
    from bitsandbytes.optim import GlobalOptimManager

    GlobalOptimManager.get_instance().initialize()
    yield
    GlobalOptimManager.get_instance().initialize()


def weights() -> list[torch.nn.Parameter]:
    """Adapter-like weights (whole blocks of 256, 8-bit states), one that is not whole blocks,
    and one under bitsandbytes' 4,096-number floor for 8-bit states (32-bit states)."""
    torch.manual_seed(0)
    shapes = [(16, 256), (16, 300), (256, 16), (16, 512), (8, 8), (512, 16)]
    return [torch.nn.Parameter(torch.randn(*shape)) for shape in shapes]


def optimizer_for(params, **kwargs):
    import bitsandbytes as bnb

    groups = [
        {"params": params[:4], "weight_decay": 0.01},
        {"params": params[4:], "weight_decay": 0.0},
    ]
    return bnb.optim.PagedAdamW8bit(groups, lr=1e-2, **kwargs)


def run_steps(params, optimizer, steps=4):
    schedule = LambdaLR(optimizer, lambda step: 1.0 / (step + 1))  # wraps step, as the Trainer's
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:  # new gradients each step, as after a backward
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
        schedule.step()
        for p in params:
            p.grad = None  # the Trainer's zero_grad
    return params


def test_one_flat_update_makes_bitsandbytes_per_weight_updates(monkeypatch):
    from bitsandbytes import functional

    plain = run_steps(*(lambda p: (p, optimizer_for(p)))(weights()))
    params = weights()
    optimizer = optimizer_for(params)
    sync_free.without_parameter_syncs(optimizer)  # as the trainer does: that first
    # whole-block 8-bit weights of a group end to end: 3 in the first group (not (16, 300)),
    # 1 in the second (alone: left as it is, with (8, 8))
    assert flatten_adapters(optimizer) == 3
    assert [len(g["params"]) for g in optimizer.param_groups] == [2, 2]
    calls = []
    update = functional.optimizer_update_8bit_blockwise
    monkeypatch.setattr(
        functional,
        "optimizer_update_8bit_blockwise",
        lambda *a, **k: calls.append(a[2].numel()) or update(*a, **k),
    )
    run_steps(params, optimizer)
    # 8-bit updates a step: one for the three, (16, 300) alone (not whole blocks), the lone
    # (512, 16); (8, 8) has 32-bit states
    assert calls == [4096 + 4096 + 8192, 4800, 8192] * 4
    for a, b in zip(plain, params, strict=True):
        assert torch.equal(a, b)  # bit for bit
    assert type(pickle.loads(pickle.dumps(optimizer))) is type(optimizer)


def test_the_weights_are_views_of_the_flat_tensor():
    params = weights()
    before = [p.detach().clone() for p in params]
    optimizer = optimizer_for(params)
    flatten_adapters(optimizer)
    flat = optimizer.flat_groups[0].flat
    members = [0, 2, 3]  # not (16, 300)
    for p, value in zip([params[i] for i in members], [before[i] for i in members], strict=True):
        assert p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
        assert torch.equal(p, value) and p.is_leaf and p.requires_grad
    run_steps(params, optimizer, steps=1)
    assert torch.equal(params[0].reshape(-1), flat[: params[0].numel()])  # updated in place
    # a weight whose data is replaced afterwards would never be updated again: refused
    params[2].data = params[2].data.clone()
    with pytest.raises(RuntimeError, match="no longer lies in the optimizer's flat tensor"):
        run_steps(params, optimizer, steps=1)


def test_fp16s_loss_scaler_and_overridden_weights_keep_per_weight_updates():
    """A loss scaler unscales and checks the optimizer's own gradients (the flat one is filled
    only in step): nothing flattened. A weight with its own config (the Trainer asks 32-bit
    states for embeddings through bitsandbytes' module overrides) stays alone."""
    import bitsandbytes as bnb

    assert flatten_adapters(optimizer_for(weights()), scaled=True) == 0
    params = weights()
    holder = torch.nn.Module()
    holder.weight = params[0]
    bnb.optim.GlobalOptimManager.get_instance().register_module_override(
        holder, "weight", {"optim_bits": 32}
    )
    optimizer = optimizer_for(params)
    assert flatten_adapters(optimizer) == 2  # (256, 16) and (16, 512), not params[0]
    assert any(p is params[0] for p in optimizer.param_groups[0]["params"])
    run_steps(params, optimizer, steps=1)
    assert optimizer.state[params[0]]["state1"].dtype == torch.float32  # its override held


def test_the_block_is_read_from_bitsandbytes():
    optimizer = optimizer_for(weights())
    assert flat_optimizer.state_block(optimizer, optimizer.param_groups[0]) == 256
    assert not optimizer.state  # the probe left nothing behind


def test_settings_that_see_a_whole_weight_keep_per_weight_updates(monkeypatch):
    import bitsandbytes as bnb

    capped = optimizer_for(weights())
    capped.args.max_unorm = 1.0
    assert flatten_adapters(capped) == 0
    params = weights()
    bnb.optim.GlobalOptimManager.get_instance().override_config(params[0], "betas", (0.8, 0.9))
    assert flatten_adapters(optimizer_for(params)) == 2  # that weight alone
    assert flatten_adapters(optimizer_for(weights())) == 3  # others' overrides: not these
    stepped = optimizer_for(weights())
    run_steps([p for g in stepped.param_groups for p in g["params"]], stepped, steps=1)
    assert flatten_adapters(stepped) == 0  # states already made weight by weight
    assert flatten_adapters(torch.optim.AdamW(weights())) == 0
    monkeypatch.setattr(flat_optimizer, "ENABLED", False)
    assert flatten_adapters(optimizer_for(weights())) == 0


def adapter_training(tmp_path, **train):
    """Rows and the tiny model's settings with the 8-bit optimizer; r=64 on the 64-wide model:
    4,096-number adapter weights (8-bit states, whole blocks)."""
    prompts = tmp_path / "train.jsonl"
    write_jsonl(prompts, [to_prompt_completion(r) for r in make_rows(12)])
    overrides = {
        "train": {"optimizer": "paged_adamw_8bit", **train},
        "lora": {"r": 64, "alpha": 128},
    }
    return prompts, resolve_config("tiny-cpu", overrides)


def test_training_computes_the_same_adapter_with_one_update(tmp_path, monkeypatch):
    """The trainer's 8-bit optimizer flattened and not: the same losses and adapter bit for bit,
    with checkpoints saved on the way (PEFT saves weights that share one storage)."""
    prompts, config = adapter_training(tmp_path, epochs=1, checkpoint_steps=2)
    flattened = []
    real = flat_optimizer.flatten_adapters
    monkeypatch.setattr(
        flat_optimizer,
        "flatten_adapters",
        lambda o, **k: flattened.append(real(o, **k)) or flattened[-1],
    )
    records = {}
    for enabled in (True, False):
        monkeypatch.setattr(flat_optimizer, "ENABLED", enabled)
        out = tmp_path / str(enabled)
        records[enabled] = train_adapter(prompts, config.model, config.lora, config.train, out)
    assert flattened == [8, 0]  # q and v, A and B, on 2 layers
    assert records[True].losses == records[False].losses
    adapters = [load_file(Path(records[k].folder, "adapter_model.safetensors")) for k in records]
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])


def test_a_resumed_training_loads_the_flat_optimizers_state(tmp_path):
    """A checkpoint holds the flat tensor's optimizer state; a training resumed from it ends
    with the adapter of the training that ran through (bit for bit on the CPU)."""
    import shutil

    prompts, config = adapter_training(tmp_path, epochs=2, checkpoint_steps=2)
    whole = train_adapter(prompts, config.model, config.lora, config.train, tmp_path / "whole")
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-4", resumed_dir / "checkpoint-4")
    state = torch.load(resumed_dir / "checkpoint-4" / "optimizer.pt", weights_only=False)
    # the flat tensor; the Trainer's group without weight decay is empty
    assert [len(g["params"]) for g in state["param_groups"]] == [1, 0]
    resumed = train_adapter(prompts, config.model, config.lora, config.train, resumed_dir)
    assert resumed.resumed_from == 4 and whole.steps == 6
    a, b = (load_file(Path(r.folder, "adapter_model.safetensors")) for r in (whole, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_trainer_keeps_per_weight_updates_under_a_loss_scaler(tmp_path):
    """fp16 (the T4) steps the optimizer through accelerate's GradScaler: not flattened."""
    from finance_qlora.training import build_trainer

    prompts, config = adapter_training(tmp_path)
    made = {}
    for scaler in (None, torch.amp.GradScaler("cpu")):
        trainer = build_trainer(prompts, config.model, config.lora, config.train, tmp_path / "o")
        trainer.accelerator.scaler = scaler
        made[scaler is None] = trainer.create_optimizer()
    assert len(made[True].flat_groups) == 1  # bf16/fp32: one flat tensor
    assert not hasattr(made[False], "flat_groups")
