"""Training and evaluation throughput on the LLaMA-2-7B architecture, reference vs project.

    python benchmarks/gpu_throughput.py --data ../shared/data/finance_alpaca_sample.jsonl

Builds LLaMA-2-7B with random weights (no hub; a byte-level BPE of 32,000 tokens trained on the
rows stands in for its tokenizer) and runs, in one process on one GPU:

- train.reference: the notebook's recipe through the project's own train_adapter: NF4 4-bit
  kernels, batch 1, every row padded to 512 tokens; on the first --reference-rows rows.
- train.project: the same function with the project's GPU settings: token-budget batches,
  base weights dequantized once from NF4, bf16; on all 1,000 rows.
- eval.reference: one prompt at a time, 4-bit kernels, 128 new tokens; on --reference-prompts.
- eval.project: generate_answers (the function the evaluate task calls) on all 300 prompts,
  large batches, dequantized weights.
- t4_profile: fp16, no FlashAttention, 4-bit, activation checkpointing, 4,096-token batches,
  under a 15 GiB cap (torch.cuda.set_per_process_memory_fraction): does it fit, and its peak.

Random weights never emit EOS, so every answer runs the full 128 tokens (the worst case).
Reference times for 1,000 rows and 300 prompts are extrapolated from the measured subsets at
the measured rate, and marked so. Results: benchmarks/results/<gpu>-<date>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from finance_qlora.builtin_models import train_bpe_tokenizer  # noqa: E402
from finance_qlora.config import DataConfig, resolve_config  # noqa: E402
from finance_qlora.data import resolve_version, write_splits  # noqa: E402
from finance_qlora.files import read_jsonl, write_jsonl  # noqa: E402
from finance_qlora.generation import generate_answers  # noqa: E402
from finance_qlora.modeling import loaded  # noqa: E402
from finance_qlora.prompts import write_prompts  # noqa: E402
from finance_qlora.training import train_adapter  # noqa: E402

GIB = 1024**3
ARCHS = {
    "llama2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
    ),
    # a smoke-test size for checking the script itself on a CPU
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    ),
}


def build_model(arch: str, folder: Path, texts: list[str]) -> None:
    """Random weights in bf16 on the GPU, saved as a local Hugging Face folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = 32000 if arch == "llama2-7b" else 512
    # no pad token, like LLaMA-2's: load_tokenizer pads with <unk>
    tokenizer = train_bpe_tokenizer(texts, vocab, pad_token=None)
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=vocab,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        **ARCHS[arch],
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    del model
    release()


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else 0.0


def train_run(name, prompts, config, out, rows=None) -> dict:
    if rows is not None:
        subset = out.parent / f"{name}-rows.jsonl"
        write_jsonl(subset, read_jsonl(prompts)[:rows])
        prompts = subset
    release()
    record = train_adapter(prompts, config.model, config.lora, config.train, out)
    rate = record.tokens / record.seconds
    print(
        f"{name}: {record.tokens} tokens in {record.seconds:.1f} s = {rate:,.0f} tok/s", flush=True
    )
    return {
        "rows": len(read_jsonl(prompts)),
        "useful_tokens": record.tokens,
        "seconds": round(record.seconds, 2),
        "useful_tok_s": round(rate, 1),
        "peak_gib": round(peak_gib(), 2),
        "steps": record.steps,
    }


def generate_run(name, model, tokenizer, prompts, batch_size, max_new_tokens) -> dict:
    generate_answers(model, tokenizer, prompts[:2], 4, batch_size=2)  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    new_tokens = len(prompts) * max_new_tokens  # random weights: no early EOS
    print(f"{name}: {len(prompts)} x {max_new_tokens} in {seconds:.1f} s", flush=True)
    return {
        "prompts": len(prompts),
        "new_tokens": new_tokens,
        "seconds": round(seconds, 2),
        "new_tok_s": round(new_tokens / seconds, 1),
        "batch_size": batch_size,
        "peak_gib": round(peak_gib(), 2),
    }


