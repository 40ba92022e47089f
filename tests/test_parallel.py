"""More than one process: data-parallel training through torchrun and sharded evaluation, with
two gloo processes on the CPU and the tiny 4-bit model (the code path a multi-GPU worker runs)."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time

import pandas as pd
import psutil
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import finance_qlora.parallel as parallel
import finance_qlora.training as training
from finance_qlora.config import AUTO_MIN_ROW_EPOCHS, AUTO_MIN_ROWS_PER_GPU, DeviceSettings
from finance_qlora.errors import ConfigError
from finance_qlora.evaluation import evaluate_model
from finance_qlora.files import write_jsonl
from finance_qlora.generation import shard_batches
from finance_qlora.modeling import load_model
from finance_qlora.parallel import RankFailed, choose_gpus, gpus_per_step, process_count
from finance_qlora.presets import resolve_config
from finance_qlora.prompts import to_prompt_completion
from finance_qlora.schedule import devices_line
from finance_qlora.training import train_adapter
from flows.finetune import main
from tasks.retries import is_transient
from tests.conftest import make_rows


def _gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_process_count_uses_the_gpus_asked_for_or_the_cpu_processes(monkeypatch):
    _gpus(monkeypatch, 0)
    assert process_count(DeviceSettings()) == 1
    assert process_count(DeviceSettings(cpu_processes=3)) == 3
    _gpus(monkeypatch, 4)
    assert process_count(DeviceSettings(num_gpus=None)) == 4  # every visible GPU
    assert process_count(DeviceSettings()) == 1  # auto, with the work unknown: one
    assert process_count(DeviceSettings(num_gpus=2, cpu_processes=3)) == 2
    assert process_count(DeviceSettings(num_gpus=1)) == 1  # one of 4: the first


def _auto(visible: int, **overrides) -> tuple[tuple[int | None, str], ...]:
    """What "auto" gives training and evaluation for the h100 preset with `overrides`."""
    config = resolve_config("llama2-7b-h100", overrides)
    return tuple(gpus_per_step(config, visible).values())


@pytest.mark.parametrize(
    ("rows", "epochs", "rows_per_step", "visible", "expected"),
    [
        (1000, 1, 128, 2, 1),  # too little work to repay the start-up
        (1111, 9, 128, 2, 1),  # 9,999 row-epochs
        (1000, 10, 128, 2, 2),  # 10,000
        (100, 100, 256, 4, 1),  # a step holds at most the 100 rows there are
        (1200, 9, 16, 2, 1),  # enough work, but 8 rows a GPU a step: slower on 2 (measured)
        (1200, 9, 128, 2, 2),
        (1200, 9, 128, 4, 2),  # 64 rows a GPU at most: two of the four
        (1200, 9, 256, 4, 4),
        (5000, 10, 256, 1, 1),
    ],
)
def test_auto_trains_on_several_gpus_only_where_the_work_and_each_gpus_share_pay(
    rows, epochs, rows_per_step, visible, expected
):
    (gpus, why), _ = _auto(
        visible,
        data={"train_size": rows},
        train={"epochs": epochs, "rows_per_step": rows_per_step},
    )
    assert gpus == expected
    assert why.startswith("auto: ") and f"{rows * epochs:g} row-epochs" in why
    if visible == 1:
        assert why.startswith(("auto: the one visible GPU", "auto: one GPU of 1"))
    elif gpus < visible and rows * epochs >= AUTO_MIN_ROW_EPOCHS:  # the share decided
        step_rows = min(rows, rows_per_step)
        assert f"{step_rows} rows a step, at least {AUTO_MIN_ROWS_PER_GPU} a GPU" in why


@pytest.mark.parametrize(
    ("prompts", "batch", "expected"),
    [(300, 300, 1), (1999, 300, 1), (2000, 300, 4), (10_000, 300, 4), (2000, 1000, 2)],
)
def test_auto_evaluates_on_several_gpus_only_for_many_prompts_a_batch_a_gpu_at_least(
    prompts, batch, expected
):
    _, (gpus, why) = _auto(4, data={"test_size": prompts}, generation={"batch_size": batch})
    assert gpus == expected
    assert f"{prompts} prompts" in why


def test_auto_with_unknown_work_uses_one_gpu():
    assert choose_gpus(DeviceSettings(num_gpus="auto"), None, 8) == (
        1,
        "auto: one GPU of 8 (unknown work)",
    )


def test_show_config_says_what_auto_chooses_for_each_step_and_why():
    small = resolve_config("llama2-7b-h100")
    line = devices_line(small)
    assert line.startswith("devices: auto: training on one GPU for 1000 rows x 1 epoch(s)")
    assert "evaluating on one GPU for 300 prompts" in line
    large = resolve_config("llama2-7b-h100", {"train": {"epochs": 10}})
    line = devices_line(large)  # enough work, but the recipe's 16 rows a step
    assert line.startswith("devices: auto: training on one GPU for 1000 rows x 10")
    assert "16 rows a step, at least 64 a GPU" in line
    wide = resolve_config("llama2-7b-h100", {"train": {"epochs": 10, "rows_per_step": 256}})
    assert devices_line(wide).startswith("devices: auto: training on up to 4 GPUs")
    many = resolve_config("llama2-7b-h100", {"data": {"test_size": 5000}})
    assert "evaluating on up to 17 GPUs for 5000 prompts" in devices_line(many)
    batches = {"batch_size": 2000, "max_tokens_per_batch": None}  # no budget: exactly one
    one_batch = resolve_config(
        "llama2-7b-h100", {"data": {"test_size": 2000}, "generation": batches}
    )
    assert "evaluating on one GPU for 2000 prompts (several from 2000; 1 batch(es) of prompts)" in (
        devices_line(one_batch)
    )
    budget = resolve_config("llama2-7b-h100", {"data": {"test_size": 2000}})
    assert "at least 7 batch(es) of prompts" in devices_line(budget)  # a budget may split more
    sweep = resolve_config(
        "llama2-7b-h100", {"data": {"validation_size": 2500, "evaluate_on": "validation"}}
    )  # a sweep's evaluations score its validation rows
    assert "evaluating on up to 9 GPUs for 2500 prompts" in devices_line(sweep)


def test_one_process_on_a_host_with_several_gpus_trains_on_one(tmp_path):
    """The Trainer wraps a model in nn.DataParallel when one process sees several GPUs (as
    TrainingArguments counts them on such a host): a run told to use one GPU must not."""
    from finance_qlora.training import sft_config, single_device

    args = sft_config(resolve_config("tiny-cpu").train, torch.float32, tmp_path)
    assert args.n_gpu == 0  # the CPU here; set what _setup_devices finds on a 2-GPU host
    args._n_gpu = 2
    single_device(args)
    assert args.n_gpu == 1


def test_more_gpus_than_visible_is_one_line_before_any_model(monkeypatch, capsys, tmp_path):
    _gpus(monkeypatch, 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    code = main(
        ["--preset", "tiny-cpu", "--output-dir", str(tmp_path), "--set", "devices.num_gpus=4"]
    )
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "error: devices.num_gpus: 4 GPUs asked for, 2 visible (CUDA_VISIBLE_DEVICES=0,1); lower "
        "it, or unset it to use every visible GPU"
    )


def test_the_work_pools_gpu_count_reaches_the_configuration(monkeypatch):
    monkeypatch.setenv("FINANCE_QLORA_NUM_GPUS", "2")
    assert resolve_config("tiny-cpu").devices.num_gpus == 2
    monkeypatch.setenv("FINANCE_QLORA_NUM_GPUS", "two")
    with pytest.raises(ConfigError, match="^FINANCE_QLORA_NUM_GPUS: 'two' is not a GPU count"):
        resolve_config("tiny-cpu")


def test_shards_together_are_the_batches_of_one_process():
    order = [5, 3, 9, 0, 1, 2, 8, 7, 6, 4, 10]
    whole = shard_batches(order, 3)
    assert whole == [[5, 3, 9], [0, 1, 2], [8, 7, 6], [4, 10]]
    shards = [shard_batches(order, 3, rank, 2) for rank in range(2)]
    assert shards == [[[5, 3, 9], [8, 7, 6]], [[0, 1, 2], [4, 10]]]
    assert shard_batches(order, 3, 3, 4) == [[4, 10]]
    assert shard_batches(order[:2], 3, 1, 2) == []  # more processes than batches: nothing


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("parallel") / "train.jsonl"
    write_jsonl(path, [to_prompt_completion(r) for r in make_rows(16)])
    return path


def _config(**train):
    return resolve_config(
        "tiny-cpu", {"train": {"batch_size": 4, "warmup_ratio": 0, **train}, "devices": {}}
    )


@pytest.mark.slow
def test_two_processes_write_one_adapter_and_follow_one_process(prompts, tmp_path):
    config = _config(epochs=2)
    one = train_adapter(prompts, config.model, config.lora, config.train, tmp_path / "one")
    logged = []
    two = train_adapter(
        prompts,
        config.model,
        config.lora,
        config.train,
        tmp_path / "two",
        on_log=lambda step, total, loss: logged.append((step, total)),
        processes=2,
    )
    assert two.steps == one.steps == 2 * 16 // 4  # the same global batch: the same steps
    assert logged == [(s, one.steps) for s in range(1, one.steps + 1)]  # rank 0's progress
    # the same rows per step, the loss token-weighted over both ranks: the same curve, within
    # what LoRA dropout (drawn per rank) moves it
    assert two.losses == pytest.approx(one.losses, abs=5e-3)
    assert [p.name for p in (tmp_path / "two").iterdir() if p.name.startswith("final")] == ["final"]
    weights = load_file(two.path / "adapter_model.safetensors")
    reference = load_file(one.path / "adapter_model.safetensors")
    assert weights.keys() == reference.keys()  # not the values: LoRA dropout draws per rank
    model = PeftModel.from_pretrained(load_model(config.model), two.path)
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())


@pytest.mark.slow
def test_compiled_layers_on_two_processes_train_like_eager_ones(prompts, tmp_path, monkeypatch):
    """llama2-7b-h100 compiles its layers; on several GPUs each rank compiles its own model's
    layers inside DDP: the same losses as eager layers on two processes, compiled in the ranks,
    and rank 0 writes them for the store (train.compile_cache=store)."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("inductor needs a C compiler on the CPU")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # the ranks'
    losses, kept = {}, tmp_path / "kept" / "artifacts.bin"
    for compiled in (False, True):
        config = _config(epochs=2, compile=compiled)
        train = (config.model, config.lora, config.train)
        out = tmp_path / str(compiled)
        run = train_adapter(prompts, *train, out, processes=2, save_compiled=kept)
        losses[compiled] = run.losses
        assert kept.is_file() == compiled  # eager layers: nothing to keep
    assert any((tmp_path / "inductor").rglob("*.py"))  # the ranks compiled (inductor's code)
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)


