"""The program a launched process runs: one training rank under torchrun, or one generation
shard (`python -m finance_qlora.rank train|generate SPEC ...`, started by `parallel`).

It reports progress as lines the parent parses, writes its result where the parent reads it,
and leaves its error, if any, as a small JSON file: a one-line error of the project comes back
as the same error in the parent, anything else as RankFailed (retried) or, for a programming
error, a failure that is not retried.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from finance_qlora.config import GenerationSettings, LoraSettings, ModelConfig, TrainSettings
from finance_qlora.errors import FinanceQLoRAError
from finance_qlora.files import read_jsonl, write_jsonl
from finance_qlora.parallel import ERROR_FILE, PROGRESS, RECORD_FILE

PROGRAMMING_ERRORS = (
    TypeError,
    ValueError,
    AttributeError,
    KeyError,
    IndexError,
    NameError,
    AssertionError,
    ImportError,
    NotImplementedError,
)


def print_progress(**payload) -> None:
    print(PROGRESS + json.dumps(payload), flush=True)


def train_rank(spec: dict) -> None:
    from finance_qlora.training import train_in_process

    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)  # device_map and the Trainer use the current device
    out_dir = Path(spec["out_dir"])
    record = train_in_process(
        Path(spec["prompts"]),
        ModelConfig.model_validate(spec["model"]),
        LoraSettings.model_validate(spec["lora"]),
        TrainSettings.model_validate(spec["train"]),
        out_dir,
        os.environ.get("HF_TOKEN"),
        (lambda step, total, loss: print_progress(step=step, total=total, loss=loss))
        if rank == 0
        else None,
        [],
        save_compiled=Path(spec["save_compiled"]) if spec.get("save_compiled") else None,
    )
    if record is not None:  # rank 0
        (out_dir / RECORD_FILE).write_text(record.model_dump_json())


def generate_rank(spec: dict, rank: int, world: int) -> None:
    from finance_qlora.generation import generate_shard
    from finance_qlora.modeling import loaded

    settings = GenerationSettings.model_validate(spec["generation"])
    prompts = [r["prompt"] for r in read_jsonl(Path(spec["prompts"]))]
    adapter = Path(spec["adapter"]) if spec["adapter"] else None
    model_cfg = ModelConfig.model_validate(spec["model"])
    started = time.perf_counter()
    token = os.environ.get("HF_TOKEN")
    ahead = settings.decode_kernel == "triton"
    with loaded(model_cfg, token, adapter, settings.dequantize, ahead) as (
        model,
        tokenizer,
    ):
        ready = time.perf_counter()
        answers = generate_shard(
            model,
            tokenizer,
            prompts,
            settings,
            rank,
            world,
            lambda done, total: print_progress(done=done, total=total),
        )
        done = time.perf_counter()
    rows = [{"index": i, "text": g.text, "new_tokens": g.new_tokens} for i, g in answers.items()]
    out_dir = Path(spec["out_dir"])
    write_jsonl(out_dir / f"shard-{rank}.jsonl", rows)
    # where the time went (benchmarks/multi_gpu.py reads it): loading vs generating
    timing = {"load_seconds": ready - started, "generate_seconds": done - ready}
    (out_dir / f"shard-{rank}.timing.json").write_text(json.dumps(timing))


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[1]).read_text())
    tag = os.environ.get("RANK", "0") if argv[0] == "train" else argv[2]
    try:
        if argv[0] == "train":
            train_rank(spec)
        else:
            generate_rank(spec, int(argv[2]), int(argv[3]))
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        # A rank sees its peer's death as a RuntimeError of gloo or NCCL: retried, like CUDA
        # errors; a programming error is not.
        transient = not isinstance(exc, PROGRAMMING_ERRORS)
        error = {
            "type": type(exc).__name__,
            "message": lines[0] if lines else type(exc).__name__,
            "transient": transient,
        }
        path = Path(spec["out_dir"]) / f"{tag}-{ERROR_FILE}"
        path.with_suffix(".tmp").write_text(json.dumps(error))
        os.replace(path.with_suffix(".tmp"), path)  # whole or absent, also when killed
        if not isinstance(exc, FinanceQLoRAError | torch.OutOfMemoryError):
            raise  # the traceback goes to the parent's debug log
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
