"""Step 4: QLoRA training with TRL's SFTTrainer."""

from __future__ import annotations

from prefect import task
from prefect.logging import get_run_logger

from finance_qlora.adapter import normalize_adapter_config
from finance_qlora.config import DeviceSettings, LoraSettings, ModelConfig, TrainSettings
from finance_qlora.parallel import process_count
from finance_qlora.records import PromptRecord, TrainRecord
from finance_qlora.schedule import micro_batch_words, steps_per_epoch
from finance_qlora.training import train_adapter
from tasks.compiled_layers import SharedLayers
from tasks.identity import StepIdentity, step_key
from tasks.progress import Progress
from tasks.retries import GPU_RETRIES, GPU_RETRY_DELAY_S, retry_unless_bad_input
from tasks.secrets import hf_token
from tasks.store_access import StoreRef, local, publish, store_of


@task(
    name="train",
    # Training reads the train prompts only: a new test sample does not retrain.
    cache_policy=StepIdentity(
        kind="train", entry=__name__, uses={"prompts": lambda p: p.train_sha256}
    ),
    retries=GPU_RETRIES,
    retry_delay_seconds=GPU_RETRY_DELAY_S,
    retry_condition_fn=retry_unless_bad_input,
)
def train(
    store: StoreRef,
    prompts: PromptRecord,
    model: ModelConfig,
    lora: LoraSettings,
    settings: TrainSettings,
    devices: DeviceSettings | None = None,
) -> TrainRecord:
    logger = get_run_logger()
    processes = process_count(devices or DeviceSettings())
    logger.info(
        "schedule: %d rows an optimizer step, %d steps an epoch of %d rows; micro-batches of %s",
        settings.rows_per_step,
        steps_per_epoch(prompts.train_rows, settings.rows_per_step),
        prompts.train_rows,
        micro_batch_words(settings),
    )
    if processes > 1:
        logger.info("data-parallel training on %d processes", processes)
    progress = Progress("train", "Training steps done")

    def on_log(step: int, total: int, loss: float) -> None:
        logger.info("step %d/%d  loss %.4f", step, total, loss)
        progress(step, total)

    # Same key, same staging folder: a retry finds the checkpoints of the failed try there.
    key = step_key()
    staging = store_of(store).staging("train", key)
    # opt-in: code from the store
    shared = SharedLayers.open(store, model, lora, settings, logger, processes)
    record = train_adapter(
        local(store, prompts).train_path,
        model,
        lora,
        settings,
        staging,
        token=hf_token(model.hf_token_secret, model.name),
        on_log=on_log,
        processes=processes,
        save_compiled=shared.target if shared else None,
    )
    if shared:
        shared.keep(logger)
    if record.resumed_from:
        logger.info("resumed from the checkpoint at step %d", record.resumed_from)
    losses = f"; loss {record.losses[0]:.4f} -> {record.losses[-1]:.4f}" if record.losses else ""
    logger.info(
        "trained %d steps of %d rows (%d micro-batches each) in %.1f s%s",
        record.steps,
        record.rows_per_step,
        record.micro_batches_per_step,
        record.seconds,
        losses,
    )
    normalize_adapter_config(record.path, model.name, model.revision)
    return publish(store, record, "train", key)  # checkpoints go: they only served retries