@pytest.mark.slow
def test_sharded_evaluation_gives_the_answers_of_one_process(tmp_path):
    config = resolve_config("tiny-cpu", {"generation": {"max_new_tokens": 10, "batch_size": 2}})
    test = tmp_path / "test.jsonl"
    write_jsonl(test, [to_prompt_completion(r) for r in make_rows(7)])
    progress = []
    args = (test, config.model, config.generation)
    one = evaluate_model(*args, tmp_path / "one", "x")
    two = evaluate_model(
        *args, tmp_path / "two", "x", on_progress=lambda *p: progress.append(p), processes=2
    )
    three = evaluate_model(*args, tmp_path / "three", "x", processes=3)
    tables = [pd.read_parquet(r.predictions_parquet) for r in (one, two, three)]
    for table in tables[1:]:
        assert table["raw_prediction"].tolist() == tables[0]["raw_prediction"].tolist()
        assert table["new_tokens"].tolist() == tables[0]["new_tokens"].tolist()
        assert table["prompt"].tolist() == tables[0]["prompt"].tolist()  # the original order
    assert one.rouge == two.rouge == three.rouge
    assert progress[-1] == (7, 7)
    # each process answered its own share only
    shards = [
        len((tmp_path / "two.shards" / f"shard-{r}.jsonl").read_text().splitlines()) for r in (0, 1)
    ]
    assert shards == [4, 3]  # batches of 2 in turn: rows 1-2, 5-6 and 3-4, 7


