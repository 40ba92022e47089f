"""The training and generation settings that benchmarks/gpu_throughput.py compares, and the
switches that put a library's or the project's behaviour back as it was before a change, so a
change is timed beside itself."""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch

from benchmarks.mm_switches import heuristics_capacity, mm_timed, workspace_named
from finance_qlora import flat_optimizer, generation, heap, kernels, sync_free
from finance_qlora.presets import PRESETS

# Training settings compared, all at the recipe's schedule: 16 rows an optimizer step, 63 steps
# for the 1,000 rows, whatever the micro-batches. Every field a variant varies is set in each,
# not inherited from a preset. "llama2-7b-h100" is that preset's own train section.
STEP = {
    "rows_per_step": 16,
    "gradient_checkpointing": False,
    "dequantize": "never",
    "padding_free": False,
    "fused_kernels": False,
    "compile": False,
}
PACKED = STEP | {"max_tokens_per_batch": 16384, "padding_free": True}
TRAIN_VARIANTS = {
    # the configuration's default micro-batches: 4 padded rows, 4 of them a step
    "rows4-padded": STEP | {"batch_size": 4, "max_tokens_per_batch": None},
    # the T4 preset's micro-batches: at most 4,096 padded tokens
    "budget4096-padded": STEP | {"max_tokens_per_batch": 4096},
    # a step's 16 rows in one padding-free micro-batch
    "packed-liger": PACKED | {"fused_kernels": True},
    "packed-dequantized": PACKED | {"dequantize": "always"},
    "packed-dequantized-liger": PACKED | {"dequantize": "always", "fused_kernels": True},
    # the preset as shipped: its layers compiled (inductor's Python wrapper)
    "llama2-7b-h100": {"rows_per_step": 16, **PRESETS["llama2-7b-h100"]["train"]},
}
# the preset's layers run eagerly with Liger's kernels: its training until it compiled them
# (2026-11-29), and the base of the comparisons made before
H100_EAGER = TRAIN_VARIANTS["llama2-7b-h100"] | {"compile": False, "fused_kernels": True}
TRAIN_VARIANTS |= {
    "llama2-7b-h100-eager": H100_EAGER,
    # the eager preset as it ran before finance_qlora.kernels.uncast_adapter_inputs (PEFT's casts)
    "llama2-7b-h100-peft-casts": H100_EAGER,
    # compiled layers without Liger's kernels, which do not compile (inductor fuses the norms
    # and activations itself): the preset's settings, under the name the results before used
    "llama2-7b-h100-compiled-noliger": H100_EAGER | {"compile": True, "fused_kernels": False},
}
# compiled layers with inductor's C++ wrapper around their kernels instead of its Python one
TRAIN_VARIANTS["llama2-7b-h100-compiled-noliger-cppwrapper"] = TRAIN_VARIANTS[
    "llama2-7b-h100-compiled-noliger"
]
# both wrappers with independent kernels launched together (inductor's combo_kernels)
for wrapper in ("", "-cppwrapper"):
    TRAIN_VARIANTS[f"llama2-7b-h100-compiled-noliger{wrapper}-combo"] = TRAIN_VARIANTS[
        "llama2-7b-h100-compiled-noliger"
    ]
# the same with the layers' float attributes as graph inputs (see float_attributes)
TRAIN_VARIANTS["llama2-7b-h100-compiled-noliger-cppwrapper-dynamic-floats"] = TRAIN_VARIANTS[
    "llama2-7b-h100-compiled-noliger"
]
# the same settings with the libraries' own waits for the GPU (finance_qlora.sync_free off)
TRAIN_VARIANTS |= {
    f"{name}-waits": TRAIN_VARIANTS[name]
    for name in ("llama2-7b-h100-eager", "llama2-7b-h100-compiled-noliger")
}
# the preset with every garbage collection walking the whole heap (before finance_qlora.heap)
TRAIN_VARIANTS["llama2-7b-h100-heap-as-before"] = TRAIN_VARIANTS["llama2-7b-h100"]
# the preset with each training's embeddings left in bitsandbytes' optimizer registry (before
# step_trainer.forget_optimizer_overrides)
TRAIN_VARIANTS["llama2-7b-h100-registry-as-before"] = TRAIN_VARIANTS["llama2-7b-h100"]
# a diagnostic: the preset with dynamo's guards left unchecked at each compiled layer's call
TRAIN_VARIANTS["llama2-7b-h100-guards-skipped"] = TRAIN_VARIANTS["llama2-7b-h100"]
# diagnostics: the preset with the host's time of each matrix product the compiled layers call
# recorded (mm_timed), and the same with cuBLASLt's heuristics cache 8 times its default (both
# train without CUBLAS_WORKSPACE_CONFIG since 2026-11-30, as the preset does; their committed
# results had it named: -mm-timed-workspace-named)
TRAIN_VARIANTS["llama2-7b-h100-mm-timed"] = TRAIN_VARIANTS["llama2-7b-h100"]
TRAIN_VARIANTS["llama2-7b-h100-heuristics-65536"] = TRAIN_VARIANTS["llama2-7b-h100"]
# the preset with CUBLAS_WORKSPACE_CONFIG left named while it trains (as until 2026-11-30,
# finance_qlora.cublas_workspace), and the same with its products' host time recorded
TRAIN_VARIANTS["llama2-7b-h100-workspace-named"] = TRAIN_VARIANTS["llama2-7b-h100"]
TRAIN_VARIANTS["llama2-7b-h100-mm-timed-workspace-named"] = TRAIN_VARIANTS["llama2-7b-h100"]
# the same settings with the host's work around a step as before 2026-11-29 (see
# host_as_before): each beside the setting as it is
TRAIN_VARIANTS |= {
    f"{name}-host-as-before": TRAIN_VARIANTS[name] | {"loader_workers": 0}
    for name in ("llama2-7b-h100-eager", "llama2-7b-h100-compiled-noliger-cppwrapper")
}