class OutOfMemoryWatch(logging.Handler):
    """Counts the project's out-of-memory back-offs: a profile that needed one did not fit."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.events: list[str] = []

    def emit(self, record):
        if "out of GPU memory" in record.getMessage():
            self.events.append(record.getMessage())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared/data/finance_alpaca_sample.jsonl"
    )
    parser.add_argument("--arch", choices=ARCHS, default="llama2-7b")
    parser.add_argument("--work", type=Path, default=Path("/tmp/finance-qlora-bench"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--reference-rows", type=int, default=48)
    parser.add_argument("--reference-prompts", type=int, default=4)
    parser.add_argument("--tokens-per-batch", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--eval-batch", type=int, nargs="+", default=[100, 300])
    parser.add_argument("--t4-rows", type=int, default=160)
    parser.add_argument("--t4-prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    watch = OutOfMemoryWatch()
    logging.getLogger("finance_qlora").addHandler(watch)

    rows = DataConfig(dataset=str(args.data), train_size=1000, test_size=300, seed=0)
    splits = write_splits(resolve_version(rows.dataset), rows, args.work / "splits")
    prompts = write_prompts(splits, args.work / "prompts")
    pairs = read_jsonl(prompts.test_path)
    model_dir = args.work / f"{args.arch}-random"
    if not (model_dir / "config.json").is_file():
        texts = [p["prompt"] + p["completion"] for p in read_jsonl(prompts.train_path) + pairs]
        build_model(args.arch, model_dir, texts)

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result: dict = {
        "gpu": gpu,
        "date": datetime.now(UTC).date().isoformat(),
        "arch": args.arch,
        "torch": torch.__version__,
        "train": {},
        "eval": {},
    }
    out_file = args.out / f"{gpu.replace(' ', '-')}-{result['date']}.json"
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out_file.write_text(json.dumps(result, indent=2) + "\n")

    base = {
        "model": {"name": str(model_dir), "compute_dtype": "auto"},
        "train": {"epochs": 1, "checkpoint_steps": 0, "logging_steps": 10, "warmup_ratio": 0.0},
    }
    # Train: the reference recipe on a subset, then the project's settings on all rows.
    reference = resolve_config(
        "llama2-7b-t4",
        base
        | {
            "train": base["train"]
            | {
                "batch_size": 1,
                "gradient_accumulation_steps": 1,
                "max_tokens_per_batch": None,
                "pad_to_multiple_of": 512,
                "dequantize": "never",
                "gradient_checkpointing": False,
            }
        },
    )
    result["train"]["reference"] = train_run(
        "train.reference",
        prompts.train_path,
        reference,
        args.work / "train-ref",
        args.reference_rows,
    )
    # The project's settings, at each token budget asked for; the fastest is reported.
    variants = []
    for budget in args.tokens_per_batch:
        project = resolve_config(
            "llama2-7b-t4",
            base
            | {
                "train": base["train"]
                | {
                    "max_tokens_per_batch": budget,
                    "gradient_accumulation_steps": 1,
                    "dequantize": "auto",
                    "gradient_checkpointing": False,
                }
            },
        )
        run = train_run(
            f"train.project[{budget}]",
            prompts.train_path,
            project,
            args.work / f"train-project-{budget}",
        )
        variants.append(run | {"max_tokens_per_batch": budget})
    result["train"]["project_variants"] = variants
    result["train"]["project"] = max(variants, key=lambda v: v["useful_tok_s"])
    full_tokens = result["train"]["project"]["useful_tokens"]
    ref_rate = result["train"]["reference"]["useful_tok_s"]
    result["train"]["reference"]["seconds_1000_rows_extrapolated"] = round(
        full_tokens / ref_rate, 1
    )
    result["train"]["speedup"] = round(result["train"]["project"]["useful_tok_s"] / ref_rate, 2)
    save()

    # Eval: one prompt at a time in 4-bit, then large batches on dequantized weights.
    texts = [p["prompt"] for p in pairs]
    release()
    with loaded(project.model, dequantize="never") as (model, tokenizer):
        ref = generate_run(
            "eval.reference",
            model,
            tokenizer,
            texts[: args.reference_prompts],
            1,
            args.max_new_tokens,
        )
    del model, tokenizer
    ref["seconds_300x128"] = round(ref["seconds"] / ref["prompts"] * 300, 1)
    ref["extrapolated_from_prompts"] = ref["prompts"]
    result["eval"]["reference"] = ref
    release()
    with loaded(project.model, dequantize="auto") as (model, tokenizer):
        evals = [
            generate_run(
                f"eval.project[{size}]", model, tokenizer, texts, size, args.max_new_tokens
            )
            for size in args.eval_batch
        ]
    del model, tokenizer  # the `as` names outlive the block: drop the weights before the next load
    proj = min(evals, key=lambda v: v["seconds"])
    proj["seconds_300x128"] = proj["seconds"]
    result["eval"]["project_variants"] = evals
    result["eval"]["project"] = proj
    result["eval"]["speedup"] = round(ref["seconds_300x128"] / proj["seconds"], 1)
    save()

    # T4 profile: 16 GB card emulated with a 15 GiB cap, fp16, no FlashAttention, 4-bit.
    if torch.cuda.is_available():
        release()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(15 * GIB / total)
    t4 = resolve_config(
        "llama2-7b-t4",
        {
            "model": {"name": str(model_dir), "compute_dtype": "float16"},
            "train": base["train"] | {"dequantize": "never", "gradient_checkpointing": True},
            "generation": {"dequantize": "never"},
        },
    )
    watch.events.clear()
    profile: dict = {"cap_gib": 15, "compute_dtype": "float16", "attention": "sdpa"}
    try:
        profile["train"] = train_run(
            "t4.train", prompts.train_path, t4, args.work / "train-t4", args.t4_rows
        )
        release()
        with loaded(t4.model, dequantize="never") as (model, tokenizer):
            profile["eval"] = generate_run(
                "t4.eval",
                model,
                tokenizer,
                texts[: args.t4_prompts],
                t4.generation.batch_size,
                args.max_new_tokens,
            )
        profile["fits"] = not watch.events
    except (torch.OutOfMemoryError, RuntimeError) as exc:  # loading wraps OOM in RuntimeError
        profile["fits"], profile["error"] = False, str(exc).splitlines()[0][:300]
    profile["oom_backoffs"] = list(watch.events)
    profile["peak_gib"] = max(
        profile.get("train", {}).get("peak_gib", 0), profile.get("eval", {}).get("peak_gib", 0)
    )
    result["t4_profile"] = profile
    save()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
