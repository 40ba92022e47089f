"""QLoRA: a 4-bit base model, LoRA adapters (PEFT), one supervised pass with TRL's SFTTrainer.

The data set is prompt/completion pairs, so SFTTrainer computes the loss on the completion
only and appends EOS to it: the model learns to answer and to stop.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from finance_qlora import compile_cache, cublas_workspace, heap
from finance_qlora.config import LoraSettings, ModelConfig, TrainSettings
from finance_qlora.errors import ConfigError, TrainingError
from finance_qlora.files import atomic_dir, fingerprint, read_jsonl
from finance_qlora.kernels import compile_layers, uncast_adapter_inputs
from finance_qlora.modeling import (
    check_special_tokens,
    compute_dtype,
    load_model,
    load_tokenizer,
    maybe_dequantize,
    release_memory,
)
from finance_qlora.packing import use_varlen_attention
from finance_qlora.parallel import train_data_parallel
from finance_qlora.prompts import fit_rows, shortest_row
from finance_qlora.records import TrainRecord
from finance_qlora.step_trainer import step_trainer_class

FINAL = "final"
CHECKPOINTING = {"use_reentrant": False}
log = logging.getLogger(__name__)


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint that the Trainer finished writing (its trainer_state.json is last)."""
    done = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def lora_config(lora: LoraSettings):
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        # PEFT takes "all-linear" as a plain string, not inside a list
        target_modules="all-linear"
        if lora.target_modules == ["all-linear"]
        else list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def check_targets(model, targets: list[str], model_name: str) -> None:
    """The LoRA target modules exist in `model` (a loaded model or one on the meta device), and
    none is the output head: "all-linear" leaves it out too, and an adapter on it would also
    have to carry the head's vocabulary-sized matrices."""
    if targets == ["all-linear"]:
        return
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ConfigError(
            f"lora.target_modules: {', '.join(missing)} not in {model_name}; "
            "choose among e.g. q_proj, k_proj, v_proj, o_proj, or all-linear"
        )
    head = model.get_output_embeddings()
    heads = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if module is head}
    if heads & set(targets):
        raise ConfigError(
            f"lora.target_modules: {', '.join(sorted(heads & set(targets)))} is the output head "
            f"of {model_name}, not a LoRA target here; choose among e.g. q_proj, k_proj, v_proj, "
            "o_proj, or all-linear"
        )


def sft_config(train: TrainSettings, dtype: torch.dtype, out_dir: Path):
    from trl import SFTConfig

    on_gpu = torch.cuda.is_available()
    return SFTConfig(
        output_dir=str(out_dir),
        num_train_epochs=train.epochs,
        learning_rate=train.learning_rate,
        per_device_train_batch_size=train.batch_size,
        # set by the trainer from its step plan (StepTrainer.get_train_dataloader)
        gradient_accumulation_steps=1,
        # fit_to_length already fits every row; TRL refuses a max_length with padding_free
        max_length=None if train.padding_free else train.max_seq_length,
        padding_free=train.padding_free,
        # padding-free batches have no padding to round up (each pad would be a row of its own)
        pad_to_multiple_of=None if train.padding_free else train.pad_to_multiple_of,
        use_liger_kernel=train.fused_kernels,
        warmup_steps=train.warmup_ratio,  # below 1: a fraction of all steps
        lr_scheduler_type=train.lr_scheduler,
        gradient_checkpointing=train.gradient_checkpointing,
        # Non-reentrant checkpointing works under DDP (the reentrant kind marks LoRA weights
        # ready twice), and PEFT leaves most parameters frozen: DDP need not look for unused ones.
        gradient_checkpointing_kwargs=CHECKPOINTING,
        ddp_find_unused_parameters=False,
        optim=train.optimizer,
        logging_steps=train.logging_steps,
        logging_nan_inf_filter=False,  # the default reports a NaN loss as 0: we want to see it
        seed=train.seed,
        data_seed=train.seed,
        # fp16 uses AMP loss scaling with the LoRA weights kept in fp32 (the T4 path).
        bf16=on_gpu and dtype == torch.bfloat16,
        fp16=on_gpu and dtype == torch.float16,
        use_cpu=not on_gpu,
        completion_only_loss=True,
        save_strategy="steps" if train.checkpoint_steps else "no",
        save_steps=train.checkpoint_steps or 500,
        save_total_limit=2,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=train.loader_workers,
    )


def single_device(args) -> None:
    """One process trains on one GPU: on a host with several, TrainingArguments counts them all
    and the Trainer would wrap the model in nn.DataParallel (which the step sampler, a 4-bit
    model and TRL refuse). `_n_gpu` is the field transformers itself sets to 1 for a model
    spread over several GPUs (private; no public setting does this)."""
    if args.n_gpu > 1:
        args._n_gpu = 1


