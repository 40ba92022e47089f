"""Decode steps of a static key/value cache replayed as CUDA graphs.

With a static cache every decode step of a batch has the same shapes and reads the same
buffers, only their values change. Eager, the host issues a 7B model's ~1,000 kernels one by one
for each new token, slower than the card runs them (300 prompts on an H200: ~30 ms of host time
a token for ~10 ms of GPU work). A CUDA graph records one step's kernels once and replays them
with one launch: the same kernels on the same shapes, so the same answers. That is checked where
each graph is recorded: its first replay must give the eager step's logits bit for bit, else the
batch's decode steps run eagerly.

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


def decode_cache(kwargs: dict[str, Any]):
    """The static cache of a decode step's forward (transformers names it `cache`, before
    5.20 `past_key_values`), or None where this is not one."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    input_ids = kwargs.get("input_ids")
    if not getattr(cache, "is_compileable", False) or kwargs.get("inputs_embeds") is not None:
        return None
    if not isinstance(input_ids, torch.Tensor) or input_ids.shape[-1] != 1:
        return None  # the prefill: its length differs batch to batch
    layers = getattr(cache, "layers", None) or []
    if not layers or not all(getattr(layer, "is_initialized", False) for layer in layers):
        return None
    return cache


def step_key(kwargs: dict[str, Any], cache) -> tuple:
    """What a recorded step is only valid for: every tensor's shape, dtype and device, every
    other argument's value, and the cache's own buffers (a new cache is new memory)."""
    parts: list[Any] = [id(cache)]
    parts += [layer.keys.data_ptr() for layer in cache.layers]
    for name in sorted(kwargs):
        value = kwargs[name]
        if value is cache:
            continue
        if isinstance(value, torch.Tensor):
            parts.append((name, tuple(value.shape), value.dtype, value.device, value.stride()))
        else:
            parts.append((name, repr(value)))
    return tuple(parts)


def counters_of(cache) -> dict[tuple[int, str], torch.Tensor]:
    """The cache's small tensors (transformers' StaticLayer keeps how many positions it holds
    in one, added to by every step), to be set back after a step run only to warm up."""
    return {
        (index, name): value.clone()
        for index, layer in enumerate(cache.layers)
        for name, value in vars(layer).items()
        if isinstance(value, torch.Tensor) and value.numel() <= 16
    }


def set_back(cache, counters: dict[tuple[int, str], torch.Tensor]) -> None:
    for (index, name), value in counters.items():
        getattr(cache.layers[index], name).copy_(value)


class DecodeGraphs:
    """A causal LM's forward that replays decode steps as graphs (one per cache and batch
    shape) and runs every other call eagerly. `new_graph` makes the recorder (tests pass one
    that runs on the CPU)."""

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
        except torch.OutOfMemoryError:
            set_back(cache, counters)
            raise  # generate_shard halves the batch; the smaller one records its own graph
        except Exception as exc:  # noqa: BLE001 - whatever fails to record runs eagerly
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