def test_evaluation_starts_no_process_past_the_last_batch(tmp_path):
    """Batch k goes to process k mod N: with every prompt in one batch, two processes would
    leave the second only starting and loading. One batch is answered here, as by one."""
    config = resolve_config("tiny-cpu", {"generation": {"max_new_tokens": 6, "batch_size": 8}})
    test = tmp_path / "test.jsonl"
    write_jsonl(test, [to_prompt_completion(r) for r in make_rows(5)])
    args = (test, config.model, config.generation)
    one = evaluate_model(*args, tmp_path / "one", "x")
    two = evaluate_model(*args, tmp_path / "two", "x", processes=2)
    assert not (tmp_path / "two.shards").exists()  # no process was launched
    first, second = (pd.read_parquet(r.predictions_parquet) for r in (one, two))
    assert second["raw_prediction"].tolist() == first["raw_prediction"].tolist()


@pytest.mark.slow
def test_the_flow_on_two_processes_writes_one_loadable_adapter(prefect_api, tmp_path):
    from tests.test_flow import run_flow, sent_logs, task_states

    state, result = run_flow(tmp_path, devices={"cpu_processes": 2})
    assert state.is_completed()
    adapters = list((tmp_path / "adapters").iterdir())
    assert [a.name for a in adapters] == [result["adapter"].rsplit("/", 1)[-1]]
    config = resolve_config("tiny-cpu")
    model = PeftModel.from_pretrained(load_model(config.model), adapters[0])
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())
    assert all(s == ["Completed"] for s in task_states(state).values())
    logs = sent_logs(state.state_details.flow_run_id)
    assert "data-parallel training on 2 processes" in logs
    assert any(m.startswith("step 14/14  loss") for m in logs)  # rank 0's progress, logged


