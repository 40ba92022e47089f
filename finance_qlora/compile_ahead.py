"""The train step's decoder layers compiled ahead, in a side process, while the pretrained model
is evaluated (train.compile_ahead).

A worker with empty compile caches compiles the layer's graph at the train step's first step:
13-18 s of the host's CPU on an H200 machine while the GPU waits. The compile needs no trained
weights: a shallow copy of the model (its config with two layers, random weights, loaded as the
train step loads the real one: in 4-bit, dequantized where the train step will be), trained one
step on a step's worth of the train prompts, traces the same graph, and inductor, AOTAutograd
and Triton keep what it compiled on the worker's disk. The train step, started after the
evaluation, finds it there (2-3 s) and waits for the side process only where it is still
compiling.

It changes no result: the side process writes only to the worker's compile caches, which torch
keys by the graph itself (a copy that traced another graph makes a miss, never a wrong
kernel), and a side process that fails or is stopped costs the overlap only: the train step
then compiles, as without it.

    python -m finance_qlora.compile_ahead SPEC   (started by `start`, never by hand)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finance_qlora.config import LoraSettings, ModelConfig, TrainSettings
from finance_qlora.files import read_jsonl, write_jsonl

SHALLOW_LAYERS = 2  # the first layer, and a later one (whose input comes from a layer)
WAIT_S = 300  # the longest the train step waits; then it stops the side process, compiles
SPEC, ROWS, RESULT, LOG = "spec.json", "rows.jsonl", "result.json", "log.txt"
log = logging.getLogger(__name__)


@dataclass
class Ahead:
    process: subprocess.Popen
    folder: Path
    started: float

    def outcome(self) -> tuple[bool, str]:
        """(whether it compiled, what it did) for the train step's log."""
        seconds = time.perf_counter() - self.started
        try:
            result = json.loads((self.folder / RESULT).read_text())
        except (OSError, ValueError):
            return False, f"compiling ahead failed ({last_line(self.folder / LOG)}); compiling here"
        return True, (
            f"layers compiled ahead in a side process: {result['misses']} graphs compiled, "
            f"{result['hits']} found, in {result['seconds']:.1f} s ({seconds:.1f} s since it "
            "started)"
        )


_running: dict[str, Ahead] = {}  # by compile_cache.entry_key: the train step finds its own
_lock = threading.Lock()


def start(
    key: str,
    train_prompts: Path,
    model: ModelConfig,
    lora: LoraSettings,
    train: TrainSettings,
    env: dict[str, str],
) -> None:
    """Start compiling the layers of the train step that `key` names (one already running for
    it stays). `env`: the side process's environment (the hub token, where a model needs it)."""
    with _lock:
        if key in _running and _running[key].process.poll() is None:
            return
        folder = Path(tempfile.mkdtemp(prefix="finance-qlora-ahead-"))
        # one optimizer step's rows: its micro-batches are shaped as the train step's are
        write_jsonl(folder / ROWS, read_jsonl(train_prompts)[: train.rows_per_step])
        spec = {
            "model": model.model_dump(mode="json"),
            "lora": lora.model_dump(mode="json"),
            "train": train.model_dump(mode="json"),
        }
        (folder / SPEC).write_text(json.dumps(spec))
        with open(folder / LOG, "w") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "finance_qlora.compile_ahead", str(folder)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # stopped as a group: with inductor's compile workers
            )
        _running[key] = Ahead(process, folder, time.perf_counter())


def join(key: str, timeout: float = WAIT_S) -> tuple[bool, str] | None:
    """Wait for the side process compiling `key`'s layers: (whether it compiled, what it did),
    None where there was none. Past `timeout` it is stopped and the train step compiles."""
    with _lock:
        ahead = _running.pop(key, None)
    if ahead is None:
        return None
    try:
        ahead.process.wait(timeout=timeout)
        return ahead.outcome()
    except subprocess.TimeoutExpired:
        return False, f"compiling ahead took over {timeout:.0f} s; stopped, compiling here"
    finally:
        end(ahead)


def stop(key: str) -> None:
    """Stop the side process compiling `key`'s layers, if any (its caches keep what it wrote:
    each entry is written whole)."""
    with _lock:
        ahead = _running.pop(key, None)
    if ahead is not None:
        end(ahead)


