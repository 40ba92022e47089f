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


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    """No training inside `unnamed` left over from another test."""
    monkeypatch.setattr(cublas_workspace, "_depth", 0)
    monkeypatch.setattr(cublas_workspace, "_taken", None)


@pytest.fixture
def probes(monkeypatch) -> list:
    """The variable as each first product (torch's once-only check) saw it, on a card whose
    default workspace is the size the project names (an H100/H200); no GPU needed."""
    seen = []
    monkeypatch.setattr(
        cublas_workspace, "first_product", lambda device: seen.append(os.environ.get(VARIABLE))
    )
    monkeypatch.setattr(cublas_workspace, "default_is_named_size", lambda device: True)
    return seen


def test_a_cuda_training_runs_without_the_variable_after_one_product_with_it(monkeypatch, probes):
    monkeypatch.setenv(VARIABLE, ":4096:8")
    with unnamed(CUDA):
        assert VARIABLE not in os.environ
    assert probes == [":4096:8"]  # torch's check saw it named
    assert os.environ[VARIABLE] == ":4096:8"


def test_it_stays_where_its_size_is_not_torchs_default(monkeypatch, probes):
    """torch tells cuBLAS the size the variable gives at each product, but sized each buffer
    once: where taking it away changes that size (the user's own value, a card whose default is
    another size), it stays named."""
    monkeypatch.setenv(VARIABLE, ":16:8")  # the user's value
    with unnamed(CUDA):
        assert os.environ[VARIABLE] == ":16:8"
    monkeypatch.setenv(VARIABLE, ":4096:8")
    monkeypatch.setattr(cublas_workspace, "default_is_named_size", lambda device: False)
    with unnamed(CUDA):
        assert os.environ[VARIABLE] == ":4096:8"
    assert probes == []


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

    def first() -> None:
        with unnamed(CUDA):
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=first)
    thread.start()
    assert inside.wait(10)
    with unnamed(CUDA):
        release.set()
        thread.join()  # the first training ended
        assert VARIABLE not in os.environ  # this one still runs
    assert os.environ[VARIABLE] == ":4096:8"
    assert len(probes) == 1


def test_a_generation_during_a_training_leaves_it_away_until_the_training_ends(monkeypatch, probes):
    """`reproducible` names the variable (`name()`); inside a training that took it away, the
    training names it again when it ends instead."""
    monkeypatch.setenv(VARIABLE, ":4096:8")
    with unnamed(CUDA):
        cublas_workspace.name()
        assert VARIABLE not in os.environ
    assert os.environ[VARIABLE] == ":4096:8"
    monkeypatch.delenv(VARIABLE)
    cublas_workspace.name()
    assert os.environ[VARIABLE] == cublas_workspace.VALUE


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
def test_on_a_gpu_a_deterministic_product_runs_after_a_training_without_it():
    """On a GPU, in a fresh process: on a card whose default workspace is the named size (an
    H100/H200) the variable is away while a training's products run, then named again, and a
    product under torch's deterministic algorithms runs. The first product's part it cannot
    show: torch 2.11 runs that product even where the variable was never named
    (benchmarks/workspace_config.py --deterministic-check, an H200)."""
    code = f"""
import os, torch
from finance_qlora import cublas_workspace
from finance_qlora.generation import reproducible
cuda = torch.device("cuda", 0)
x = torch.randn(64, 64, device=cuda, dtype=torch.bfloat16)
with cublas_workspace.unnamed(cuda):
    away = "{VARIABLE}" not in os.environ
    torch.mm(x, x)  # a training's product
assert away == cublas_workspace.default_is_named_size(cuda), away
assert os.environ["{VARIABLE}"] == "{cublas_workspace.VALUE}"
with reproducible(True, cuda):
    torch.mm(x, x)
print("away" if away else "named", "in training; deterministic product ran")
"""
    done = run_on_gpu(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "deterministic product ran" in done.stdout
