"""TRL's SFTTrainer with the recipe's schedule: each optimizer step holds `train.rows_per_step`
rows (`batching.StepSampler`), computed in micro-batches, with a warm-up that never runs at
learning rate 0; steps the host never waits for (`sync_free`); one 8-bit optimizer update for
all adapter weights (`flat_optimizer`); the host's work around a step done once (the FLOPs
estimate's parameter count, the clip's and the zeroing's weight lists); and what it leaves in
process-wide state set back after training: the modeling names it patches (Liger's kernels),
the embeddings it registers with bitsandbytes.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

from finance_qlora import flat_optimizer, sync_free
from finance_qlora.batching import MaskableRows, MicroBatching, StepSampler
from finance_qlora.config import TrainSettings
from finance_qlora.kernels import ModuleNames


def micro_batching(train: TrainSettings) -> MicroBatching:
    return MicroBatching(train.batch_size, train.max_tokens_per_batch, not train.padding_free)


def warmup_that_updates(schedule, warmup_steps: int):
    """A warm-up whose first step already updates: transformers' warm-up factor is step /
    warmup, 0 at step 0 (a whole step at learning rate 0); read one step ahead during warm-up,
    its w steps update at 1/w, 2/w, ... 1, and the schedule after warm-up is unchanged."""

    def factor(step: int) -> float:
        return schedule(step + 1) if step < warmup_steps else schedule(step)

    return factor


def forget_optimizer_overrides(model) -> None:
    """Drop the model's modules from bitsandbytes' process-wide optimizer overrides. With an
    8-bit optimizer, transformers' Trainer registers every nn.Embedding of the model there (to
    be optimized in 32 bits), and the registry keeps each module for the life of the process:
    every training in a worker left its embeddings on the card, 0.25 GiB for a 7B model
    (benchmarks/results/held-memory-NVIDIA-H200-2026-11-30-*.json). Also what an optimizer
    derived from them, keyed by the parameters' ids, which a later model's weights may reuse."""
    registry = sys.modules.get("bitsandbytes.optim.optimizer")
    if registry is None:  # never imported: nothing registered
        return
    manager = registry.GlobalOptimManager.get_instance()
    mine = {id(module) for module in model.modules()}
    dropped = [t for t in manager.module_weight_config_triple if id(t[0]) in mine]
    if not dropped:
        return
    configs = {id(config) for _, _, config in dropped}
    for module, name, _ in dropped:
        manager.pid2config.pop(id(getattr(module, name, None)), None)
    for key in [k for k, config in manager.index2config.items() if id(config) in configs]:
        del manager.index2config[key]
    manager.module_weight_config_triple[:] = [
        t for t in manager.module_weight_config_triple if id(t[0]) not in mine
    ]


def drop_gradients(weights: list) -> None:
    """What `Module.zero_grad()` does to each weight (set_to_none, its default)."""
    for weight in weights:
        weight.grad = None


def zero_trainable_only(model, trainable: Callable[[], list]) -> Callable[[], None]:
    """`model.zero_grad()`, which the Trainer calls after every optimizer step, over the
    trainable weights only (`trainable()`, the trainer's list): only they get gradients from a
    step, and walking every module's parameters costs about 3.5 ms of host time a step on a 7B
    model with adapters (H200 profile, 2026-11-29). Its first call (the Trainer's, before the
    first step) is the model's own, so a stale gradient of a frozen weight goes too;
    `set_to_none=False` is the model's own as well. Returns what puts the model's own back."""
    own = vars(model).get("zero_grad")  # an instance's own, if it had one
    walk = model.zero_grad
    walked = False

    def zero_grad(set_to_none: bool = True) -> None:
        nonlocal walked
        if not walked or not set_to_none:
            walk(set_to_none)
            walked = True
            return
        drop_gradients(trainable())

    model.zero_grad = zero_grad

    def put_back() -> None:
        if own is None:
            del model.zero_grad
        else:
            model.zero_grad = own

    return put_back


def step_trainer_class():
    """TRL's SFTTrainer whose optimizer steps hold `train.rows_per_step` rows each, computed
    in micro-batches (`batching.StepSampler`), with a warm-up that never runs at lr 0."""
    import torch
    from accelerate.utils import DistributedType, send_to_device
    from torch.optim.lr_scheduler import LambdaLR
    from torch.utils.data import DataLoader
    from transformers import TrainerCallback
    from trl import SFTTrainer

    # one process or plain data parallelism: every gradient whole on its own device
    PLAIN = (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)

    class EpochToSampler(TrainerCallback):
        """The epoch reaches the sampler at each epoch's start: the Trainer's own set_epoch
        looks for a sampler that a plain DataLoader's batch_sampler does not offer (on a resume
        accelerate's skip wrapper happens to reach it; this does not depend on that)."""

        def __init__(self, trainer: StepTrainer):
            self.trainer = trainer

        def on_epoch_begin(self, args, state, control, **kwargs):
            if self.trainer.step_sampler is not None:
                # state.epoch: whole at an epoch's start, fractional when resumed mid-epoch
                self.trainer.step_sampler.set_epoch(math.floor(state.epoch + 1e-9))

    class StepTrainer(SFTTrainer):
        # the model's gradients zeroed over its trainable weights (`zero_trainable_only`)
        trainable_zeroing = True

        def __init__(self, *args, steps: TrainSettings, **kwargs):
            self.steps = steps
            self.step_sampler: StepSampler | None = None
            # Liger's kernels (use_liger_kernel) are patched into the model's modeling module
            # for every model the process builds later: set back once training ends, so the
            # evaluations and answers that follow in this worker run the kernels those before
            # it ran.
            model = kwargs["model"]
            self.modeling_names = ModuleNames(sys.modules[type(model).__module__])
            self.pending_metrics = sync_free.PendingMetrics()
            self.counted_parameters: int | None = None
            self.trainable_parameters: list | None = None
            super().__init__(*args, **kwargs)
            self.add_callback(EpochToSampler(self))

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if sync_free.takes_default_loss(self, model, return_outputs):
                pending = self.pending_metrics
                return sync_free.sft_loss(self, model, inputs, num_items_in_batch, pending)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def log(self, logs, start_time=None):
            self.pending_metrics.flush(self)
            super().log(logs, start_time)

        def floating_point_ops(self, inputs) -> int:
            # The Trainer's estimate for its logs (6 x input tokens x parameters) with the
            # parameters counted once: counting walks every module (about 1,000 on a 7B
            # model with adapters), milliseconds of host time in each step otherwise.
            main = getattr(self.model, "main_input_name", "input_ids")
            if main not in inputs or not hasattr(self.model, "num_parameters"):
                return 0
            if self.counted_parameters is None:
                self.counted_parameters = self.model.num_parameters(exclude_embeddings=True)
            return 6 * inputs[main].numel() * self.counted_parameters

        def _clip_grad_norm(self, model):
            # Only the trainable weights can have gradients: clip those
            # instead of walking all of the model's parameters each step (about 6 ms of host
            # time a step on a 7B model with adapters, H200, 2026-11-29, for the Trainer's whole
            # clip). The same norm and the same clipped gradients; other setups (DeepSpeed,
            # FSDP, sharded gradients) keep the Trainer's.
            plain = self.accelerator.distributed_type in PLAIN and not self.is_fsdp_enabled
            if not plain or self._has_mixed_mesh_grads(model):
                return super()._clip_grad_norm(model)
            return self.accelerator.clip_grad_norm_(
                self.trainable_weights(), self.args.max_grad_norm
            )

        def trainable_weights(self) -> list:
            """The weights that get gradients, listed once for the clip and the zeroing (the
            model's own parameters: a DDP wrapper's are the same tensors)."""
            if self.trainable_parameters is None:
                weights = self.model.parameters()
                self.trainable_parameters = [p for p in weights if p.requires_grad]
            return self.trainable_parameters

        def _prepare_input(self, data):
            if sync_free.ENABLED and not self.is_deepspeed_enabled:
                # from pinned memory, asynchronous; a pageable tensor is staged first (safe)
                return send_to_device(data, self.args.device, non_blocking=True)
            return super()._prepare_input(data)

        def _get_num_items_in_batch(self, batch_samples, device):
            labels = batch_samples[0].get("labels") if batch_samples else None
            on_host = labels is not None and labels.device.type == "cpu"
            if sync_free.ENABLED and self.args.world_size == 1 and on_host:
                # counted where the labels are (the host), then sent on without waiting
                count = super()._get_num_items_in_batch(batch_samples, torch.device("cpu"))
                return send_to_device(count, device, non_blocking=True)
            return super()._get_num_items_in_batch(batch_samples, device)

        def create_optimizer(self, model=None):
            optimizer = super().create_optimizer(model)
            sync_free.without_parameter_syncs(optimizer)
            # after sync_free (its subclass first), before the scheduler wraps step; not under
            # fp16's loss scaler, which unscales and checks the optimizer's own gradients
            scaled = self.args.fp16 or getattr(self.accelerator, "scaler", None) is not None
            flat_optimizer.flatten_adapters(optimizer, scaled=scaled)
            return optimizer

        def train(self, *args, **kwargs):
            # with one process the Trainer zeroes this model itself; a wrapper (DDP, FSDP)
            # walks its own parameters and never calls this
            put_back = None
            if self.trainable_zeroing:
                put_back = zero_trainable_only(self.model, self.trainable_weights)
            try:
                return super().train(*args, **kwargs)
            finally:
                try:
                    if put_back is not None:
                        put_back()
                    self.modeling_names.restore()
                finally:
                    forget_optimizer_overrides(self.model)

        def get_train_dataloader(self):
            # The Trainer's private column filter: what its own loader would feed the collator.
            dataset = self._remove_unused_columns(self.train_dataset, description="Training")
            sampler = StepSampler(
                [len(ids) for ids in dataset["input_ids"]],
                self.steps.rows_per_step,
                micro_batching(self.steps),
                self.args.seed,
                epochs=math.ceil(self.args.num_train_epochs),
                rank=self.args.process_index,
                processes=self.args.world_size,
            )
            # The Trainer accumulates a fixed number of micro-batches per step: the plan's.
            self.args.gradient_accumulation_steps = sampler.micro_batches_per_step
            self.step_sampler = sampler
            # Not through accelerate's prepare: the sampler shards the steps over the processes
            # itself (accelerate would deal whole micro-batches round-robin and repeat the first
            # ones to even them out); the Trainer moves each batch to the device.
            return DataLoader(
                MaskableRows(dataset),
                batch_sampler=sampler,
                collate_fn=self.data_collator,
                num_workers=self.args.dataloader_num_workers,
                pin_memory=self.args.dataloader_pin_memory,
            )

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            if self.lr_scheduler is None:
                optimizer = optimizer or self.optimizer
                schedule = super().create_scheduler(num_training_steps, optimizer)
                warmup = self.args.get_warmup_steps(num_training_steps)
                if warmup and isinstance(schedule, LambdaLR):
                    shifted = [warmup_that_updates(f, warmup) for f in schedule.lr_lambdas]
                    self.lr_scheduler = LambdaLR(optimizer, shifted)
            return self.lr_scheduler

    return StepTrainer
