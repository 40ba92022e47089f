"""Faster ways to compute the same training step: compiled decoder layers, and no fp32 round
trip of the adapters' inputs under mixed precision."""

import shutil
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from finance_qlora.errors import ConfigError
from finance_qlora.files import write_jsonl
from finance_qlora.kernels import compile_layers, uncast_adapter_inputs
from finance_qlora.presets import resolve_config
from finance_qlora.prompts import to_prompt_completion
from finance_qlora.training import build_trainer
from tests.conftest import make_rows, tiny_llama


class CountCasts(TorchDispatchMode):
    """Counts dtype conversions (aten._to_copy) run under it."""

    def __init__(self):
        super().__init__()
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default:
            self.casts += 1
        return func(*args, **(kwargs or {}))


def bf16_lora_model():
    """A bf16 Llama with fp32 LoRA adapters on q/v: the dequantized base of the GPU presets."""
    from peft import LoraConfig, get_peft_model

    base = tiny_llama().to(torch.bfloat16)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.05)
    model = get_peft_model(base, lora)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapters something to add
            torch.nn.init.normal_(param, std=0.5)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    return model.eval()


def forward_casts(model, mixed: bool) -> tuple[torch.Tensor, int]:
    trainer = SimpleNamespace(args=SimpleNamespace(bf16=mixed, fp16=False), model=model)
    ids = torch.arange(1, 25)[None]
    with uncast_adapter_inputs(trainer), CountCasts() as count:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
    return logits, count.casts


def test_mixed_precision_skips_the_adapters_fp32_round_trip_with_the_same_outputs():
    model = bf16_lora_model()
    with_peft_casts, peft_casts = forward_casts(model, mixed=False)
    without, casts = forward_casts(model, mixed=True)
    # PEFT's own cast, and autocast's straight back, for each of the 4 adapters
    assert peft_casts - casts == 2 * 4
    assert torch.equal(with_peft_casts, without)  # every 16-bit value is exact in fp32
    # and the setting is PEFT's again afterwards
    assert forward_casts(model, mixed=False)[1] == peft_casts


@pytest.mark.slow
def test_compiled_layers_train_like_the_plain_ones(tmp_path):
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("inductor needs a C compiler on the CPU")
    prompts = tmp_path / "train.jsonl"
    write_jsonl(prompts, [to_prompt_completion(r) for r in make_rows(8)])
    losses = {}
    for compiled in (False, True):
        config = resolve_config("tiny-cpu", {"train": {"compile": compiled, "warmup_ratio": 0}})
        trainer = build_trainer(
            prompts, config.model, config.lora, config.train, tmp_path / str(compiled)
        )
        layers = trainer.model.get_base_model().model.layers
        assert all((layer._compiled_call_impl is not None) == compiled for layer in layers)
        trainer.train()
        losses[compiled] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # the same arithmetic, fused: equal up to float rounding
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
    # and again in this process (a retry, a sweep's next candidate): the compiled code that
    # torch keeps for the layer class still runs
    trainer = build_trainer(prompts, config.model, config.lora, config.train, tmp_path / "again")
    trainer.train()
    again = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert again == pytest.approx(losses[False], abs=1e-5)


@pytest.fixture
def fresh_dynamo():
    """Dynamo's compiled code dropped before and after (a test's backend never serves another
    test's layers), and the process-wide settings compile_layers makes set back."""
    import torch._dynamo.config
    import torch._inductor.config

    torch._dynamo.reset()
    with (
        torch._dynamo.config.patch(specialize_float=False),
        torch._inductor.config.patch(fallback_random=False),
    ):
        yield
    torch._dynamo.reset()


def test_compiled_layers_take_their_float_attributes_as_constants(fresh_dynamo):
    """RMSNorm's epsilon, LoRA's scaling and dropout rate and the attention's scale are compiled
    in: not 0-d CPU float64 inputs, which a CUDA graph converts with a C++ kernel (a C++ build,
    and inductor's test builds of the CPU's vector instructions, at every compile)."""
    graphs = []

    def record(graph, example_inputs):
        graphs.append(example_inputs)
        return graph.forward

    model = bf16_lora_model()
    expected = model(input_ids=torch.arange(1, 25)[None]).logits
    assert compile_layers(model, backend=record) == 2
    logits = model(input_ids=torch.arange(1, 25)[None]).logits
    assert graphs  # the layers went through the backend
    floats = [
        x
        for inputs in graphs
        for x in inputs
        if isinstance(x, float | torch.SymFloat)
        or (isinstance(x, torch.Tensor) and x.dim() == 0 and x.is_floating_point())
    ]
    assert floats == []
    assert torch.equal(logits, expected)  # this backend runs the graph eagerly


