"""One typed configuration for a fine-tuning run: its sections and their checks.

    python -m flows.finetune --preset tiny-cpu --set train.learning_rate=1e-3

The named presets, and a configuration resolved from one with overrides, are in
`finance_qlora.presets`; what a configuration plans (its schedule, its GPUs) in
`finance_qlora.schedule`.
"""

from __future__ import annotations

import os
from typing import Annotated, Literal, Optional, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from finance_qlora.errors import ConfigError

PresetName = Literal["llama2-7b-t4", "llama2-7b-h100", "tiny-cpu", "smollm2-135m"]
DEFAULT_PRESET: PresetName = "llama2-7b-t4"
# Seeds go to random.seed, numpy and torch: numpy's legacy seeding (transformers' set_seed)
# takes 0 to 2**32 - 1 only.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]


def _filled(what: str):
    """A text field that must not be empty: "" would read as the current folder."""

    def check(value: str) -> str:
        if not value.strip():
            raise PydanticCustomError("empty", "empty; {what}", {"what": what})
        return value

    return AfterValidator(check)


DataName = Annotated[str, _filled("name a data file, a URL on your store or a hub id")]
ModelName = Annotated[str, _filled("name a model folder, a hub id or builtin:tiny-llama")]


class _Section(BaseModel):
    # inf and nan are never meant: `--set train.epochs=1e309` reads as inf
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DataConfig(_Section):
    # A hub id, a local .json/.jsonl/.csv/.parquet file, or "builtin:<name>" (shipped assets).
    dataset: DataName = "gbharti/finance-alpaca"
    revision: Optional[str] = None
    train_size: int = Field(1000, gt=0)
    test_size: int = Field(300, gt=0)
    seed: Seed = 42
    # Rows held out beside the test rows to choose a recipe on (flows/sweep.py takes them from
    # its base train_size); with evaluate_on="validation" both evaluations score them, and the
    # test rows stay unseen.
    validation_size: int = Field(0, ge=0)
    evaluate_on: Literal["test", "validation"] = "test"

    @property
    def evaluated_rows(self) -> int:
        """Rows both evaluations score: the test rows, or the validation rows (a sweep's)."""
        return self.validation_size if self.evaluate_on == "validation" else self.test_size

    @model_validator(mode="after")
    def _validation_rows_to_evaluate(self) -> DataConfig:
        if self.evaluate_on == "validation" and not self.validation_size:
            raise ValueError("evaluate_on='validation' needs data.validation_size > 0")
        return self


class ModelConfig(_Section):
    # A hub id, a local folder, or "builtin:<name>" (built offline on first use).
    name: ModelName = "meta-llama/Llama-2-7b-hf"
    revision: Optional[str] = None
    load_in_4bit: bool = True
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    # "auto": bf16 on compute capability 8.0 and newer (Ampere+), fp16 below (T4), fp32 on CPU.
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    trust_remote_code: bool = False
    # Keep the 4-bit weights of the first load under $FINANCE_QLORA_CACHE/quantized and load
    # those afterwards: the same weights, read in seconds instead of quantized again.
    reuse_quantized: bool = True
    # Prefect Secret block holding the Hugging Face token; HF_TOKEN is the fallback.
    hf_token_secret: str = "hf-token"


class LoraSettings(_Section):
    # A rank-r adapter adds r x (in + out) weights to each target; no recipe goes past 256, and
    # a rank above a layer's width adds weights, not capacity (preflight checks the model's).
    r: int = Field(16, gt=0, le=1024)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    # Module names, or ["all-linear"] for every linear layer but the output head.
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)

    @field_validator("target_modules")
    @classmethod
    def _all_linear_alone(cls, targets: list[str]) -> list[str]:
        if "all-linear" in targets and len(targets) > 1:
            raise PydanticCustomError(
                "all_linear_alone",
                'all-linear already names every linear layer; pass ["all-linear"] alone, or '
                "module names without it",
            )
        return targets


