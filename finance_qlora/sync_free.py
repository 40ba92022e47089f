"""A training step the host never waits for. The GPU runs a step's kernels in the order the host
queues them; each place where the host waits for the GPU to finish leaves the GPU idle while the
host then queues what comes next. Three such waits come from the libraries in every step, each
for a value that nothing needs until the next log line, or at all:

- TRL's SFTTrainer.compute_loss reads its entropy and token-accuracy metrics with `.item()`
  after each forward, before the backward is queued;
- the Trainer moves each batch, and its count of label tokens, to the GPU with blocking copies
  (a blocking host-to-device copy waits for everything queued before it);
- bitsandbytes' 8-bit optimizers call `torch.cuda.synchronize()` after each parameter's update
  (0.50: 128 times a step for q/v adapters on 32 layers).

Here the metrics stay on the GPU until the Trainer logs, batches are copied from pinned memory
without waiting, and the optimizer runs the same updates without the waits. Nothing computed
changes: the same kernels run in the same order on one stream.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import torch

# The benchmarks turn this off to time a step with the libraries' own waits beside it.
ENABLED = True


def takes_default_loss(trainer, model, return_outputs: bool) -> bool:
    """Whether TRL's compute_loss would take its plain branch here (the fused LM head's
    negative log-likelihood), the one `sft_loss` computes; any other (label smoothing, a
    custom loss, MoE aux loss, sequence parallelism, evaluation) stays with TRL."""
    parallelism = getattr(trainer.accelerator, "parallelism_config", None)
    return (
        ENABLED
        and model.training
        and not return_outputs
        and trainer.compute_loss_func is None
        and trainer.label_smoother is None
        and not trainer.aux_loss_enabled
        and trainer.args.loss_type == "nll"
        and not (parallelism is not None and getattr(parallelism, "sp_enabled", False))
    )


class PendingMetrics:
    """TRL's per-micro-batch training metrics, kept as GPU tensors until the Trainer logs."""

    def __init__(self):
        self.values: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.tokens: list[torch.Tensor | int] = []

    def add(self, trainer, outputs, inputs) -> None:
        gather = trainer.accelerator.gather_for_metrics
        num_valid = gather(outputs.label_mask.sum()).sum()
        entropy_sum = gather(outputs.entropy.detach().sum()).sum()
        num_correct = gather(outputs.is_top1.sum()).sum()
        # TRL: (sum / num_valid).item() if num_valid > 0 else 0.0
        per_valid = num_valid.clamp(min=1)
        self.values["entropy"].append(torch.where(num_valid > 0, entropy_sum / per_valid, 0.0))
        accuracy = torch.where(num_valid > 0, num_correct / per_valid, 0.0)
        self.values["mean_token_accuracy"].append(accuracy)
        if "attention_mask" in inputs:
            self.tokens.append(gather(inputs["attention_mask"].sum()).sum())
        elif "position_ids" in inputs:
            size = inputs["position_ids"].size(1)  # known on the host: sent only to gather
            if trainer.accelerator.num_processes > 1:
                size = gather(torch.tensor(size, device=inputs["position_ids"].device)).sum()
            self.tokens.append(size)
        else:
            raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")

    def flush(self, trainer) -> None:
        """Into TRL's own lists, as its compute_loss would have put them: one wait per log."""
        metrics = trainer._metrics["train"]
        for name, values in self.values.items():
            metrics[name].extend(torch.stack(values).tolist())
        if self.tokens:
            for tokens in torch.stack([torch.as_tensor(t) for t in self.tokens]).tolist():
                trainer._total_train_tokens += tokens // trainer._tp_size
            metrics["num_tokens"] = [trainer._total_train_tokens]
        self.values.clear()
        self.tokens.clear()


def sft_loss(trainer, model, inputs, num_items_in_batch, pending: PendingMetrics):
    """TRL's plain-branch loss (SFTTrainer.compute_loss, trl 1.16), its metrics left pending."""
    inputs["use_cache"] = False
    outputs = model(**inputs, fused_lm_head=True)
    per_token_loss = -outputs.log_probs  # zero on ignored positions
    num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
    loss = per_token_loss.sum() / torch.as_tensor(num_tokens).clamp(min=1)
    if trainer.args.average_tokens_across_devices and num_items_in_batch is not None:
        loss = loss * (trainer.accelerator.num_processes // trainer.get_tp_size())
    pending.add(trainer, outputs, inputs)
    return loss


@contextmanager
def _no_parameter_syncs(bnb_optimizer):
    saved = bnb_optimizer.sync_gpu
    bnb_optimizer.sync_gpu = lambda tensor: None
    try:
        yield saved
    finally:
        bnb_optimizer.sync_gpu = saved


# One subclass per bitsandbytes optimizer class, kept here under its own name, so that an
# optimizer with it still pickles.
_UNSYNCED: dict[type, type] = {}


def _on_default_stream() -> bool:
    """bitsandbytes' kernels run on CUDA's default stream; the order holds only from there."""
    return not torch.cuda.is_available() or (
        torch.cuda.current_stream() == torch.cuda.default_stream()
    )


def _unsynced_class(base: type, bnb_optimizer) -> type:
    if base not in _UNSYNCED:

        class Unsynced(base):
            def step(self, closure=None):
                if not ENABLED or not _on_default_stream():
                    return super().step(closure)
                with _no_parameter_syncs(bnb_optimizer) as sync_gpu:
                    loss = super().step(closure)
                paged = [
                    p for p, s in self.state.items() if getattr(s.get("state1"), "is_paged", 0)
                ]
                if paged:
                    sync_gpu(paged[0])
                return loss

        name = f"Unsynced{base.__name__}"
        Unsynced.__name__ = Unsynced.__qualname__ = name
        globals()[name] = _UNSYNCED[base] = Unsynced
    return _UNSYNCED[base]


def without_parameter_syncs(optimizer) -> bool:
    """A bitsandbytes optimizer's step without its wait after each parameter: the updates are
    queued on one stream in the same order, so they compute the same. Paged states (moved by
    the driver) keep bitsandbytes' one wait at the end of the step; q/v adapters have none
    (bitsandbytes pages only tensors of 100,000 elements or more). Returns whether it applied."""
    try:
        from bitsandbytes.optim import optimizer as bnb_optimizer
    except ImportError:
        return False
    base = type(optimizer)
    if base in _UNSYNCED.values():
        return True
    if not (
        isinstance(optimizer, bnb_optimizer.Optimizer8bit)
        and callable(getattr(bnb_optimizer, "sync_gpu", None))
    ):
        return False
    # a subclass keeps a bound step (torch's LR scheduler wraps step.__func__)
    optimizer.__class__ = _unsynced_class(base, bnb_optimizer)
    return True