def _ranks() -> list[psutil.Process]:
    return [
        p
        for p in psutil.Process().children(recursive=True)
        if "finance_qlora.rank" in " ".join(p.cmdline())
        and "torch.distributed.run" not in " ".join(p.cmdline())
    ]


@pytest.mark.slow
def test_a_killed_rank_fails_the_training_and_the_retry_resumes(prompts, tmp_path):
    config = _config(epochs=40, checkpoint_steps=4, logging_steps=20)
    out = tmp_path / "out"
    outcome = {}

    def run() -> None:
        try:
            outcome["record"] = train_adapter(
                prompts, config.model, config.lora, config.train, out, processes=2
            )
        except Exception as exc:  # noqa: BLE001 - inspected below
            outcome["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 300
    while not list(out.glob("checkpoint-*/trainer_state.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    ranks = _ranks()
    assert len(ranks) == 2, ranks
    ranks[-1].kill()
    worker.join(timeout=300)
    error = outcome.get("error")
    assert isinstance(error, RankFailed), outcome
    assert "a training process exited with code" in str(error)
    assert is_transient(error)  # the task's retry rule retries it
    assert not (out / "final").exists()

    resumed = train_adapter(prompts, config.model, config.lora, config.train, out, processes=2)
    assert resumed.resumed_from and resumed.resumed_from >= 4
    assert resumed.steps == 40 * 16 // 4
    assert (resumed.path / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_a_rank_with_bad_input_gives_its_one_line_error(prompts, tmp_path):
    config = _config(max_seq_length=8)  # no row fits: the ranks find it, not preflight
    with pytest.raises(ConfigError, match=r"^train.max_seq_length: 8 tokens is too short"):
        train_adapter(
            prompts, config.model, config.lora, config.train, tmp_path / "out", processes=2
        )


def test_ctrl_c_stops_the_processes():
    sleeper = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(600)"]
    interrupt = threading.Timer(3.0, lambda: os.kill(os.getpid(), signal.SIGINT))
    interrupt.start()
    with pytest.raises(KeyboardInterrupt):
        parallel.Launch().run([(sleeper, dict(os.environ)), (sleeper, dict(os.environ))])
    left = [
        p
        for p in psutil.Process().children(recursive=True)
        if "time.sleep(600)" in " ".join(p.cmdline())
    ]
    assert not left


@pytest.mark.slow
def test_only_rank_zero_writes_the_adapter(prompts, tmp_path, monkeypatch):
    """Every rank trains; a rank other than 0 writes nothing and returns no record."""
    from transformers import Trainer

    from finance_qlora.training import train_in_process

    monkeypatch.setattr(Trainer, "is_world_process_zero", lambda self: False)
    config = _config(checkpoint_steps=0)
    args = (prompts, config.model, config.lora, config.train, tmp_path, None, None, [])
    assert train_in_process(*args) is None
    assert not (tmp_path / "final").exists()


@pytest.mark.parametrize("kind", ["kubernetes", "docker", "vertex-ai", "process"])
def test_every_gpu_template_asks_for_gpu_count_gpus(kind):
    """A worker fills the job configuration from the variables: gpu_count reaches the place
    where that platform counts GPUs."""
    import json

    from prefect.utilities.templating import apply_values

    from tests.conftest import ROOT

    name = "process-gpu.json" if kind == "process" else f"{kind}-t4.json"
    template = json.loads((ROOT / "deployments" / "work-pools" / name).read_text())
    variables = template["variables"]["properties"]
    assert variables["gpu_count"]["default"] == 1
    values = {n: spec.get("default") for n, spec in variables.items()} | {"gpu_count": 4}
    job = apply_values(template["job_configuration"], values)
    if kind == "kubernetes":
        container = job["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    elif kind == "docker":
        assert job["container_create_kwargs"]["device_requests"][0]["count"] == 4
    elif kind == "vertex-ai":
        spec = job["job_spec"]["worker_pool_specs"][0]["machine_spec"]
        assert spec["accelerator_count"] == 4
    else:
        assert job["env"]["FINANCE_QLORA_NUM_GPUS"] == 4
        assert "CUDA_VISIBLE_DEVICES" not in variables["env"]["default"]  # all of the host's


def test_out_of_memory_on_several_ranks_halves_the_micro_batches_not_the_steps(
    monkeypatch, tmp_path
):
    """The back-off halves each rank's micro-batches; a step keeps its rows (rows_per_step), and
    every try writes the compiled layers where asked."""
    tried = []

    def out_of_memory_above_one_row(*args, save_compiled=None):
        prompts, model, lora, train, out, processes, token, on_log = args
        tried.append((train.rows_per_step, train.batch_size, processes, save_compiled))
        if train.batch_size > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return "the record"

    monkeypatch.setattr(training, "train_data_parallel", out_of_memory_above_one_row)
    config = resolve_config("tiny-cpu", {"train": {"batch_size": 6, "rows_per_step": 12}})
    args = (tmp_path / "train.jsonl", config.model, config.lora, config.train, tmp_path)
    kept = tmp_path / "kept.bin"
    assert train_adapter(*args, processes=3, save_compiled=kept) == "the record"
    assert tried == [(12, 6, 3, kept), (12, 3, 3, kept), (12, 1, 3, kept)]


def test_the_flow_resolves_auto_for_training_and_evaluation_separately(monkeypatch, caplog):
    import logging

    import flows.finetune as finetune

    monkeypatch.setattr(finetune, "visible_gpu_count", lambda: 2)
    monkeypatch.setattr(finetune, "get_run_logger", lambda: logging.getLogger("flow"))
    caplog.set_level(logging.INFO, "flow")
    config = resolve_config(
        "llama2-7b-h100",
        {"data": {"train_size": 1200}, "train": {"epochs": 9, "rows_per_step": 128}},
    )
    train_gpus, eval_gpus = finetune.devices_for(config)
    assert (train_gpus.num_gpus, eval_gpus.num_gpus) == (2, 1)
    assert "devices for training: auto: all 2 GPUs (10800 row-epochs)" in caplog.text
    assert "devices for evaluation: auto: one GPU of 2 (300 prompts" in caplog.text
    train_gpus, eval_gpus = finetune.devices_for(resolve_config("llama2-7b-h100"))
    assert (train_gpus.num_gpus, eval_gpus.num_gpus) == (1, 1)


@pytest.mark.slow
def test_the_flow_hands_each_step_the_gpus_chosen_for_it(prefect_api, tmp_path, monkeypatch):
    """devices_for's training choice reaches the train step, its evaluation choice every
    evaluation: pretrained, fine-tuned and the gate's re-score of the champion."""
    import flows.finetune as finetune
    import tasks.evaluate
    import tasks.train
    from tests.test_flow import run_flow

    train_gpus, eval_gpus = DeviceSettings(num_gpus=None), DeviceSettings(num_gpus="auto")
    monkeypatch.setattr(finetune, "devices_for", lambda config: (train_gpus, eval_gpus))
    seen: dict[str, list] = {"train": [], "evaluate": []}
    for step, module in (("train", tasks.train), ("evaluate", tasks.evaluate)):
        count = module.process_count
        monkeypatch.setattr(
            module,
            "process_count",
            lambda devices, step=step, count=count: seen[step].append(devices) or count(devices),
        )
    run_flow(tmp_path)  # the champion
    state, result = run_flow(tmp_path, data={"seed": 7})  # re-scores it on a new split
    assert state.is_completed() and result["rouge"]["champion"] is not None
    assert seen["train"] == [train_gpus, train_gpus]
    assert seen["evaluate"] == [eval_gpus] * 5  # 2 + 3 (the champion's re-score)
