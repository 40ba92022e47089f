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


def test_threads_come_busiest_first_whatever_their_order_in_the_samples():
    raw = "\n".join(
        [
            "thread (2);backward (/w/r.py:5) 3",
            "thread (3);pin (/w/p.py:1) 9",
            "thread (4);f (/w/f.py:2) 1",
        ]
    )
    assert [t["samples"] for t in summarize(raw, rate=100, steps=1)] == [9, 3, 1]
