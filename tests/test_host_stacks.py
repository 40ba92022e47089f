"""The benchmark's host profile: py-spy's raw samples summed per thread, by function and line."""

from benchmarks.host_stacks import parse, summarize

LOOP = "Trainer._inner_training_loop (/site-packages/transformers/trainer.py:1602)"
RAW = "\n".join(
    [
        # the main thread: 6 samples in the steps (4 of them in a matrix product), 10 building
        # the model around a run, which do not count
        f"thread (1): MainThread;main (/w/b.py:3);{LOOP};call (/tmp/torchinductor_x/c.py:602) 4",
        f"thread (1): MainThread;main (/w/b.py:3);{LOOP};step (/w/t.py:9) 2",
        "thread (1): MainThread;main (/w/b.py:3);load (/w/m.py:7) 10",
        # the autograd engine's thread runs the backward: every sample counts
        "thread (2);backward (/w/r.py:5);call (/tmp/torchinductor_x/d.py:760) 3",
        "not a sample line",
    ]
)


def test_samples_parse_into_threads_and_frames_outermost_first():
    threads = parse(RAW)
    assert set(threads) == {"thread (1): MainThread", "thread (2)"}
    frames, count = threads["thread (2)"][0]
    assert count == 3
    assert frames == [("backward", "/w/r.py", 5), ("call", "/tmp/torchinductor_x/d.py", 760)]


def test_the_main_threads_samples_count_only_within_the_training_loop():
    main, backward = summarize(RAW, rate=100, steps=2)
    assert main["thread"].endswith("MainThread") and main["samples"] == 6
    # 6 samples at 100 a second over 2 steps: 30 ms a step
    assert main["busy_ms_a_step"] == 30.0
    assert main["self"][0] == {
        "share": round(4 / 6, 4),
        "function": "call",
        "at": "/tmp/torchinductor_x/c.py:602",
        "source": "",
    }
    assert {"share": 1.0, "function": "main", "file": "/w/b.py"} in main["inclusive"]
    assert all(row["function"] != "load" for row in main["inclusive"])
    assert backward["samples"] == 3 and backward["busy_ms_a_step"] == 15.0


def test_timing_the_layers_matrix_products_changes_no_result_and_puts_torch_back(capsys):
    """benchmarks.mm_switches.mm_timed times what the compiled code's extern_kernels.mm costs the
    host, for the run it wraps only."""
    import torch
    from torch._inductor.select_algorithm import extern_kernels

    from benchmarks.mm_switches import mm_timed

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
    """benchmarks.mm_switches.workspace_unnamed: CUBLAS_WORKSPACE_CONFIG (which the deterministic
    generation needs named) is gone while the run trains and named again after; a process that
    never named it is left alone."""
    import os

    from benchmarks.mm_switches import workspace_unnamed

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    with workspace_unnamed():
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    with workspace_unnamed():
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