def test_every_decoder_layer_trains_through_one_compiled_graph(tmp_path, fresh_dynamo, monkeypatch):
    """The first layer too: its input (the frozen embeddings' output) requires a gradient as
    the others' do, so dynamo traces one graph for all, and a cold compile is one layer's."""
    import finance_qlora.training

    graphs = []

    def record(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    monkeypatch.setattr(
        finance_qlora.training, "compile_layers", lambda model: compile_layers(model, record)
    )
    prompts = tmp_path / "train.jsonl"
    write_jsonl(prompts, [to_prompt_completion(r) for r in make_rows(8)])
    config = resolve_config("tiny-cpu", {"train": {"compile": True, "checkpoint_steps": 0}})
    trainer = build_trainer(prompts, config.model, config.lora, config.train, tmp_path / "out")
    layers = trainer.model.get_base_model().model.layers
    assert len(layers) == 2 and all(layer._compiled_call_impl is not None for layer in layers)
    trainer.train()
    assert len(graphs) == 1


def test_compile_refuses_a_model_without_repeated_layers():
    with pytest.raises(ConfigError, match="train.compile"):
        compile_layers(torch.nn.Linear(2, 2))


@pytest.mark.slow
@pytest.mark.parametrize("fails", [False, True])
def test_names_patched_into_the_modeling_module_for_training_are_set_back(tmp_path, fails):
    """As Liger's kernels are (train.fused_kernels, CUDA only): a process's later models, the
    evaluations after training, must run transformers' own; also when training fails."""
    from transformers import TrainerCallback
    from transformers.models.llama import modeling_llama

    from finance_qlora.training import train_adapter

    rope, norm = modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaRMSNorm

    class PatchLikeLiger(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            modeling_llama.apply_rotary_pos_emb = lambda *a, **k: rope(*a, **k)
            modeling_llama.LlamaRMSNorm = type("LigerRMSNorm", (norm,), {})

        def on_step_end(self, args, state, control, **kwargs):
            if fails:
                raise RuntimeError("training failed")

    prompts = tmp_path / "train.jsonl"
    write_jsonl(prompts, [to_prompt_completion(r) for r in make_rows(4)])
    config = resolve_config("tiny-cpu", {"train": {"epochs": 1}})
    try:
        train_adapter(
            prompts,
            config.model,
            config.lora,
            config.train,
            tmp_path / "out",
            callbacks=[PatchLikeLiger()],
        )
    except RuntimeError:
        assert fails
    assert modeling_llama.apply_rotary_pos_emb is rope
    assert modeling_llama.LlamaRMSNorm is norm


def test_compile_with_liger_is_one_config_error():
    # the preset compiles: asking it for Liger's kernels names both ways out
    with pytest.raises(ConfigError, match="set train.compile=false to use Liger's kernels, or"):
        resolve_config("llama2-7b-h100", {"train": {"fused_kernels": True}})
    assert resolve_config("llama2-7b-h100", {"train": {"compile": False, "fused_kernels": True}})


@pytest.mark.slow
def test_training_runs_with_the_adapters_inputs_uncast(tmp_path, monkeypatch):
    import finance_qlora.training as training

    trainers = []
    uncast = training.uncast_adapter_inputs
    monkeypatch.setattr(
        training,
        "uncast_adapter_inputs",
        lambda trainer: trainers.append(trainer) or uncast(trainer),
    )
    prompts = tmp_path / "train.jsonl"
    write_jsonl(prompts, [to_prompt_completion(r) for r in make_rows(4)])
    config = resolve_config("tiny-cpu", {"train": {"epochs": 1}})
    training.train_adapter(prompts, config.model, config.lora, config.train, tmp_path / "out")
    assert len(trainers) == 1
