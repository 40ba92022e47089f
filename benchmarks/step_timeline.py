"""Where a training step's time goes on the card: torch.profiler over a few optimizer steps,
each step cut into phases on the host (forward, backward, after-backward, optimizer,
between-steps), and for each phase how long the GPU had work and how long it sat idle.

The GPU idle while the host is in a phase is time that phase's host work did not hide behind
earlier GPU work: the phase to shorten. Used by gpu_throughput.py (--profile), also for a
generation (one phase, "generate").
"""

from __future__ import annotations

import bisect
import gzip
import json
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

PREFIX = "phase:"
HOST = "host:"  # the host calls marked inside the phases (HOST_CALLS)
# what runs on the GPU in a kineto trace (its annotations' GPU copies excluded)
GPU_WORK = {"kernel", "gpu_memcpy", "gpu_memset"}
# host-side CUDA calls that launch work or wait for it
LAUNCHES = (
    "cudaLaunchKernel",
    "cuLaunchKernel",
    "cudaGraphLaunch",
    "cudaMemcpyAsync",
    "cudaMemsetAsync",
)
WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
BLOCKING_COPY = "cudaMemcpy"  # the name alone: cudaMemcpyAsync does not wait


def merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Overlapping or touching intervals joined; sorted."""
    out: list[list[float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def covered(busy: list[tuple[float, float]], start: float, end: float) -> float:
    """How much of [start, end] the merged `busy` intervals cover."""
    total, i = 0.0, max(bisect.bisect_right(busy, (start, float("inf"))) - 1, 0)
    while i < len(busy) and busy[i][0] < end:
        total += max(0.0, min(end, busy[i][1]) - max(start, busy[i][0]))
        i += 1
    return total


def waits(call: str) -> bool:
    return call.startswith(WAITS) or call == BLOCKING_COPY


def innermost(events: list[dict], t: float) -> str:
    """The shortest of `events` that spans time t (the call the host was inside), or ''."""
    spanning = [e for e in events if e["ts"] <= t <= e["ts"] + e["dur"]]
    return min(spanning, key=lambda e: e["dur"])["name"] if spanning else ""


def timeline(trace: dict, top_gaps: int = 12, min_gap_us: float = 50.0) -> dict:
    """Per phase (ranges named phase:*), over the trace's complete phases: ms a step on the
    host, ms of it with GPU work, ms with the GPU idle, CUDA launches and waits a step; the
    largest GPU idle gaps with the phase and the host call they fell in."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    busy = merged([(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in GPU_WORK])
    phases = sorted(
        (e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith(PREFIX)),
        key=lambda e: e["ts"],
    )
    if not phases:
        raise ValueError("the trace holds no phase:* ranges")
    runtime = sorted(
        (e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")),
        key=lambda e: e["ts"],
    )
    starts = [e["ts"] for e in runtime]
    host_ops = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation")]
    host_ops = [e for e in host_ops if not e["name"].startswith(PREFIX)]
    calls_ms: dict[str, float] = defaultdict(float)
    for e in host_ops:
        if e["name"].startswith(HOST):
            calls_ms[e["name"][len(HOST) :]] += e["dur"] / 1000
    steps = sum(e["name"] == PREFIX + "optimizer" for e in phases) or 1

    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for phase in phases:
        name, start, end = phase["name"][len(PREFIX) :], phase["ts"], phase["ts"] + phase["dur"]
        with_work = covered(busy, start, end)
        calls = runtime[bisect.bisect_left(starts, start) : bisect.bisect_left(starts, end)]
        row = sums[name]
        row["host_ms"] += phase["dur"] / 1000
        row["gpu_busy_ms"] += with_work / 1000
        row["gpu_idle_ms"] += (phase["dur"] - with_work) / 1000
        row["launches"] += sum(c["name"].startswith(LAUNCHES) for c in calls)
        row["waits"] += sum(waits(c["name"]) for c in calls)
    per_step = {
        name: {key: round(value / steps, 2) for key, value in row.items()}
        for name, row in sums.items()
    }
    window = (phases[0]["ts"], max(e["ts"] + e["dur"] for e in phases))
    wall = window[1] - window[0]
    with_work = covered(busy, *window)

    gaps = []
    inside = [(a, b) for a, b in busy if b > window[0] and a < window[1]]
    edges = [window[0]] + [x for a, b in inside for x in (a, b)] + [window[1]]
    for gap_start, gap_end in zip(edges[::2], edges[1::2], strict=True):
        if gap_end - gap_start >= min_gap_us:
            gaps.append((gap_start, gap_end))
    gaps.sort(key=lambda g: g[0] - g[1])
    largest = []
    for gap_start, gap_end in gaps[:top_gaps]:
        middle = (gap_start + gap_end) / 2
        largest.append(
            {
                "ms": round((gap_end - gap_start) / 1000, 3),
                "at_ms": round((gap_start - window[0]) / 1000, 2),
                "phase": innermost(phases, middle)[len(PREFIX) :],
                "host_op": innermost(host_ops, middle),
                "cuda_call": innermost(runtime, middle),
            }
        )
    return {
        "steps": steps,
        "step_ms": round(wall / 1000 / steps, 2),
        "gpu_busy_ms": round(with_work / 1000 / steps, 2),
        "gpu_idle_ms": round((wall - with_work) / 1000 / steps, 2),
        "gpu_idle_gaps_over_50us": round(len(gaps) / steps, 1),
        "phases": per_step,
        "host_calls_ms": {k: round(v / steps, 2) for k, v in sorted(calls_ms.items())},
        "largest_gaps": largest,
    }


def start_profiler():
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(activities=activities)
    profiler.__enter__()
    return profiler


def write_profile(profiler, out: Path, name: str) -> dict:
    """Stop `profiler`; <out>/profile-<name>.json (the timeline and the top operators) and the
    trace as <out>/trace-<name>.json.gz. Returns the timeline."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    profiler.__exit__(None, None, None)
    trace = out / f"trace-{name}.json"
    profiler.export_chrome_trace(str(trace))
    data = json.loads(trace.read_text())
    with gzip.open(f"{trace}.gz", "wt") as f:
        json.dump(data, f)
    trace.unlink()
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort, row_limit=30)
    summary = {"timeline": timeline(data), "top_ops": table.splitlines()}
    (out / f"profile-{name}.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary["timeline"]


@contextmanager
def profiled_generation(out: Path, name: str):
    """torch.profiler over the block, one phase "generate"; written as write_profile does."""
    profiler = start_profiler()
    try:
        with torch.profiler.record_function(PREFIX + "generate"):
            yield
            if torch.cuda.is_available():
                torch.cuda.synchronize()
    finally:
        write_profile(profiler, out, name)


def host_calls() -> list[tuple[object, str, str]]:
    """(owner, attribute, label): the Trainer's host work around a step, marked host:<label>."""
    from accelerate import Accelerator
    from torch.optim.lr_scheduler import LRScheduler
    from transformers import PreTrainedModel, Trainer
    from transformers.trainer_callback import CallbackHandler

    from finance_qlora import step_trainer

    return [
        (Trainer, "get_batch_samples", "next batches"),
        (Accelerator, "clip_grad_norm_", "clip gradients"),
        (Trainer, "_get_grad_norm", "gradient norm"),
        (Trainer, "_track_num_input_tokens", "count input tokens"),
        (Trainer, "_maybe_log_save_evaluate", "log, save, evaluate"),
        (PreTrainedModel, "num_parameters", "count parameters (flops)"),
        (torch.nn.Module, "zero_grad", "zero gradients"),
        (step_trainer, "drop_gradients", "zero gradients"),  # StepTrainer's, after its first
        (LRScheduler, "step", "learning rate"),
        (CallbackHandler, "on_step_end", "step-end callbacks"),
    ]


def marked(function, label: str):
    def call(*args, **kwargs):
        with torch.profiler.record_function(HOST + label):
            return function(*args, **kwargs)

    return call


def profile_phases(out: Path, name: str, first_step: int = 2, steps: int = 3):
    """A TrainerCallback: torch.profiler from the start of step `first_step` + 1 over `steps`
    whole optimizer steps, each cut into phases; written as write_profile does."""
    from accelerate import Accelerator
    from transformers import TrainerCallback

    class Callback(TrainerCallback):
        profiler = None
        current = None

        def switch(self, phase: str | None) -> None:
            if self.current is not None:
                self.current.__exit__(None, None, None)
            self.current = None
            if phase is not None:
                self.current = torch.profiler.record_function(PREFIX + phase)
                self.current.__enter__()

        def start(self) -> None:
            self.profiler = start_profiler()
            # what each owner itself defined (None: inherited), to put back as it was
            self.saved = [(owner, attr, vars(owner).get(attr)) for owner, attr, _ in host_calls()]
            for owner, attr, label in host_calls():
                setattr(owner, attr, marked(getattr(owner, attr), label))
            self.backward = Accelerator.backward
            callback, backward = self, self.backward

            def marked_backward(accelerator, loss, **kwargs):
                callback.switch("backward")
                try:
                    return backward(accelerator, loss, **kwargs)
                finally:
                    callback.switch("after-backward")

            Accelerator.backward = marked_backward

        def stop(self) -> None:
            self.switch(None)
            Accelerator.backward = self.backward
            for owner, attr, function in self.saved:
                if function is None:
                    delattr(owner, attr)
                else:
                    setattr(owner, attr, function)
            write_profile(self.profiler, out, name)
            self.profiler = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == first_step and self.profiler is None:
                self.start()
            if self.profiler is None:
                return
            if state.global_step == first_step + steps:
                self.stop()
            else:
                self.switch("forward")

        def on_substep_end(self, args, state, control, **kwargs):
            if self.profiler is not None:  # the next micro-batch of the same step
                self.switch("forward")

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if self.profiler is not None:
                self.switch("optimizer")

        def on_optimizer_step(self, args, state, control, **kwargs):
            if self.profiler is not None:
                self.switch("between-steps")

        def on_train_end(self, args, state, control, **kwargs):
            if self.profiler is not None:  # fewer steps than the window: what was recorded
                self.stop()

    return Callback()
