"""finance_qlora.heap: the heap alive when a scope begins stays out of garbage collections until
the outermost scope ends, and a model let go inside a scope is still collected there."""

from __future__ import annotations

import gc
import threading
import weakref
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest

from finance_qlora import heap
from finance_qlora.files import write_jsonl
from finance_qlora.modeling import loaded
from finance_qlora.presets import resolve_config
from finance_qlora.prompts import to_prompt_completion
from finance_qlora.training import train_adapter
from tests.conftest import make_rows


class Node:
    """A reference cycle: only a garbage collection frees it."""

    def __init__(self):
        self.me = self


@contextmanager
def no_automatic_collections():
    """Only the collections the test asks for (an automatic one would blur what a scope kept)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@pytest.fixture
def prompts(tmp_path) -> Path:
    """Eight training rows for the tiny model."""
    path = tmp_path / "train.jsonl"
    write_jsonl(path, [to_prompt_completion(r) for r in make_rows(8)])
    return path


def cycle_garbage() -> weakref.ref:
    """A reference cycle nobody holds any more: garbage until a collection frees it."""
    return weakref.ref(Node())


def test_what_was_alive_at_the_entry_is_not_walked_until_the_end():
    with no_automatic_collections():
        node = Node()
        alive_at_entry = weakref.ref(node)
        with heap.frozen():
            del node  # garbage now, but frozen with the heap it belonged to
            made_inside = cycle_garbage()
            gc.collect()
            assert made_inside() is None  # the scope's own garbage is collected in it
            assert alive_at_entry() is not None  # the heap from before is not walked
        assert gc.get_freeze_count() == 0
        gc.collect()
        assert alive_at_entry() is None  # collected once the scope has ended


@pytest.mark.parametrize("nested", [False, True])
def test_garbage_at_an_entry_is_collected_never_frozen(nested):
    """A failed attempt's model is garbage when the next attempt's scope begins: collected
    there (inside the flow's scope, among the objects made since its freeze)."""
    with no_automatic_collections(), heap.frozen() if nested else nullcontext():
        failed_attempt = cycle_garbage()
        with heap.frozen():
            assert failed_attempt() is None


def test_scopes_nest_and_only_the_outermost_end_unfreezes():
    """An inner scope's end, in this thread or another (a task's in a worker thread of the
    flow's), leaves the outer scope's heap frozen. (The frozen count is no measure: a frozen
    object freed by its reference count leaves it.)"""
    with no_automatic_collections():
        node = Node()
        alive_at_entry = weakref.ref(node)
        with heap.frozen():
            del node  # garbage, frozen with the outer scope's heap
            with heap.frozen():
                pass
            worker = threading.Thread(target=in_a_scope)
            worker.start()
            worker.join()
            gc.collect()
            assert alive_at_entry() is not None  # still frozen after both inner scopes
        assert gc.get_freeze_count() == 0
        gc.collect()
        assert alive_at_entry() is None


def in_a_scope() -> None:
    with heap.frozen():
        pass


def test_off_it_freezes_nothing(monkeypatch):
    monkeypatch.setattr(heap, "ENABLED", False)
    before = gc.get_freeze_count()  # 0 unless a library froze some itself
    with heap.frozen():
        assert gc.get_freeze_count() == before


@pytest.mark.slow
def test_a_loaded_model_is_collected_at_its_release_inside_the_flows_scope():
    """The flow's scope holds through its tasks; a model let go at a task's end is still
    collected then (its GPU memory given back), not at the flow's end."""
    config = resolve_config("tiny-cpu")
    with loaded(config.model):
        # a process's first 4-bit load on the CPU logs bitsandbytes' warning with its
        # traceback, whose frames pytest's log capture keeps (and the model with them)
        pass
    with heap.frozen():
        made_in_the_flow = Node()
        kept_by_the_loading = weakref.ref(made_in_the_flow)
        with loaded(config.model) as (model, _):
            held = weakref.ref(model)
            model.holds_itself = [model]  # a reference cycle: only a collection frees it
            del model, made_in_the_flow  # both garbage now
        assert held() is None  # collected at the loading's release
        # frozen at the loading's entry: its release did not walk what the flow had made
        assert kept_by_the_loading() is not None
    gc.collect()
    assert kept_by_the_loading() is None


@pytest.mark.slow
def test_a_training_runs_with_the_heap_frozen_and_lets_its_model_go(prompts, tmp_path):
    from transformers import TrainerCallback

    seen: dict = {}

    class Watch(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen["frozen"] = gc.get_freeze_count()
            seen["model"] = weakref.ref(model)

    config = resolve_config("tiny-cpu", {"train": {"epochs": 1}})
    train_adapter(
        prompts, config.model, config.lora, config.train, tmp_path / "out", callbacks=[Watch()]
    )
    assert seen["frozen"] > 0  # the steps' collections skipped the heap from before
    assert seen["model"]() is None  # let go when training ended
    assert gc.get_freeze_count() == 0  # its scope was the outermost


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["paged_adamw_8bit", "adamw_bnb_8bit"])
def test_an_8bit_training_leaves_no_embeddings_in_the_optimizer_registry(
    optimizer, prompts, tmp_path
):
    """transformers registers each embedding with bitsandbytes' process-wide optimizer
    registry, which kept it (on the card) for the life of the worker: let go with the model."""
    from bitsandbytes.optim import GlobalOptimManager
    from transformers import TrainerCallback

    seen: dict = {}

    class Watch(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            registered = GlobalOptimManager.get_instance().module_weight_config_triple
            seen["registered"] = [module for module, _, _ in registered]
            seen["embeddings"] = weakref.ref(model.get_input_embeddings())

    config = resolve_config("tiny-cpu", {"train": {"epochs": 1, "optimizer": optimizer}})
    train_adapter(
        prompts, config.model, config.lora, config.train, tmp_path / "out", callbacks=[Watch()]
    )
    # registered while training
    assert any(module is seen["embeddings"]() for module in seen.pop("registered"))
    gc.collect()
    assert seen["embeddings"]() is None


def test_forgetting_a_models_optimizer_overrides_keeps_every_other_models(monkeypatch):
    """What an optimizer derived from the overrides goes with the model's modules: keyed by
    parameter ids (a later model's may reuse them) and by the optimizer's positions."""
    import torch
    from bitsandbytes.optim import Adam8bit, GlobalOptimManager

    from finance_qlora.step_trainer import forget_optimizer_overrides

    monkeypatch.setattr(GlobalOptimManager, "_instance", None)  # a registry of the test's own
    manager = GlobalOptimManager.get_instance()
    models = [torch.nn.Sequential(torch.nn.Embedding(300, 64)) for _ in range(2)]
    for model in models:
        manager.register_module_override(model[0], "weight", {"optim_bits": 32})
        Adam8bit(model.parameters()).check_overrides()  # as an optimizer's first step does
    assert set(manager.pid2config) == {id(m[0].weight) for m in models}
    assert manager.index2config  # (group, position) -> the last optimizer's config

    forget_optimizer_overrides(models[1])
    assert [module for module, _, _ in manager.module_weight_config_triple] == [models[0][0]]
    assert set(manager.pid2config) == {id(models[0][0].weight)}
    assert manager.index2config == {}  # the position was the forgotten model's
    forget_optimizer_overrides(models[0])
    assert manager.module_weight_config_triple == [] and manager.pid2config == {}


@pytest.mark.slow
def test_an_out_of_memory_attempts_model_is_let_go_before_the_retry_trains(prompts, tmp_path):
    """Inside the flow's scope, the back-off's next attempt never trains beside the failed
    attempt's model (its GPU memory)."""
    import torch
    from transformers import TrainerCallback

    models: list[weakref.ref] = []
    alive_at_retry: list[bool] = []

    class OutOfMemoryOnce(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            alive_at_retry.extend(m() is not None for m in models)
            model.holds_itself = [model]  # as a real model may: only a collection frees it
            models.append(weakref.ref(model))

        def on_step_begin(self, args, state, control, **kwargs):
            if len(models) == 1:
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    config = resolve_config("tiny-cpu", {"train": {"epochs": 1, "batch_size": 2}})
    with heap.frozen():
        train_adapter(
            prompts,
            config.model,
            config.lora,
            config.train,
            tmp_path / "out",
            callbacks=[OutOfMemoryOnce()],
        )
    assert len(models) == 2 and alive_at_retry == [False]
