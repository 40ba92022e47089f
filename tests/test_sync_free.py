"""A training step the host never waits for (finance_qlora.sync_free): the loss, metrics and
updates of the libraries' own code, with nothing read back from the device in between and
every copy to it asynchronous."""

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.overrides import TorchFunctionMode

from finance_qlora import sync_free
from finance_qlora.files import write_jsonl
from finance_qlora.presets import resolve_config
from finance_qlora.prompts import to_prompt_completion
from finance_qlora.training import build_trainer
from tests.conftest import make_rows

READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"}


class HostReads(TorchFunctionMode):
    """Records each value read back to the host and each copy (`to`) with its target device
    and whether it waits: on a GPU each read, and each blocking copy, waits for the stream."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []
        self.copies: list[tuple[str, bool]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in READS:
            self.reads.append(name)
        if name == "to":
            target = kwargs.get("device", args[1] if len(args) > 1 else None)
            self.copies.append((str(target), bool(kwargs.get("non_blocking"))))
        return func(*args, **kwargs)


def trainer_for(tmp_path, **train):
    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts = tmp_path / "train.jsonl"
    write_jsonl(prompts, [to_prompt_completion(r) for r in make_rows(12)])
    config = resolve_config("tiny-cpu", {"train": {"warmup_ratio": 0, **train}})
    out = tmp_path / "out"
    return build_trainer(prompts, config.model, config.lora, config.train, out)


def first_batch(trainer) -> dict:
    return next(iter(trainer.get_train_dataloader()))


@pytest.mark.parametrize("padding_free", [False, True])
def test_the_loss_and_metrics_are_trls_with_nothing_read_back(tmp_path, monkeypatch, padding_free):
    trainer = trainer_for(tmp_path, padding_free=padding_free)
    model, batch = trainer.model.train(), first_batch(trainer)
    count = trainer._get_num_items_in_batch([batch], trainer.args.device)
    results = {}
    for enabled in (True, False):
        monkeypatch.setattr(sync_free, "ENABLED", enabled)
        trainer._metrics["train"].clear()
        trainer._total_train_tokens = 0
        torch.manual_seed(0)  # LoRA's dropout draws the same masks
        with HostReads() as host:
            loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=count)
        trainer.pending_metrics.flush(trainer)
        results[enabled] = loss, dict(trainer._metrics["train"]), host.reads
    ours, theirs = results[True], results[False]
    assert torch.equal(ours[0], theirs[0])
    assert ours[1] == theirs[1] and set(ours[1]) >= {"entropy", "mean_token_accuracy", "num_tokens"}
    # Nothing read back beyond what the model's own forward reads (transformers checks a
    # padded batch's mask for padding; on the CPU the packed attention reads the rows' bounds,
    # which FlashAttention takes on the GPU as they are)
    with HostReads() as forward:
        model(**batch, use_cache=False, fused_lm_head=True)
    assert ours[2] == forward.reads
    assert len(theirs[2]) > len(ours[2])  # TRL reads its metrics back in every micro-batch


def test_batches_and_their_token_count_go_to_the_device_without_waiting(tmp_path, monkeypatch):
    trainer = trainer_for(tmp_path)
    batch = first_batch(trainer)
    # a device that is not the host's (meta), so each copy to it shows
    monkeypatch.setattr(type(trainer.args), "device", property(lambda args: torch.device("meta")))
    with HostReads() as host:
        trainer._prepare_inputs(batch)
        trainer._get_num_items_in_batch([batch], trainer.args.device)
    to_device = [non_blocking for target, non_blocking in host.copies if target == "meta"]
    assert len(to_device) == len(batch) + 1 and all(to_device)  # each tensor, and the count
    assert host.reads == []


def test_training_logs_what_trl_logs(tmp_path, monkeypatch):
    history = {}
    for enabled in (True, False):
        monkeypatch.setattr(sync_free, "ENABLED", enabled)
        trainer = trainer_for(tmp_path / str(enabled), optimizer="paged_adamw_8bit")
        trainer.train()
        history[enabled] = [
            {k: v for k, v in entry.items() if "runtime" not in k and "per_second" not in k}
            for entry in trainer.state.log_history
        ]
    assert history[True] == history[False]
    steps = [entry for entry in history[True] if "loss" in entry]
    assert len(steps) == 6 and all("entropy" in e and e["num_tokens"] > 0 for e in steps)


def adam_8bit():
    import bitsandbytes as bnb

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(16, 256)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p)
    return params, bnb.optim.PagedAdamW8bit(params, lr=1e-2)


def test_the_8bit_optimizer_makes_the_same_updates_without_a_wait_per_parameter(monkeypatch):
    import pickle

    from bitsandbytes.optim import optimizer as bnb_optimizer

    waits = []
    monkeypatch.setattr(bnb_optimizer, "sync_gpu", lambda tensor: waits.append(tensor))
    plain, plain_optimizer = adam_8bit()
    quiet, quiet_optimizer = adam_8bit()
    assert sync_free.without_parameter_syncs(quiet_optimizer)
    assert sync_free.without_parameter_syncs(quiet_optimizer)  # once is enough: not nested
    assert type(quiet_optimizer).__mro__[1] is type(plain_optimizer)
    LambdaLR(quiet_optimizer, lambda step: 1.0)  # torch's schedulers wrap a bound step
    for _ in range(2):
        plain_optimizer.step()
        # bitsandbytes waits after each parameter, and once more at the end (paged)
        assert len(waits) == len(plain) + 1
        waits.clear()
        quiet_optimizer.step()
        assert waits == []  # and here not at all (no paged state: small tensors are not paged)
    assert all(torch.equal(a, b) for a, b in zip(plain, quiet, strict=True))
    # a state the driver pages keeps bitsandbytes' one wait at the end of the step
    quiet_optimizer.state[quiet[0]]["state1"].is_paged = True
    monkeypatch.setattr(quiet_optimizer, "prefetch_state", lambda p: None)  # no driver here
    quiet_optimizer.step()
    assert len(waits) == 1
    assert type(pickle.loads(pickle.dumps(quiet_optimizer))) is type(quiet_optimizer)
    assert not sync_free.without_parameter_syncs(torch.optim.AdamW(plain))