def train_adapter(
    prompts_path: Path,
    model_cfg: ModelConfig,
    lora: LoraSettings,
    train: TrainSettings,
    out_dir: Path,
    token: str | None = None,
    on_log: Callable[[int, int, float], None] | None = None,
    callbacks: list | None = None,
    processes: int = 1,
    save_compiled: Path | None = None,
) -> TrainRecord:
    """Train LoRA adapters on prompt/completion pairs; resume from a checkpoint in `out_dir`.
    With `processes` > 1, data-parallel over that many ranks (`parallel.train_data_parallel`).

    `save_compiled`: with train.compile, where rank 0 writes the compiled layers after training
    (`finance_qlora.compile_cache`), for workers whose caches are empty.

    On CUDA out-of-memory, retry with micro-batches half as large (rows or tokens), down to one
    row: the optimizer steps keep their rows (`train.rows_per_step`), only split finer.
    """
    if callbacks and processes > 1:
        raise ValueError("callbacks run in this process only: train with processes=1")
    settings = train
    while True:
        try:
            if processes > 1:
                return train_data_parallel(
                    prompts_path,
                    model_cfg,
                    lora,
                    settings,
                    out_dir,
                    processes,
                    token,
                    on_log,
                    save_compiled=save_compiled,
                )
            return train_in_process(
                prompts_path,
                model_cfg,
                lora,
                settings,
                out_dir,
                token,
                on_log,
                callbacks or [],
                save_compiled=save_compiled,
            )
        except torch.OutOfMemoryError:
            settings = smaller_micro_batches(settings)
            log.warning(
                "out of GPU memory: retrying with micro-batches of %s (%d rows a step, as before)",
                f"{settings.max_tokens_per_batch} tokens"
                if settings.max_tokens_per_batch
                else f"{settings.batch_size} rows",
                settings.rows_per_step,
            )
        # here, not in the except block, whose traceback still holds the failed attempt's model
        release_memory()


