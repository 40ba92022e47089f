"""Step 4: QLoRA training with TRL's SFTTrainer."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.logging import get_run_logger

from finance_qlora.config import LoraSettings, ModelConfig, TrainSettings
from finance_qlora.records import PromptRecord, TrainRecord
from finance_qlora.training import train_adapter
from tasks.common import (
    CACHE_POLICY,
    GPU_RETRIES,
    GPU_RETRY_DELAY_S,
    Progress,
    hf_token,
    retry_unless_bad_input,
    step_dir,
)


@task(
    name="train",
    cache_policy=CACHE_POLICY,
    persist_result=True,
    retries=GPU_RETRIES,
    retry_delay_seconds=GPU_RETRY_DELAY_S,
    retry_condition_fn=retry_unless_bad_input,
)
def train(
    prompts: PromptRecord,
    model: ModelConfig,
    lora: LoraSettings,
    settings: TrainSettings,
    output_dir: Path,
) -> TrainRecord:
    logger = get_run_logger()
    progress = Progress("train", "Training steps done")

    def on_log(step: int, total: int, loss: float) -> None:
        logger.info("step %d/%d  loss %.4f", step, total, loss)
        progress(step, total)

    # Same inputs, same folder: a retry finds the checkpoints of the failed try there.
    out = step_dir(output_dir, "train", prompts.fingerprint, model, lora, settings)
    record = train_adapter(
        prompts.train_path,
        model,
        lora,
        settings,
        out,
        token=hf_token(model.hf_token_secret, model.name),
        on_log=on_log,
    )
    if record.resumed_from:
        logger.info("resumed from the checkpoint at step %d", record.resumed_from)
    logger.info(
        "trained %d steps in %.1f s; loss %.4f -> %.4f",
        record.steps,
        record.seconds,
        record.losses[0],
        record.losses[-1],
    )
    return record