class TrainSettings(_Section):
    epochs: float = Field(1.0, gt=0, le=1000)
    learning_rate: float = Field(2e-4, gt=0)
    # The schedule, part of the recipe: rows in one optimizer step (16: QLoRA's setting for 7B
    # models at lr 2e-4; 63 steps for 1,000 rows), whatever the card computes them in.
    rows_per_step: int = Field(16, gt=0, le=65_536)
    # Micro-batches (how the card computes a step, never how many rows a step holds): this
    # many rows each, or with max_tokens_per_batch as many as fit that budget. Gradients
    # accumulate over a step's micro-batches.
    # (at most 1,024: memory grows with it, and the largest preset computes 16 rows at once)
    batch_size: int = Field(4, gt=0, le=1024)
    max_seq_length: int = Field(512, gt=0)
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    # Any transformers scheduler name: "constant_with_warmup" (the reference recipe) keeps the
    # rate flat after warm-up; "cosine" or "linear" decay it to zero by the last step.
    lr_scheduler: str = "constant_with_warmup"
    gradient_checkpointing: bool = True
    optimizer: str = "paged_adamw_8bit"
    # Length-grouped micro-batches of at most this many padded tokens (batch_size is then
    # ignored); None: micro-batches of batch_size rows.
    # (at most 2^20: 64x the 80 GB preset's 16,384, more than any card holds at 7B)
    max_tokens_per_batch: Optional[int] = Field(None, gt=0, le=2**20)
    # Pad every batch to a multiple of this length (the reference notebook padded to 512).
    pad_to_multiple_of: Optional[int] = Field(None, gt=0)
    # Train on base weights dequantized once from NF4 (the same values the 4-bit kernels
    # compute with, at bf16 speed): "auto" where the GPU has room for them.
    dequantize: Literal["auto", "always", "never"] = "auto"
    # A batch's rows end to end in one sequence, no padding at all, attention kept within each
    # row (finance_qlora/packing.py); max_tokens_per_batch then counts real tokens.
    padding_free: bool = False
    # Liger's fused Triton kernels for RMSNorm, RoPE and SwiGLU (CUDA, pip install liger-kernel);
    # the loss already goes through TRL's fused, chunked LM head.
    fused_kernels: bool = False
    # torch.compile each decoder layer (one compiled graph serves them all): fused kernels and
    # few launches a layer. 1.44x eager Liger kernels on an H200 at 16 rows a step, for a
    # compile of 11-15 s (2.5 s from inductor's on-disk cache, which the next run on the
    # worker finds): llama2-7b-h100 turns it on. Excludes fused_kernels (Liger's kernels do not
    # compile).
    compile: bool = False
    # Where compiled layers are kept: "worker", in inductor's and Triton's caches on the
    # worker's disk (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR); "store", also in the durable
    # store, for every worker of the same environment (a new container per flow run loads them
    # in 2-3 s instead of compiling for 11-18 s on an H200). The store's copy is code each
    # worker runs: used only where the worker also sets FINANCE_QLORA_TRUST_STORE=1
    # (tasks/compiled_layers.py).
    compile_cache: Literal["worker", "store"] = "worker"
    # Processes that collate the next batches while the card computes this one (0: the training
    # process collates between steps, the card idle meanwhile: about 5 ms a 16-row step on an
    # H200's host). How, never what: the same batches in the same order.
    loader_workers: int = Field(0, ge=0, le=8)
    logging_steps: int = Field(10, gt=0)
    # A retried or re-run training resumes from the newest checkpoint; 0 turns them off.
    checkpoint_steps: int = Field(50, ge=0)
    seed: Seed = 42

    @model_validator(mode="after")
    def _compile_without_liger(self) -> TrainSettings:
        if self.compile and self.fused_kernels:
            # Dynamo cannot trace Liger's autograd functions (H200, 2026-11-29); inductor fuses
            # the same norms and activations itself
            raise PydanticCustomError(
                "compile_with_liger",
                "compile and fused_kernels exclude each other (Liger's kernels do not compile); "
                "set train.compile=false to use Liger's kernels, or train.fused_kernels=false to "
                "keep the compiled layers",
            )
        return self

    @model_validator(mode="after")
    def _padding_within_a_row(self) -> TrainSettings:
        if self.pad_to_multiple_of and self.pad_to_multiple_of > self.max_seq_length:
            # past the longest row, padding only adds padding
            raise PydanticCustomError(
                "padding_past_rows",
                "pad_to_multiple_of {pad} is above max_seq_length {longest}; lower it or leave "
                "it unset",
                {"pad": self.pad_to_multiple_of, "longest": self.max_seq_length},
            )
        return self

    @field_validator("lr_scheduler")
    @classmethod
    def _known_scheduler(cls, name: str) -> str:
        schedulers = transformers_choices()[0]
        if name not in schedulers:
            raise PydanticCustomError(
                "unknown_scheduler",
                "not a transformers scheduler; choose one of {choices}",
                {"choices": ", ".join(schedulers)},
            )
        return name

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, name: str) -> str:
        if name not in transformers_choices()[1]:
            raise PydanticCustomError(
                "unknown_optimizer",
                "not a transformers optimizer; choose e.g. adamw_torch, adamw_torch_fused, "
                "paged_adamw_8bit, adafactor or sgd (transformers' OptimizerNames)",
            )
        return name


