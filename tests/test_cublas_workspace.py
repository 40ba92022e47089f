"""finance_qlora.cublas_workspace: CUBLAS_WORKSPACE_CONFIG is named for the deterministic
generation, away while a CUDA training's steps run (torch parses it at each product), and named
again as it was when the training ends, also when it fails."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from finance_qlora import cublas_workspace
from finance_qlora.cublas_workspace import VARIABLE, unnamed

CUDA = torch.device("cuda", 0)


@pytest.fixture
def probes(monkeypatch) -> list:
    """The variable as each first product (torch's once-only check) saw it; no GPU needed."""
    seen = []
    monkeypatch.setattr(
        cublas_workspace, "first_product", lambda device: seen.append(os.environ.get(VARIABLE))
    )
    return seen


def test_a_cuda_training_runs_without_the_variable_after_one_product_with_it(monkeypatch, probes):
    monkeypatch.setenv(VARIABLE, ":16:8")  # the user's value
    with unnamed(CUDA):
        assert VARIABLE not in os.environ
    assert probes == [":16:8"]  # torch's check saw it named
    assert os.environ[VARIABLE] == ":16:8"


def test_the_cpu_a_process_that_never_named_it_and_the_benchmarks_switch_leave_it(
    monkeypatch, probes
):
    monkeypatch.setenv(VARIABLE, ":4096:8")
    with unnamed(torch.device("cpu")):
        assert os.environ[VARIABLE] == ":4096:8"
    monkeypatch.setattr(cublas_workspace, "UNNAMED_IN_TRAINING", False)
    with unnamed(CUDA):
        assert os.environ[VARIABLE] == ":4096:8"
    monkeypatch.setattr(cublas_workspace, "UNNAMED_IN_TRAINING", True)
    monkeypatch.delenv(VARIABLE)
    with unnamed(CUDA):
        assert VARIABLE not in os.environ
    assert VARIABLE not in os.environ and probes == []


def test_a_failed_training_names_it_again(monkeypatch, probes):
    monkeypatch.setenv(VARIABLE, ":4096:8")
    with pytest.raises(RuntimeError), unnamed(CUDA):
        raise RuntimeError("CUDA out of memory")
    assert os.environ[VARIABLE] == ":4096:8"


def test_overlapping_trainings_give_it_back_when_the_last_ends(monkeypatch, probes):
    """Two trainings in threads of one process: the first to end must not name it under the
    other's steps."""
    monkeypatch.setenv(VARIABLE, ":4096:8")
    inside, release = threading.Event(), threading.Event()

    def other() -> None:
        with unnamed(CUDA):
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=other)
    thread.start()
    inside.wait(10)
    with unnamed(CUDA):
        pass
    assert VARIABLE not in os.environ  # the other training still runs
    release.set()
    thread.join()
    assert os.environ[VARIABLE] == ":4096:8"
    assert len(probes) == 1


@pytest.mark.slow
def test_the_training_steps_run_without_it(tmp_path, monkeypatch, probes):
    """The project's training (on a CPU, let through as if it were a CUDA device): every step
    runs with the variable away, and it is named again after."""
    from transformers import TrainerCallback

    from finance_qlora.files import write_jsonl
    from finance_qlora.presets import resolve_config
    from finance_qlora.prompts import to_prompt_completion
    from finance_qlora.training import train_adapter
    from tests.conftest import make_rows

    monkeypatch.setattr(cublas_workspace, "DEVICE_TYPES", ("cpu", "cuda"))
    monkeypatch.setenv(VARIABLE, ":4096:8")
    at_steps = []

    class Watch(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            at_steps.append(os.environ.get(VARIABLE))

    prompts = tmp_path / "train.jsonl"
    write_jsonl(prompts, [to_prompt_completion(r) for r in make_rows(8)])
    config = resolve_config("tiny-cpu", {"train": {"epochs": 1}})
    train_adapter(
        prompts, config.model, config.lora, config.train, tmp_path / "out", callbacks=[Watch()]
    )
    assert at_steps == [None, None]
    assert probes == [":4096:8"] and os.environ[VARIABLE] == ":4096:8"


def run_on_gpu(code: str) -> subprocess.CompletedProcess:
    """`code` in a fresh process: torch's once-only check is per process."""
    env = {k: v for k, v in os.environ.items() if k != VARIABLE}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_deterministic_generation_after_a_training_without_it():
    """On a GPU, in a fresh process: after a training's products made without the variable, a
    product under torch's deterministic algorithms runs, and the variable is named again.
    (torch 2.11 runs it even where the variable was never named, measured on an H200; older
    versions check it once, at the first product, which `unnamed` makes while it is named.)"""
    code = f"""
import os, torch
from finance_qlora import cublas_workspace
from finance_qlora.generation import reproducible
x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
with cublas_workspace.unnamed(torch.device("cuda", 0)):
    assert "{VARIABLE}" not in os.environ
    torch.mm(x, x)  # a training's product
assert os.environ["{VARIABLE}"] == "{cublas_workspace.VALUE}"
with reproducible(True, torch.device("cuda", 0)):
    torch.mm(x, x)
print("deterministic product ran")
"""
    done = run_on_gpu(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "deterministic product ran" in done.stdout
