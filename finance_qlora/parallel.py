"""More than one GPU: data-parallel training and sharded evaluation, one process per device.

The train and evaluate tasks launch the processes and wait for them; the processes are not
Prefect tasks. Training goes through torchrun: each rank loads the 4-bit model on its own
device, the Trainer wraps it in DDP, and rank 0 alone writes checkpoints and the adapter.
Evaluation needs no communication: each process generates its share of the batches a
one-process run would form (batch k goes to process k mod N), so every answer is the one a
single process gives. Without CUDA the same code runs `devices.cpu_processes` gloo processes.

A rank's bad input (ConfigError, ...) comes back as the same one-line error; a rank that dies
(killed, NCCL, CUDA) raises RankFailed, which the tasks retry: training resumes from the last
checkpoint, as on one GPU.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch

from finance_qlora import errors
from finance_qlora.config import (
    DeviceSettings,
    FinetuneConfig,
    GenerationSettings,
    LoraSettings,
    ModelConfig,
    TrainSettings,
)
from finance_qlora.errors import ConfigError
from finance_qlora.files import read_jsonl, write_jsonl
from finance_qlora.records import TrainRecord
from finance_qlora.schedule import StepWork, work_per_step

ERROR_TYPES = {"FinanceQLoRAError", "ConfigError", "DataError", "TrainingError"}
PROGRESS = "finance-qlora-progress "  # a line a process prints for the parent to parse
ERROR_FILE, RECORD_FILE = "error.json", "record.json"
log = logging.getLogger(__name__)


class RankFailed(RuntimeError):
    """A training or generation process died without a one-line error: retried."""


def visible_gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def choose_gpus(
    devices: DeviceSettings, step: StepWork | None, visible: int
) -> tuple[int | None, str]:
    """(GPUs to use, None without CUDA; why) for one step. "auto" uses one GPU below the
    step's `auto_from` of work (unknown work: one), and from there on as many visible GPUs as
    its work divides over (`StepWork.most_gpus`): training by row-epochs and rows a step,
    evaluation by prompts and batches."""
    asked = devices.num_gpus
    if not visible:
        if asked not in (None, "auto"):
            raise ConfigError(
                f"devices.num_gpus: {asked} GPUs asked for, but this machine has no CUDA GPU; "
                "unset it (devices.cpu_processes runs several processes on the CPU)"
            )
        return None, f"no CUDA GPU: {devices.cpu_processes} CPU process(es)"
    if asked is None:
        return visible, f"every visible GPU ({visible})"
    if asked == "auto":
        if step is None:
            return 1, f"auto: one GPU of {visible} (unknown work)"
        amount = f"{step.work:g} {step.unit}"
        if step.work < step.auto_from:
            return 1, f"auto: one GPU of {visible} ({amount}; several from {step.auto_from:g})"
        if visible == 1:
            return 1, f"auto: the one visible GPU ({amount})"
        gpus = step.auto_gpus(visible)
        if gpus == visible:
            return gpus, f"auto: all {visible} GPUs ({amount})"
        # fewer than visible: the step's work divides no further
        chosen = "one GPU" if gpus == 1 else f"{gpus} GPUs"
        return gpus, f"auto: {chosen} of {visible} ({amount}; {step.limit})"
    if asked > visible:
        shown = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        raise ConfigError(
            f"devices.num_gpus: {asked} GPUs asked for, {visible} visible "
            f"(CUDA_VISIBLE_DEVICES={shown}); lower it, or unset it to use every visible GPU"
        )
    return asked, f"devices.num_gpus={asked} of {visible} visible"


def gpus_per_step(config: FinetuneConfig, visible: int) -> dict[str, tuple[int | None, str]]:
    """(GPUs, why) for each multi-GPU step of a run ("auto" from `work_per_step`)."""
    return {
        step: choose_gpus(config.devices, work, visible)
        for step, work in work_per_step(config).items()
    }


def process_count(devices: DeviceSettings) -> int:
    """How many processes a step runs: the GPUs `choose_gpus` gives (the flow resolves "auto"
    for each step from its work first; unresolved "auto" is one GPU), or `cpu_processes`
    without CUDA."""
    gpus, _ = choose_gpus(devices, None, visible_gpu_count())
    return gpus if gpus is not None else devices.cpu_processes


def child_env(token: str | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(extra or {}))
    if token:
        env["HF_TOKEN"] = token  # in the environment, never on a command line or in a file
    return env


class Launch:
    """Processes started together and waited for, their output parsed line by line: progress
    lines go to `on_progress(process index, payload)`, the rest to the debug log, and the
    last lines are kept for the error message."""

    def __init__(self, on_progress: Callable[[int, dict], None] | None = None):
        self.on_progress = on_progress
        self.tail: deque[str] = deque(maxlen=20)
        self.lock = threading.Lock()

    def _read(self, index: int, proc: subprocess.Popen) -> None:
        # Read to the end whatever happens: a process whose pipe is not drained blocks.
        for line in proc.stdout:
            line = line.rstrip()
            if line.startswith(PROGRESS):
                try:
                    if self.on_progress is not None:
                        with self.lock:
                            self.on_progress(index, json.loads(line[len(PROGRESS) :]))
                except Exception as exc:  # noqa: BLE001 - progress is best effort
                    log.warning("progress not reported: %s", exc)
                continue
            log.debug("[%d] %s", index, line)
            if line.strip(" =-"):  # torchrun's report frames itself with rules
                with self.lock:
                    self.tail.append(f"[{index}] {line}")

    def run(self, commands: list[tuple[list[str], dict[str, str]]]) -> list[int]:
        procs = [
            subprocess.Popen(
                command,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
                start_new_session=True,  # Ctrl-C reaches us; we stop them (finally below)
            )
            for command, env in commands
        ]
        readers = [
            threading.Thread(target=self._read, args=(i, p), daemon=True)
            for i, p in enumerate(procs)
        ]
        try:
            for reader in readers:
                reader.start()
            codes = [p.wait() for p in procs]
            for reader in readers:
                reader.join()
            return codes
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()  # torchrun passes it on to its ranks
            for p in procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()


def clear_outputs(folder: Path) -> None:
    """What an earlier try's processes left: never mistaken for this try's."""
    folder.mkdir(parents=True, exist_ok=True)
    stale_files = [*folder.glob("*-error.*"), *folder.glob("shard-*"), folder / RECORD_FILE]
    for stale in stale_files:
        stale.unlink(missing_ok=True)


def raise_failure(folder: Path, what: str, codes: list[int], tail: deque[str]) -> None:
    """A process's own error, else RankFailed (retried) with the last lines it printed."""
    for path in sorted(folder.glob(f"*-{ERROR_FILE}")):
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # cut off mid-write: another process's file says it
        if saved["type"] == "OutOfMemoryError":  # the caller halves the batch, as on one GPU
            raise torch.OutOfMemoryError(saved["message"])
        if saved["type"] in ERROR_TYPES:
            raise getattr(errors, saved["type"])(saved["message"])
        if not saved.get("transient"):  # a bug: retrying would fail the same way
            raise RuntimeError(f"a {what} process failed: {saved['type']}: {saved['message']}")
    failed = next((c for c in codes if c != 0), None)
    how = f"exited with code {failed}" if failed is not None else "wrote no result"
    for line in tail:
        log.warning("%s", line)
    last = tail[-1] if tail else "no output"
    raise RankFailed(f"a {what} process {how}: {last[:300]}")