# transformers' scheduler and optimizer names (SchedulerType, OptimizerNames of transformers
# 5.24), written out so that a config error is told without importing transformers (seconds);
# tests/test_newcomer.py checks them against the installed transformers.
SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
    "constant_with_warmup", "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr",
    "cosine_warmup_with_min_lr", "warmup_stable_decay", "greedy",
)  # fmt: skip
OPTIMIZERS = (
    "adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused",
    "adafactor", "adamw_anyprecision", "adamw_torch_4bit", "adamw_torch_8bit", "ademamix",
    "sgd", "adagrad", "adamw_bnb_8bit", "adamw_8bit", "ademamix_8bit", "lion_8bit",
    "lion_32bit", "paged_adamw_32bit", "paged_adamw_8bit", "paged_ademamix_32bit",
    "paged_ademamix_8bit", "paged_lion_32bit", "paged_lion_8bit", "rmsprop", "rmsprop_bnb",
    "rmsprop_bnb_8bit", "rmsprop_bnb_32bit", "galore_adamw", "galore_adamw_8bit",
    "galore_adafactor", "galore_adamw_layerwise", "galore_adamw_8bit_layerwise",
    "galore_adafactor_layerwise", "lomo", "adalomo", "grokadamw", "schedule_free_radam",
    "schedule_free_adamw", "schedule_free_sgd", "apollo_adamw", "apollo_adamw_layerwise",
    "stable_adamw",
)  # fmt: skip


def transformers_choices() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """transformers' scheduler and optimizer names, without importing transformers."""
    return SCHEDULERS, OPTIMIZERS