def smaller_micro_batches(train: TrainSettings) -> TrainSettings:
    """Half the micro-batch (rows, or the token budget down to one longest row); the step's rows
    stay the same. TrainingError where it is one row already."""
    budget = train.max_tokens_per_batch
    if train.batch_size == 1 and (budget is None or budget <= train.max_seq_length):
        raise TrainingError(
            "train.batch_size: out of GPU memory even at one row a micro-batch; lower "
            "train.max_seq_length or turn on train.gradient_checkpointing"
        )
    return train.model_copy(
        update={
            "batch_size": max(train.batch_size // 2, 1),
            "max_tokens_per_batch": budget and max(budget // 2, train.max_seq_length),
        }
    )


def row_length(tokenizer) -> Callable[[str, str], int]:
    """Tokens of a training row, exactly what TRL tokenizes: prompt + completion + EOS."""

    def length(prompt: str, completion: str) -> int:
        return len(tokenizer(text=prompt + completion + tokenizer.eos_token)["input_ids"])

    return length


def no_row_fits(rows: list[dict[str, str]], length: Callable[[str, str], int], max_seq_length: int):
    """The error when train.max_seq_length is below every row's shortest form."""
    need = shortest_row(rows, length)
    return ConfigError(
        f"train.max_seq_length: {max_seq_length} tokens is too short for any training row (the "
        f"shortest, a prompt with the first sentence of its answer and EOS, takes {need}); "
        f"raise it to at least {need}"
    )


def fit_to_length(rows: list[dict], tokenizer, max_seq_length: int) -> list[dict[str, str]]:
    """Rows that fit train.max_seq_length with their EOS: a long answer is cut at a sentence
    boundary, a row that cannot fit is dropped (TRL would cut it mid-word, EOS lost)."""
    length = row_length(tokenizer)
    pairs = [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]
    kept, trimmed, dropped = fit_rows(pairs, length, max_seq_length)
    if trimmed or dropped:
        log.warning(
            "%d of %d training rows exceed train.max_seq_length=%d tokens: %d answers cut at a "
            "sentence boundary (EOS kept), %d rows dropped",
            trimmed + dropped,
            len(rows),
            max_seq_length,
            trimmed,
            dropped,
        )
    if not kept:
        raise no_row_fits(pairs, length, max_seq_length)
    return kept


def prepare_for_lora(model, upcast: bool, checkpointing: bool) -> None:
    """Freeze the base model; with `upcast`, keep its norms, embeddings and head in fp32.

    PEFT's prepare_model_for_kbit_training upcasts them whatever the dtype. In bf16 that buys no
    stability (bf16 has fp32's range, and RMSNorm already computes in fp32) and costs casts and
    fp32 traffic in every layer, so only fp16 (the T4), which can overflow, upcasts.
    """
    for param in model.parameters():
        param.requires_grad = False
        half = param.dtype in (torch.float16, torch.bfloat16)
        if upcast and half and param.__class__.__name__ != "Params4bit":
            param.data = param.data.float()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTING)
        # the frozen embeddings' output must carry a gradient for checkpointed layers to see one
        model.enable_input_require_grads()


def build_trainer(
    prompts_path: Path,
    model_cfg: ModelConfig,
    lora: LoraSettings,
    train: TrainSettings,
    out_dir: Path,
    token: str | None = None,
    callbacks: list | None = None,
):
    """The 4-bit model (dequantized where the GPU has room), LoRA, and the SFT trainer."""
    from datasets import Dataset
    from transformers import PrinterCallback

    tokenizer = load_tokenizer(model_cfg, token)
    rows = read_jsonl(prompts_path)
    dataset = Dataset.from_list(fit_to_length(rows, tokenizer, train.max_seq_length))
    dtype = compute_dtype(model_cfg.compute_dtype)
    model = load_model(model_cfg, token)
    check_targets(model, lora.target_modules, model_cfg.name)
    check_special_tokens(model, tokenizer, model_cfg.name)
    dequantized = model_cfg.load_in_4bit and maybe_dequantize(model, train.dequantize, dtype)
    if dequantized:
        log.info("training on base weights dequantized once from NF4")
    if model_cfg.load_in_4bit:
        # dequantized linear weights stay in the compute dtype: fp32 copies would not fit
        upcast = dtype == torch.float16 and not dequantized
        prepare_for_lora(model, upcast, train.gradient_checkpointing)
    if train.padding_free:
        use_varlen_attention(model, model_cfg.name)
    args = sft_config(train, dtype, out_dir)
    single_device(args)  # under torchrun each rank already has one
    trainer = step_trainer_class()(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(lora),
        callbacks=callbacks or [],
        steps=train,
    )
    # With disable_tqdm the Trainer prints every log dict to stdout; the train task logs the
    # loss itself, through Prefect.
    trainer.remove_callback(PrinterCallback)
    # TRL casts the adapters of a 4-bit model to bf16, also after dequantizing (the model still
    # says it is quantized). Trainable weights stay fp32 on every card: fp16 loss scaling needs
    # it (T4), and in bf16 small updates round away. Mixed precision still computes in
    # bf16/fp16. The optimizer is created later, in train(), so it sees fp32.
    for param in trainer.model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    if train.compile:
        log.info("compiled %d decoder layers (torch.compile)", compile_layers(trainer.model))
    return trainer


def train_in_process(
    prompts_path: Path,
    model_cfg: ModelConfig,
    lora: LoraSettings,
    train: TrainSettings,
    out_dir: Path,
    token: str | None,
    on_log: Callable[[int, int, float], None] | None,
    callbacks: list,
    save_compiled: Path | None = None,
) -> TrainRecord | None:
    """One training run in this process (one rank of several under torchrun: only rank 0
    writes the adapter and returns its record; the others return None). `save_compiled`: as
    in `train_adapter`."""
    from transformers import TrainerCallback

    class Report(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            # The last step is always logged: with train.logging_steps above the number of
            # steps, no loss would be logged at all.
            if state.global_step >= state.max_steps:
                control.should_log = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(loss):
                raise TrainingError(
                    f"training loss is {loss} at step {state.global_step}; "
                    "lower train.learning_rate or check the data"
                )
            if loss is not None and on_log is not None:
                on_log(state.global_step, state.max_steps, loss)

    checkpoint = latest_checkpoint(out_dir)
    if checkpoint is not None:
        log.info("resuming from %s", checkpoint)
    # the heap alive before the model stays out of the collections in its steps and at its
    # release (finance_qlora.heap)
    with heap.frozen():
        trainer = build_trainer(
            prompts_path, model_cfg, lora, train, out_dir, token, [Report(), *callbacks]
        )
        started = time.perf_counter()
        try:
            # the steps' products do not parse cuBLAS's workspace variable (cublas_workspace)
            with uncast_adapter_inputs(trainer), cublas_workspace.unnamed(trainer.args.device):
                trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
            seconds = time.perf_counter() - started
            final = out_dir / FINAL
            if not trainer.is_world_process_zero():
                return None
            with atomic_dir(final) as tmp:
                trainer.model.save_pretrained(tmp, safe_serialization=True)
            if train.compile:
                compile_cache.after_training(save_compiled)
            losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
            steps = trainer.state.global_step
            # Real (unpadded) tokens the model read: what "useful tokens/s" counts.
            tokens = round(sum(map(len, trainer.train_dataset["input_ids"])) * train.epochs)
            rows = len(trainer.train_dataset)
            micro_batches = trainer.args.gradient_accumulation_steps
        finally:
            trainer = None
            release_memory()
    return TrainRecord(
        folder=final,
        fingerprint=fingerprint(final),
        losses=losses,
        steps=steps,
        seconds=seconds,
        tokens=tokens,
        resumed_from=int(checkpoint.name.split("-")[1]) if checkpoint else None,
        rows=rows,
        rows_per_step=train.rows_per_step,
        micro_batches_per_step=micro_batches,
    )
