"""What every benchmark section runs on: LLaMA-2-7B's architecture with random weights (no
hub), the seed-0 split of the 1,000 / 300 rows, and one timed training through the project's
own train_adapter."""

from __future__ import annotations

import argparse
import shutil
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from benchmarks.watch import collections
from finance_qlora.builtin_models import train_bpe_tokenizer
from finance_qlora.config import DataConfig
from finance_qlora.data import resolve_version, write_splits
from finance_qlora.files import read_jsonl, write_jsonl
from finance_qlora.presets import resolve_config
from finance_qlora.prompts import write_prompts
from finance_qlora.training import train_adapter

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
# the 7B layer twice: compiled layers compile one graph a layer class, as for 32
ARCHS["llama2-7b-layers2"] = ARCHS["llama2-7b"] | {"num_hidden_layers": 2}


def one_variant_parser(description: str, variants) -> argparse.ArgumentParser:
    """The options of a tool that trains one of `variants` (benchmarks/variants.py) in one
    process, as held_memory.py and host_stacks.py do; each adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--arch", choices=ARCHS, default="llama2-7b")
    parser.add_argument("--work", type=Path, default=Path("/tmp/finance-qlora-bench"))
    results = Path(__file__).resolve().parent / "results"
    parser.add_argument("--out", type=Path, default=results)
    parser.add_argument("--variant", default="llama2-7b-h100", choices=variants)
    parser.add_argument("--tag", default="", help="added to the file's name: -before, -after")
    parser.add_argument("--profile", default="", help="unused; Setup's runner reads it")
    return parser


def build_model(arch: str, folder: Path, texts: list[str]) -> None:
    """Random weights in bf16 on the GPU, saved as a local Hugging Face folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = 32000 if arch.startswith("llama2-7b") else 512
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
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / GIB, 2) if torch.cuda.is_available() else 0.0


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median(values: list[float]) -> float:
    return round(statistics.median(values), 2)


class Setup:
    """The splits, prompts and random model every section uses, built once under --work."""

    def __init__(self, args):
        self.args = args
        rows = DataConfig(dataset=str(args.data), train_size=1000, test_size=300, seed=0)
        splits = write_splits(resolve_version(rows.dataset), rows, args.work / "splits")
        self.prompts = write_prompts(splits, args.work / "prompts")
        self.model_dir = args.work / f"{args.arch}-random"
        if not (self.model_dir / "config.json").is_file():
            pairs = read_jsonl(self.prompts.train_path) + read_jsonl(self.prompts.test_path)
            build_model(args.arch, self.model_dir, [p["prompt"] + p["completion"] for p in pairs])
        self.test_prompts = [p["prompt"] for p in read_jsonl(self.prompts.test_path)]

    def config(self, preset: str = "llama2-7b-h100", train=None, generation=None, model=None):
        overrides = {
            "model": {"name": str(self.model_dir)} | (model or {}),
            "train": {"epochs": 1, "checkpoint_steps": 0, "logging_steps": 10, "warmup_ratio": 0}
            | (train or {}),
            "generation": generation or {},
        }
        return resolve_config(preset, overrides)

    def subset(self, rows: int) -> Path:
        path = self.args.work / f"train-{rows}-rows.jsonl"
        write_jsonl(path, read_jsonl(self.prompts.train_path)[:rows])
        return path


@contextmanager
def collections_in_training() -> Iterator[dict]:
    """Python's garbage collections inside `Trainer.train` (the timed part of a training,
    including the full collection the Trainer itself asks for before its first step,
    `accelerator.free_memory`), filled in as training ends (benchmarks.watch.collections)."""
    from transformers import Trainer

    seen: dict = {}
    train = Trainer.train

    def watched(self, *args, **kwargs):
        collected: dict = {}
        try:
            with collections() as collected:
                return train(self, *args, **kwargs)
        finally:
            seen.update(collected)

    Trainer.train = watched
    try:
        yield seen
    finally:
        Trainer.train = train


def train_once(setup: Setup, config, prompts: Path, name: str, callbacks=None) -> dict:
    out = setup.args.work / "train-runs" / name
    shutil.rmtree(out, ignore_errors=True)
    release()
    with collections_in_training() as seen:
        record = train_adapter(
            prompts, config.model, config.lora, config.train, out, callbacks=callbacks
        )
    rate = record.tokens / record.seconds
    print(f"  {name}: {record.tokens} tokens in {record.seconds:.2f} s = {rate:,.0f} tok/s")
    return {
        "useful_tokens": record.tokens,
        "seconds": round(record.seconds, 2),
        "useful_tok_s": round(rate, 1),
        "peak_gib": peak_gib(),
        "steps": record.steps,
        "rows_per_step": record.rows_per_step,
        "micro_batches_per_step": record.micro_batches_per_step,
        "losses": [round(x, 4) for x in record.losses],
        "collections": seen,
    }