class GenerationSettings(_Section):
    # Greedy decoding, identical for the pretrained and the fine-tuned model.
    # Preflight checks it against the model's context, with room for the test prompts.
    max_new_tokens: int = Field(128, gt=0)
    # Prompts generated at once: memory grows with it (the key/value cache); 300 (all test
    # rows, one batch on an 80 GB card) is the largest any preset uses.
    batch_size: int = Field(16, gt=0, le=4096)
    # Batches (of prompts sorted by length) also hold at most this many cache positions: rows
    # x (the longest prompt's tokens + max_new_tokens), what a left-padded batch's key/value
    # cache holds. A rare long prompt then gets a batch of its own rather than padding every
    # prompt of a large batch to its length. None: batch_size alone decides.
    max_tokens_per_batch: int | None = Field(None, gt=0, le=2**24)
    # Deterministic guards against answers that repeat one sentence until the token limit;
    # 1.0 and 0 turn them off (the reference recipe).
    repetition_penalty: float = Field(1.0, ge=1.0)
    # transformers' own: also bans n-grams of the prompt (the question, the template).
    no_repeat_ngram_size: int = Field(0, ge=0)
    # The project's: bans repeating an n-gram of the generated answer only.
    block_repeat_ngram: int = Field(0, ge=0)
    # Generate with base weights dequantized once from NF4 where the GPU has room.
    dequantize: Literal["auto", "always", "never"] = "auto"
    # The key/value cache: "dynamic" grows by concatenation (each new token copies the whole
    # cache); "static" is allocated once for prompt + max_new_tokens and written in place.
    cache: Literal["dynamic", "static"] = "dynamic"
    # With the static cache and `deterministic` on a GPU, replay each decode step as a CUDA
    # graph: the same kernels with one launch, so the same answers (checked where each graph is
    # recorded), without the host issuing every kernel of every token (decode_graphs.py).
    cuda_graphs: bool = True
    # The attention of decode steps on a GPU: "sdpa", torch's kernels, which read every
    # position of the cache and discard the masked ones; "triton", the project's kernel
    # (decode_kernel.py), which reads only the positions each row attends to: the prompt, not
    # its left padding, and the tokens generated so far, not the empty slots after them;
    # compiled while the model loads (modeling.loaded).
    decode_kernel: Literal["sdpa", "triton"] = "sdpa"
    # Sampling instead of greedy decoding (the answer flow; the evaluation and the gate are
    # meant greedy). Each batch is seeded from `seed` and its first prompt, so one process or
    # several give the same answers.
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # 0: no top-k cut
    seed: Seed = 0
    # The same answers to the same prompts in every run on a GPU: torch's deterministic
    # algorithms while generating. Without them an H200 answers 291-292 of 300 prompts alike
    # when one evaluation is generated twice (memory-efficient attention's default kernel is
    # not reproducible); with them 300 (experiments/results/generation-repeat-h200.json).
    deterministic: bool = True

    @model_validator(mode="after")
    def _budget_holds_an_answer(self) -> GenerationSettings:
        if (
            self.max_tokens_per_batch is not None
            and self.max_tokens_per_batch <= self.max_new_tokens
        ):
            # every prompt would be a batch of its own: hundreds of times slower, never useful
            raise PydanticCustomError(
                "budget_below_answer",
                "max_tokens_per_batch {budget} cannot hold one prompt and max_new_tokens "
                "{new} new tokens; raise it (a batch's rows x their longest prompt + answer) or "
                "leave it unset",
                {"budget": self.max_tokens_per_batch, "new": self.max_new_tokens},
            )
        return self


def _env_gpu_count() -> int | str:
    value = os.environ.get("FINANCE_QLORA_NUM_GPUS", "").strip()
    if not value:
        return "auto"
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(
            f"FINANCE_QLORA_NUM_GPUS: {value!r} is not a GPU count; set a positive integer "
            "(the work pool's gpu_count) or unset it"
        )
    return int(value)


def default_store() -> str:
    """$FINANCE_QLORA_STORE (set by the GPU work pools' templates), else ./runs."""
    return os.environ.get("FINANCE_QLORA_STORE") or "runs"


# devices.num_gpus "auto", step by step (benchmarks/README.md, "Several GPUs"; 2 H200s,
# 2026-11-29). A multi-GPU step starts a process per GPU and loads the model in each: the
# evaluate steps of 300 prompts took 25-28 s on 2 GPUs against 9-18 s on one, so fewer than
# AUTO_MIN_PROMPTS prompts (an estimate from that start-up) are answered on one GPU. Training
# pays only where each GPU's share of an optimizer step is large: at 16 rows a step (8 a GPU)
# steady training ran 0.81-1.05x as fast on 2 GPUs as on one (the kernels' launches, not the
# GPU, bound such a step) and the whole flow on 10,800 row-epochs took 242 s against 157 s;
# at 128 rows a step (64 a GPU) steady training ran 1.65x as fast on 2. So several GPUs
# train only from AUTO_MIN_ROWS_PER_GPU rows a GPU a step (the smallest share measured to pay)
# and AUTO_MIN_ROW_EPOCHS of work (the ~25 s start-up repaid at that speed-up; an estimate).
AUTO_MIN_ROW_EPOCHS = 10_000
AUTO_MIN_ROWS_PER_GPU = 64
AUTO_MIN_PROMPTS = 2_000