def end(ahead: Ahead) -> None:
    if ahead.process.poll() is None:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
            try:
                os.killpg(ahead.process.pid, sig)
                ahead.process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                break
    shutil.rmtree(ahead.folder, ignore_errors=True)


def join_before_first_step(key: str, log: logging.Logger | logging.LoggerAdapter):
    """A Trainer callback: before the first step (the model loaded, nothing compiled yet), wait
    for the side process compiling `key`'s layers and log what it did."""
    from transformers import TrainerCallback

    class JoinAhead(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            joined = join(key)
            if joined is not None:
                compiled, line = joined
                (log.info if compiled else log.warning)(line)

    return JoinAhead()


def last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no output"
    return lines[-1][-300:] if lines else "no output"


# --- the side process -------------------------------------------------------------------------


def dequantize_as_train_step(model: ModelConfig, train: TrainSettings, real_config) -> str:
    """The train step's choice ("always"/"never"): "auto" judged by the real model's parameter
    count against the GPU's memory less the 4-bit model (the train step's view once the
    evaluation has freed its memory). A wrong guess at the edge costs the overlap only."""
    import torch
    from transformers import AutoModelForCausalLM

    from finance_qlora.modeling import room_to_dequantize

    if train.dequantize != "auto" or not model.load_in_4bit:
        return train.dequantize
    if not torch.cuda.is_available():
        return "never"
    with torch.device("meta"):
        params = AutoModelForCausalLM.from_config(real_config).num_parameters()
    _, total = torch.cuda.mem_get_info()
    return "always" if room_to_dequantize(params, total - params) else "never"


def shallow_copy(model: ModelConfig, folder: Path, token: str | None) -> tuple[ModelConfig, Any]:
    """The model's config with SHALLOW_LAYERS layers and random weights, saved with its
    tokenizer in `folder`: the ModelConfig that loads it as the train step loads the real one,
    and the real model's config."""
    import torch
    from transformers import AutoModelForCausalLM

    from finance_qlora.modeling import compute_dtype, device_map, load_tokenizer, read_model_config

    config = read_model_config(model, token)
    real = config.__class__.from_dict(config.to_dict())
    config.num_hidden_layers = min(SHALLOW_LAYERS, config.num_hidden_layers)
    log.info("side process: config read")
    with torch.device(device_map()[""]):
        shallow = AutoModelForCausalLM.from_config(config, dtype=compute_dtype(model.compute_dtype))
    log.info("side process: shallow model built")
    shallow.save_pretrained(folder)
    log.info("side process: shallow model saved")
    load_tokenizer(model, token).save_pretrained(folder)
    del shallow
    local = model.model_copy(
        update={"name": str(folder), "revision": None, "reuse_quantized": False}
    )
    return local, real


def compile_shallow(folder: Path) -> dict[str, float]:
    """Train the shallow copy one step as the train step trains (compiling its layers into this
    worker's caches); its graph lookups, seconds and peak GPU memory."""
    import torch

    from finance_qlora import compile_cache
    from finance_qlora.training import train_in_process

    started = time.perf_counter()
    spec = json.loads((folder / SPEC).read_text())
    model, lora = ModelConfig(**spec["model"]), LoraSettings(**spec["lora"])
    train = TrainSettings(**spec["train"])
    token = os.environ.get("HF_TOKEN")
    log.info("side process: libraries imported")
    local, real = shallow_copy(model, folder / "model", token)
    log.info("side process: shallow copy saved")
    dequantize = dequantize_as_train_step(model, train, real)
    log.info("side process: dequantize %s", dequantize)
    settings = train.model_copy(
        update={
            "epochs": 1.0,
            "checkpoint_steps": 0,
            "compile_cache": "worker",
            "dequantize": dequantize,
        }
    )
    train_in_process(folder / ROWS, local, lora, settings, folder / "train", None, None, [])
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    return compile_cache.graph_lookups() | {
        "seconds": round(time.perf_counter() - started, 2),
        "peak_gib": round(peak, 2),
    }


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    folder = Path(argv[0])
    result = compile_shallow(folder)
    tmp = folder / f".{RESULT}"
    tmp.write_text(json.dumps(result))
    os.replace(tmp, folder / RESULT)  # whole or absent: the train step reads it
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
