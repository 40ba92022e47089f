"""The benchmark's switches around the training's matrix products (benchmarks/mm_switches.py):
each changes what it names for the run it wraps, and puts everything back, also when the run
fails."""

import os

import pytest
import torch
from torch._inductor.select_algorithm import extern_kernels

from benchmarks.mm_switches import mm_timed, workspace_named
from finance_qlora import cublas_workspace


def test_timing_the_layers_matrix_products_changes_no_result_and_puts_torch_back(capsys):
    """mm_timed times what the compiled code's extern_kernels.mm costs the host, for the run it
    wraps only."""
    before = extern_kernels.mm
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    with mm_timed():
        assert extern_kernels.mm is not before
        out = torch.empty(3, 5)
        extern_kernels.mm(a, b, out=out)
        extern_kernels.mm(b.t(), a.t())
    assert extern_kernels.mm is before
    assert torch.equal(out, a @ b)
    printed = capsys.readouterr().out
    assert "mm host: 2 calls" in printed and "2 shapes" in printed


def test_the_workspace_variable_stays_named_in_the_run_only(monkeypatch):
    """workspace_named: the training leaves CUBLAS_WORKSPACE_CONFIG named (as before), for the
    run it wraps only."""
    monkeypatch.delenv(cublas_workspace.VARIABLE, raising=False)
    assert cublas_workspace.UNNAMED_IN_TRAINING
    with workspace_named():
        assert not cublas_workspace.UNNAMED_IN_TRAINING
        assert os.environ[cublas_workspace.VARIABLE] == cublas_workspace.VALUE
    assert cublas_workspace.UNNAMED_IN_TRAINING
    assert cublas_workspace.VARIABLE not in os.environ  # as it was


def test_a_failed_run_puts_the_products_and_the_training_back():
    before = extern_kernels.mm
    with pytest.raises(RuntimeError), workspace_named(timed=True):
        assert extern_kernels.mm is not before  # the run's products are timed
        raise RuntimeError("out of memory")
    assert cublas_workspace.UNNAMED_IN_TRAINING
    assert extern_kernels.mm is before
    with pytest.raises(RuntimeError), mm_timed():
        raise RuntimeError("out of memory")
    assert extern_kernels.mm is before
