"""Decode steps of a static key/value cache replayed as CUDA graphs.

With a static cache every decode step of a batch has the same shapes and reads the same
buffers, only their values change. Eager, the host issues every kernel of every layer for each
new token, and the card waits for it (SmolLM2-135M answering 300 prompts on an H200: 10.8 s
eager, 2.6 s replayed). A CUDA graph records one step's kernels once and replays them with one
launch: the same kernels on the same shapes, so the same answers. That is checked where each
graph is recorded: its first replay must give the eager step's logits bit for bit; if not, or
if recording fails, this and every later decode step runs eagerly.

transformers' own answer to this (`generate` compiling the forward for a static cache) costs a
torch.compile per process, longer than a whole evaluation here.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

log = logging.getLogger(__name__)


class CudaStepGraph:
    """One decode step as a CUDA graph: warmed up eagerly on a side stream (cuBLAS' and the
    allocator's first-use work must not be recorded), then recorded, then replayed."""

    def __init__(self) -> None:
        self.graph = torch.cuda.CUDAGraph()

    def warm_up(self, step: Callable[[], Any]) -> Any:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        before = torch.cuda.get_sync_debug_mode()
        # a step that waits for the GPU (a `.item()`, say) cannot be recorded: refuse it here,
        # before recording starts
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.cuda.stream(side):
                output = step()
        finally:
            torch.cuda.set_sync_debug_mode(before)
        torch.cuda.current_stream().wait_stream(side)
        return output

    def capture(self, step: Callable[[], Any]) -> Any:
        with torch.cuda.graph(self.graph):
            return step()

    def replay(self) -> None:
        self.graph.replay()


# Arguments a recorded step can take: tensors (copied into its input buffers each step), the
# cache, and plain values (part of its key). Anything else (a dict of masks, say, as models
# with sliding-window layers get) is not followed into, so such a step runs eagerly.
PLAIN = (type(None), bool, int, float, str)


def decode_cache(kwargs: dict[str, Any]):
    """The static cache of a decode step that can be recorded (transformers names it `cache`,
    before 5.20 `past_key_values`), or None."""
    from transformers.cache_utils import StaticLayer

    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    input_ids = kwargs.get("input_ids")
    if not isinstance(input_ids, torch.Tensor) or input_ids.shape[-1] != 1:
        return None  # the prefill: its length differs batch to batch
    # only full-attention static layers: their one position counter is a tensor, set back
    # after the warm-up (a sliding-window layer also keeps one in Python, which a recording
    # would freeze)
    layers = getattr(cache, "layers", None) or []
    if not layers or any(
        type(layer) is not StaticLayer or not layer.is_initialized for layer in layers
    ):
        return None
    others = (v for k, v in kwargs.items() if v is not cache)
    if not all(isinstance(v, torch.Tensor) or isinstance(v, PLAIN) for v in others):
        return None
    return cache


def step_key(kwargs: dict[str, Any], cache) -> tuple:
    """What a recorded step is only valid for: every tensor's shape, dtype, device and
    strides, every plain argument's value, and the cache's buffers (a graph reads and writes
    them where they were when it was recorded)."""
    parts: list[Any] = [layer.keys.data_ptr() for layer in cache.layers]
    for name in sorted(kwargs):
        value = kwargs[name]
        if value is cache:
            continue
        if isinstance(value, torch.Tensor):
            parts.append((name, tuple(value.shape), value.dtype, value.device, value.stride()))
        else:
            parts.append((name, value))
    return tuple(parts)


def counters_of(cache) -> dict[int, torch.Tensor]:
    """Each layer's count of the positions it holds, a tensor every step adds to, to be set
    back after a step run only to warm up."""
    return {index: layer.cumulative_length.clone() for index, layer in enumerate(cache.layers)}


def set_back(cache, counters: dict[int, torch.Tensor]) -> None:
    for index, value in counters.items():
        cache.layers[index].cumulative_length.copy_(value)


class DecodeGraphs:
    """A causal LM's forward that replays decode steps as graphs and runs every other call
    eagerly. `generate_shard` drops the graph after each batch's `generate` (its cache goes
    with it), so each batch records its own at its first decode step. After a failure every
    later step runs eagerly. `new_graph` makes the recorder (tests pass one that runs on the
    CPU)."""

    def __init__(self, model, new_graph: Callable[[], Any] = CudaStepGraph):
        self.eager = model.forward
        self.new_graph = new_graph
        self.key: tuple | None = None
        self.graph = None
        self.inputs: dict[str, torch.Tensor] = {}
        self.output = None
        self.eager_reason: str | None = None  # why decode steps stopped using graphs
        self.captures = self.replays = 0

    def forward(self, *args, **kwargs):
        cache = None if (args or self.eager_reason) else decode_cache(kwargs)
        if cache is None:
            return self.eager(*args, **kwargs)
        key = step_key(kwargs, cache)
        if key != self.key:
            return self.record(key, kwargs, cache)
        for name, buffer in self.inputs.items():
            buffer.copy_(kwargs[name])
        self.graph.replay()
        self.replays += 1
        return self.result()

    def record(self, key: tuple, kwargs: dict[str, Any], cache):
        self.drop()
        inputs = {k: v.clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)}

        def step():
            return self.eager(**{**kwargs, **inputs})

        counters = counters_of(cache)
        try:
            graph = self.new_graph()
            expected = graph.warm_up(step).logits.clone()
            output = graph.capture(step)
            # the warm-up ran the step (and the CPU double's recording does): the cache's
            # counters as before it, so that the replay below is this step
            set_back(cache, counters)
            graph.replay()
            same = torch.equal(output.logits, expected)
        except Exception as exc:  # noqa: BLE001 - whatever fails to record runs eagerly
            # torch's OutOfMemoryError, or a failed capture's error saying so: generate_shard
            # halves the batch, and the smaller one records its own graph
            if "out of memory" in str(exc):
                raise torch.OutOfMemoryError(str(exc).splitlines()[0]) from exc
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            return self.give_up(reason, kwargs, cache, counters)
        if not same:
            reason = "the recorded step's logits differ from the eager step's"
            return self.give_up(reason, kwargs, cache, counters)
        self.key, self.graph, self.inputs, self.output = key, graph, inputs, output
        self.captures += 1
        return self.result()

    def drop(self) -> None:
        """Forget the recorded graph: its memory goes back to the allocator."""
        self.key = self.graph = self.output = None
        self.inputs = {}

    def give_up(self, reason: str, kwargs: dict[str, Any], cache, counters):
        """Run this step, and every later one, eagerly from the state before it."""
        self.eager_reason = reason
        self.drop()
        set_back(cache, counters)
        log.warning("generation: decode steps run eagerly, not as CUDA graphs (%s)", reason)
        return self.eager(**kwargs)

    def result(self):
        """The recorded output. The next replay overwrites its logits; `generate` copies the
        last position's before that (transformers 5.17 to 5.24 alike)."""
        return self.output


@contextmanager
def decode_graphs(
    model, enabled: bool, new_graph: Callable[[], Any] = CudaStepGraph
) -> Iterator[DecodeGraphs | None]:
    """While it lasts, `model`'s decode steps with a static cache replay CUDA graphs (PEFT's
    wrapper calls the base model's forward, so that is where they go)."""
    if not enabled:
        yield None
        return
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    own = vars(target).get("forward")  # an instance's forward (accelerate's hooks set one)
    graphs = DecodeGraphs(target, new_graph)

    # with the model's own signature: `generate` reads it to decide which arguments to pass
    # (without `position_ids` in it, left-padded rows would get positions counted from the pad)
    @functools.wraps(graphs.eager)
    def forward(*args, **kwargs):
        return graphs.forward(*args, **kwargs)

    target.forward = forward
    try:
        yield graphs
    finally:
        if own is None:
            del target.forward
        else:
            target.forward = own
        graphs.drop()