def peft_input_casts():
    """A TrainerCallback that turns PEFT's input casts back on at the start of training."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import TrainerCallback

    class Callback(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            for module in model.modules():
                if isinstance(module, BaseTunerLayer):
                    module.cast_input_dtype_enabled = True

    return Callback()


def library_waits():
    """A TrainerCallback that turns finance_qlora.sync_free off for one training."""
    from transformers import TrainerCallback

    class Callback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            sync_free.ENABLED = False

        def on_train_end(self, args, state, control, **kwargs):
            sync_free.ENABLED = True

    return Callback()


@contextmanager
def host_as_before():
    """The host's work around a step as before 2026-11-29: bitsandbytes' update weight by
    weight (finance_qlora.flat_optimizer off), the Trainer's own FLOPs estimate (the model's
    parameters counted each step), clipping and zeroing (over all of them); with the variant's
    loader_workers=0, batches collated in the training process between steps."""
    from transformers import Trainer

    import finance_qlora.training as training

    made, enabled = training.step_trainer_class, flat_optimizer.ENABLED

    def as_before():
        class AsBefore(made()):
            floating_point_ops = Trainer.floating_point_ops
            _clip_grad_norm = Trainer._clip_grad_norm
            trainable_zeroing = False

        return AsBefore

    flat_optimizer.ENABLED, training.step_trainer_class = False, as_before
    try:
        yield
    finally:
        flat_optimizer.ENABLED, training.step_trainer_class = enabled, made


@contextmanager
def heap_as_before():
    """Garbage collections walk every object, as before finance_qlora.heap: no scope freezes
    the heap alive at its entry."""
    enabled, heap.ENABLED = heap.ENABLED, False
    try:
        yield
    finally:
        heap.ENABLED = enabled


@contextmanager
def registry_as_before():
    """Each training's embeddings stay in bitsandbytes' optimizer registry, as before
    step_trainer.forget_optimizer_overrides (0.25 GiB more held on the card a 7B training)."""
    from finance_qlora import step_trainer

    forget, step_trainer.forget_optimizer_overrides = (
        step_trainer.forget_optimizer_overrides,
        lambda model: None,
    )
    try:
        yield
    finally:
        step_trainer.forget_optimizer_overrides = forget


@contextmanager
def guards_skipped():
    """A diagnostic of the host time dynamo's guards cost at each compiled layer's call:
    torch.compiler.set_stance's `skip_guard_eval_unsafe` (only the guards that tell cache
    entries apart are checked). Not for a product: an input the graph does not fit would run it
    anyway."""
    with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
        yield


def inductor_wrapper(cpp: bool, combo: bool = False):
    """A TrainerCallback factory: the compiled layers' kernels called from inductor's C++
    wrapper (`cpp`) or its Python one; with `combo`, independent kernels of a graph launched as
    one (inductor's combo_kernels: fewer launches). When either changes dynamo's compiled code
    is dropped: the layers would otherwise reuse the graph compiled the other way."""
    from transformers import TrainerCallback

    class Callback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            import torch._inductor.config as inductor

            if (inductor.cpp_wrapper, inductor.combo_kernels) != (cpp, combo):
                torch._dynamo.reset()
                inductor.cpp_wrapper, inductor.combo_kernels = cpp, combo

    return lambda: Callback()


@contextmanager
def float_attributes(constant: bool):
    """The compiled layers' float attributes as constants (`constant`, as kernels.CONSTANT_FLOATS
    has it) or as graph inputs (as before it), around every training run (runner). When that
    changes, dynamo's compiled code is dropped, which the layers would otherwise reuse: so
    -dynamic-floats variants run one after the other, not with --interleave (main refuses)."""
    import torch._dynamo.config

    if torch._dynamo.config.specialize_float != constant:
        torch._dynamo.reset()
    kernels.CONSTANT_FLOATS = constant
    try:
        yield
    finally:
        kernels.CONSTANT_FLOATS = True


VARIANT_CALLBACKS = {
    "llama2-7b-h100": [inductor_wrapper(False)],
    "llama2-7b-h100-heap-as-before": [inductor_wrapper(False)],
    "llama2-7b-h100-registry-as-before": [inductor_wrapper(False)],
    "llama2-7b-h100-guards-skipped": [inductor_wrapper(False)],
    "llama2-7b-h100-mm-timed": [inductor_wrapper(False)],
    "llama2-7b-h100-heuristics-65536": [inductor_wrapper(False)],
    "llama2-7b-h100-workspace-named": [inductor_wrapper(False)],
    "llama2-7b-h100-mm-timed-workspace-named": [inductor_wrapper(False)],
    "llama2-7b-h100-compiled-noliger": [inductor_wrapper(False)],
    "llama2-7b-h100-compiled-noliger-cppwrapper": [inductor_wrapper(True)],
    "llama2-7b-h100-compiled-noliger-combo": [inductor_wrapper(False, combo=True)],
    "llama2-7b-h100-compiled-noliger-cppwrapper-combo": [inductor_wrapper(True, combo=True)],
    "llama2-7b-h100-peft-casts": [peft_input_casts],
    "llama2-7b-h100-eager-waits": [library_waits],
    "llama2-7b-h100-compiled-noliger-waits": [library_waits],
    "llama2-7b-h100-compiled-noliger-cppwrapper-host-as-before": [inductor_wrapper(True)],
    "llama2-7b-h100-compiled-noliger-cppwrapper-dynamic-floats": [inductor_wrapper(True)],
}
VARIANT_CONTEXTS = {
    "llama2-7b-h100-heap-as-before": heap_as_before,
    "llama2-7b-h100-registry-as-before": registry_as_before,
    "llama2-7b-h100-guards-skipped": guards_skipped,
    "llama2-7b-h100-mm-timed": mm_timed,
    "llama2-7b-h100-heuristics-65536": heuristics_capacity,
    "llama2-7b-h100-workspace-named": workspace_named,
    "llama2-7b-h100-mm-timed-workspace-named": partial(workspace_named, timed=True),
    "llama2-7b-h100-eager-host-as-before": host_as_before,
    "llama2-7b-h100-compiled-noliger-cppwrapper-host-as-before": host_as_before,
}


EVAL_VARIANTS = {
    "dequantized-dynamic": {"dequantize": "always", "cache": "dynamic", "batch_size": 300},
    # the preset: decode steps replayed as CUDA graphs (generation.cuda_graphs, on by default),
    # their attention through the project's Triton kernel (generation.decode_kernel)
    "dequantized-static": {"dequantize": "always", "cache": "static", "batch_size": 300},
    # the same with the decode steps' attention through SDPA (the preset until 2026-11-29)
    "dequantized-static-sdpa": {
        "dequantize": "always",
        "cache": "static",
        "batch_size": 300,
        "decode_kernel": "sdpa",
    },
    # the preset with its decode kernel compiled at the first decode step, not while the model
    # loads (modeling.loaded; the state before 2026-11-30). Not a generation setting: read by
    # gpu_throughput.eval_in_process alone
    "dequantized-static-not-ahead": {
        "dequantize": "always",
        "cache": "static",
        "batch_size": 300,
        "compile_ahead": False,
    },
    "dequantized-static-eager": {
        "dequantize": "always",
        "cache": "static",
        "batch_size": 300,
        "cuda_graphs": False,
    },
    # without torch's deterministic algorithms, so eager (the default before 2026-11-29)
    "dequantized-static-nondeterministic": {
        "dequantize": "always",
        "cache": "static",
        "batch_size": 300,
        "deterministic": False,
    },
    "4bit-static": {"dequantize": "never", "cache": "static", "batch_size": 300},
    # the preset's setting with the host waiting for the card at every decode step (before
    # 2026-11-29's generation.stop_checks_deferred)
    "dequantized-static-stop-each-step": {
        "dequantize": "always",
        "cache": "static",
        "batch_size": 300,
    },
}


@contextmanager
def stop_each_step():
    """generate() decides to stop at every decode step, as transformers does on a GPU."""
    devices = generation.DEFERRED_STOP_DEVICES
    generation.DEFERRED_STOP_DEVICES = ()
    try:
        yield
    finally:
        generation.DEFERRED_STOP_DEVICES = devices


EVAL_CONTEXTS = {"dequantized-static-stop-each-step": stop_each_step}