def train_data_parallel(
    prompts_path: Path,
    model_cfg: ModelConfig,
    lora: LoraSettings,
    train: TrainSettings,
    out_dir: Path,
    processes: int,
    token: str | None = None,
    on_log: Callable[[int, int, float], None] | None = None,
    save_compiled: Path | None = None,
) -> TrainRecord:
    """`training.train_adapter` on `processes` ranks through torchrun; out_dir and
    save_compiled as there.
    Each rank takes its share of every optimizer step (`batching.StepSampler`)."""
    clear_outputs(out_dir)
    spec = out_dir / "launch.json"
    spec.write_text(
        json.dumps(
            {
                "prompts": str(prompts_path),
                "model": model_cfg.model_dump(mode="json"),
                "lora": lora.model_dump(mode="json"),
                "train": train.model_dump(mode="json"),
                "out_dir": str(out_dir),
                "save_compiled": str(save_compiled) if save_compiled else None,
            }
        )
    )
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
        f"--nproc-per-node={processes}",
        *("-m", "finance_qlora.rank", "train", str(spec)),
    ]

    def progress(_: int, payload: dict) -> None:
        if on_log is not None:
            on_log(payload["step"], payload["total"], payload["loss"])

    launch = Launch(progress)
    codes = launch.run([(command, child_env(token))])
    if any(codes) or not (out_dir / RECORD_FILE).is_file():
        raise_failure(out_dir, "training", codes or [1], launch.tail)
    return TrainRecord.model_validate_json((out_dir / RECORD_FILE).read_text())


def visible_gpus() -> list[str]:
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed:
        return [d.strip() for d in listed.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def generate_sharded(
    prompts: list[str],
    model_cfg: ModelConfig,
    generation: GenerationSettings,
    work_dir: Path,
    processes: int,
    adapter_dir: Path | None = None,
    token: str | None = None,
    on_progress: Callable[[int, int], None] | None = None,
):
    """Greedy answers for `prompts` from `processes` processes, one per GPU; in order."""
    from finance_qlora.generation import Generated

    clear_outputs(work_dir)
    write_jsonl(work_dir / "prompts.jsonl", [{"prompt": p} for p in prompts])
    spec = work_dir / "launch.json"
    spec.write_text(
        json.dumps(
            {
                "prompts": str(work_dir / "prompts.jsonl"),
                "model": model_cfg.model_dump(mode="json"),
                "generation": generation.model_dump(mode="json"),
                "adapter": str(adapter_dir) if adapter_dir else None,
                "out_dir": str(work_dir),
            }
        )
    )
    gpus = visible_gpus() if torch.cuda.is_available() else []
    threads = str(max((os.cpu_count() or 1) // processes, 1))
    commands = []
    for rank in range(processes):
        device = {"CUDA_VISIBLE_DEVICES": gpus[rank]} if gpus else {"OMP_NUM_THREADS": threads}
        command = [sys.executable, "-m", "finance_qlora.rank", "generate", str(spec)]
        commands.append(([*command, str(rank), str(processes)], child_env(token, device)))
    done = [0] * processes

    def progress(rank: int, payload: dict) -> None:
        done[rank] = payload["done"]
        if on_progress is not None:
            on_progress(sum(done), len(prompts))

    launch = Launch(progress)
    codes = launch.run(commands)
    if any(codes):
        raise_failure(work_dir, "generation", codes, launch.tail)
    answers: dict[int, Generated] = {}
    for rank in range(processes):
        if not (work_dir / f"shard-{rank}.jsonl").is_file():
            raise RankFailed(f"generation process {rank} exited without its answers")
        for row in read_jsonl(work_dir / f"shard-{rank}.jsonl"):
            answers[row["index"]] = Generated(row["text"], row["new_tokens"])
    if sorted(answers) != list(range(len(prompts))):
        raise RankFailed("the generation processes did not answer every prompt")
    return [answers[i] for i in range(len(prompts))]
