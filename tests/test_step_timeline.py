"""The benchmark's step timeline: GPU busy and idle time per host phase, from a kineto trace."""

import pytest

from benchmarks.step_timeline import covered, merged, timeline


def event(cat, name, ts, dur, tid=1):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": tid}


def two_steps() -> dict:
    """Two steps of 1,000 us: forward 0-400 (kernels cover 100-400), optimizer 400-600 (one
    30 us kernel and a 100 us wait), between-steps 600-1000 (GPU idle); the same again."""
    events = []
    for step in (0, 1000):
        events += [
            # two micro-batches' forward passes: still one step
            event("user_annotation", "phase:forward", step, 200),
            event("user_annotation", "phase:forward", step + 200, 200),
            event("user_annotation", "phase:optimizer", step + 400, 200),
            event("user_annotation", "phase:between-steps", step + 600, 400),
            event("cuda_runtime", "cudaLaunchKernel", step + 10, 5),
            event("cuda_runtime", "cudaLaunchKernel", step + 20, 5),
            event("cuda_driver", "cuLaunchKernelEx", step + 410, 5),
            event("cuda_runtime", "cudaStreamSynchronize", step + 450, 100),
            event("cuda_runtime", "cudaMemcpyAsync", step + 560, 5),  # a launch, no wait
            event("cuda_runtime", "cudaMemcpy", step + 700, 5),  # a blocking copy: a wait
            event("cpu_op", "aten::mm", step + 5, 90),
            event("cpu_op", "collate", step + 650, 300),
            event("user_annotation", "host:next batches", step + 640, 320),
            event("kernel", "gemm", step + 100, 200, tid=7),
            event("kernel", "gemm", step + 250, 150, tid=8),  # another stream, overlapping
            event("kernel", "adam", step + 420, 30, tid=7),
            event("gpu_user_annotation", "phase:forward", step, 1000, tid=7),  # not work
        ]
    return {"traceEvents": events + [{"ph": "s", "name": "flow"}]}


def test_merged_and_covered():
    busy = merged([(5, 7), (0, 2), (1, 3), (3, 4)])
    assert busy == [(0, 4), (5, 7)]
    assert covered(busy, 1, 6) == pytest.approx(3 + 1)
    assert covered(busy, 4, 5) == 0
    assert covered(busy, -10, 10) == 6


def test_phases_split_the_step_into_gpu_busy_and_idle_time():
    result = timeline(two_steps())
    assert result["steps"] == 2
    assert result["step_ms"] == pytest.approx(1.0)
    # two streams' overlapping kernels count once: 100-400 busy, 420-450 busy
    assert result["gpu_busy_ms"] == pytest.approx(0.33)
    assert result["gpu_idle_ms"] == pytest.approx(0.67)
    forward, optimizer, between = (
        result["phases"][k] for k in ("forward", "optimizer", "between-steps")
    )
    assert forward == {
        "host_ms": 0.4,
        "gpu_busy_ms": 0.3,
        "gpu_idle_ms": 0.1,
        "launches": 2,
        "waits": 0,
    }
    assert optimizer["gpu_busy_ms"] == pytest.approx(0.03)
    assert (optimizer["launches"], optimizer["waits"]) == (2, 1)
    assert between["gpu_idle_ms"] == pytest.approx(0.4)
    assert (between["launches"], between["waits"]) == (0, 1)
    # idle gaps of 50 us or more: 0-100 and 450-1100 (the next step's first kernel), 1450-2000
    assert result["gpu_idle_gaps_over_50us"] == 1.5
    assert result["host_calls_ms"] == {"next batches": 0.32}  # a step


def test_largest_gaps_name_the_phase_and_the_host_call():
    gaps = timeline(two_steps(), top_gaps=3)["largest_gaps"]
    # each step's between-steps idle: 450 (end of adam) -> 1100 (next step's first gemm)
    assert gaps[0] == {
        "ms": 0.65,
        "at_ms": 0.45,
        "phase": "between-steps",
        "host_op": "collate",
        "cuda_call": "",
    }
    assert gaps[1]["ms"] == 0.55  # the second step's: 1450 -> the window's end at 2000
    assert gaps[2] == {
        "ms": 0.1,
        "at_ms": 0.0,
        "phase": "forward",
        "host_op": "aten::mm",
        "cuda_call": "",
    }


def test_a_trace_without_phases_is_refused():
    with pytest.raises(ValueError, match="phase"):
        timeline({"traceEvents": [event("kernel", "gemm", 0, 10)]})


@pytest.mark.slow
def test_a_profiled_training_is_cut_into_phases_and_puts_the_library_back(tmp_path):
    """Through the real trainer on the CPU: the profile's phases and marked host calls, one
    file each, and every method it marked or wrapped put back afterwards."""
    import json

    from accelerate import Accelerator
    from transformers import PreTrainedModel, Trainer

    from benchmarks.step_timeline import host_calls, profile_phases
    from finance_qlora.files import write_jsonl
    from finance_qlora.presets import resolve_config
    from finance_qlora.prompts import to_prompt_completion
    from finance_qlora.training import train_adapter
    from tests.conftest import make_rows

    before = [(owner, attr, vars(owner).get(attr)) for owner, attr, _ in host_calls()]
    backward = Accelerator.backward
    prompts = tmp_path / "train.jsonl"
    write_jsonl(prompts, [to_prompt_completion(r) for r in make_rows(12)])
    config = resolve_config("tiny-cpu", {"train": {"epochs": 2}})  # 6 steps of 4 rows
    marks = profile_phases(tmp_path, "tiny", first_step=1, steps=3)
    train_adapter(
        prompts, config.model, config.lora, config.train, tmp_path / "out", callbacks=[marks]
    )
    summary = json.loads((tmp_path / "profile-tiny.json").read_text())
    result = summary["timeline"]
    assert result["steps"] == 3
    assert set(result["phases"]) == {
        "forward",
        "backward",
        "after-backward",
        "optimizer",
        "between-steps",
    }
    assert {"next batches", "clip gradients", "zero gradients"} <= set(result["host_calls_ms"])
    assert (tmp_path / "trace-tiny.json.gz").is_file() and summary["top_ops"]
    assert [(o, a, vars(o).get(a)) for o, a, _ in host_calls()] == before
    assert Accelerator.backward is backward and "num_parameters" not in vars(PreTrainedModel)
    assert Trainer.get_batch_samples.__name__ == "get_batch_samples"
