"""The benchmark's switches around the training's matrix products (benchmarks/mm_switches.py):
each changes what it names for the run it wraps, and puts everything back, also when the run
fails."""

import os

import pytest
import torch
from torch._inductor.select_algorithm import extern_kernels

from benchmarks.mm_switches import mm_timed, workspace_unnamed


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


def test_the_workspace_variable_is_away_for_the_run_only(monkeypatch, capsys):
    """workspace_unnamed: CUBLAS_WORKSPACE_CONFIG (which the deterministic generation needs
    named) is gone while the run trains and named again after; a process that never named it is
    left alone."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    with workspace_unnamed():
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    with workspace_unnamed():
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_a_failed_run_puts_the_products_and_the_workspace_variable_back(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = extern_kernels.mm
    with pytest.raises(RuntimeError), workspace_unnamed():
        assert extern_kernels.mm is not before  # the run's products are timed too
        raise RuntimeError("out of memory")
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert extern_kernels.mm is before
    with pytest.raises(RuntimeError), mm_timed():
        raise RuntimeError("out of memory")
    assert extern_kernels.mm is before