class DeviceSettings(_Section):
    # Data-parallel training and sharded evaluation, one process per GPU: a count (at most the
    # GPUs visible), None for every GPU this worker sees, or "auto": each step on one GPU below
    # AUTO_MIN_ROW_EPOCHS of training work / AUTO_MIN_PROMPTS prompts; above, on as many
    # visible GPUs as each get AUTO_MIN_ROWS_PER_GPU rows of every step / a batch of prompts.
    # Default $FINANCE_QLORA_NUM_GPUS (the work pools' gpu_count sets it), else "auto".
    num_gpus: Union[Annotated[int, Field(gt=0)], Literal["auto"], None] = Field(
        default_factory=_env_gpu_count
    )
    # Without CUDA: this many processes (gloo) instead of one; tests and CPU-only machines.
    cpu_processes: int = Field(1, gt=0, le=64)


class EvaluationSettings(_Section):
    # 🤗 evaluate metrics for both models' answers. "rouge": the project's ROUGE, a local
    # evaluate module that loads offline (the comparison, the bootstrap and the promotion gate
    # use it); any other name: evaluate.load(name) from the Hugging Face Hub, where reachable,
    # saved in the evaluation's metrics.json.
    metrics: list[str] = Field(default_factory=lambda: ["rouge"], min_length=1)

    @field_validator("metrics")
    @classmethod
    def _rouge_is_kept(cls, metrics: list[str]) -> list[str]:
        if "rouge" not in metrics:
            raise ValueError("must include 'rouge' (the comparison and the promotion gate use it)")
        return metrics


class BootstrapSettings(_Section):
    # Each resample draws one index per test row (8 bytes, twice): 100,000 resamples of 300
    # rows take about 0.5 GB; a 95% interval's ends settle long before (1,000 is the default).
    resamples: int = Field(1000, gt=0, le=100_000)
    confidence: float = Field(0.95, gt=0.0, lt=1.0)
    seed: Seed = 0


class PromotionSettings(_Section):
    # False: no gate and no registry (the recipe search's runs): nothing is promoted or read.
    enabled: bool = True
    # The gate: a new adapter becomes champion only if it beats the champion on this metric,
    # the low end of the paired-bootstrap interval of (candidate - champion) above min_delta,
    # on the test rows the champion never trained on (at least min_rows of them).
    metric: Literal["rouge1", "rouge2", "rougeL", "rougeLsum"] = "rougeL"
    min_delta: float = Field(0.0, ge=0.0)
    min_rows: int = Field(30, gt=0)
    # A champion that cannot be scored here (another base model or revision) is kept unless
    # this says the run replaces it.
    replace_unscorable: bool = False
    # A candidate must also beat the pretrained model: its delta's bootstrap interval on
    # `metric` lies above zero.
    beat_pretrained: bool = True


class FinetuneConfig(_Section):
    preset: PresetName = DEFAULT_PRESET
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    lora: LoraSettings = LoraSettings()
    train: TrainSettings = TrainSettings()
    generation: GenerationSettings = GenerationSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    bootstrap: BootstrapSettings = BootstrapSettings()
    promotion: PromotionSettings = PromotionSettings()
    devices: DeviceSettings = Field(default_factory=DeviceSettings)
    # The durable store: everything that must outlive a run (step outputs, adapters, reports,
    # the champion registry, Prefect's cached results). A folder (a mounted volume in a
    # container) or an fsspec URL: s3://bucket/prefix, gs://, az://, file://.
    # Default: $FINANCE_QLORA_STORE (set by the GPU work pools' templates), else ./runs.
    output_dir: str = Field(default_factory=lambda: default_store(), min_length=1)
    # A Prefect Secret block holding the store's fsspec options as JSON (credentials, endpoint);
    # None: the libraries read the environment (AWS_*, GOOGLE_APPLICATION_CREDENTIALS, AZURE_*).
    output_dir_secret: Optional[str] = None

    @field_validator("output_dir")
    @classmethod
    def _durable(cls, url: str) -> str:
        if url.strip().lower().startswith("memory:"):
            raise PydanticCustomError(
                "not_durable",
                "memory:// keeps nothing once this process ends; give a folder or a URL such "
                "as s3://bucket/runs",
            )
        return url
