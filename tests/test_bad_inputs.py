"""Every bad input in the README's table: exit code 2 and one `error:` line naming the field or
file, before any model is loaded. Each case here is one row of that table."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from flows.finetune import main
from tests.conftest import make_rows

TINY = ["--preset", "tiny-cpu"]


def _jsonl(tmp: Path, rows, name: str = "rows.jsonl") -> str:
    path = tmp / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _unwritable(tmp: Path) -> str:
    if os.geteuid() == 0:  # permissions do not bind root; sysfs refuses even root
        return "/sys/finance-qlora/runs"
    locked = tmp / "locked"
    locked.mkdir(mode=0o555)
    return str(locked / "runs")


def _file_parent(tmp: Path) -> str:
    (tmp / "a-file").write_text("x")
    return str(tmp / "a-file" / "runs")


# (case, arguments built from tmp_path, expected fragment of the one error line)
CASES = [
    (
        "unknown preset",
        lambda t: ["--preset", "gpt-5"],
        "preset: unknown preset 'gpt-5'; choose one of llama2-7b-t4, llama2-7b-h100, tiny-cpu, "
        "smollm2-135m",
    ),
    (
        "data file missing",
        lambda t: [*TINY, "--data", str(t / "nope.jsonl")],
        "nope.jsonl does not exist; pass an existing JSON/JSONL/CSV/Parquet file, a URL on your "
        "store or a hub id",
    ),
    (
        "unsupported file type",
        lambda t: [*TINY, "--data", _txt(t)],
        "unsupported type '.txt'; use .json, .jsonl, .csv or .parquet",
    ),
    (
        "malformed JSONL line",
        lambda t: [*TINY, "--data", _jsonl(t, [*make_rows(30), '{"instruction": "Q", "inp'])],
        "malformed jsonl (line 31: Unterminated string",
    ),
    (
        "bytes that are not UTF-8 in a JSONL file",
        lambda t: [*TINY, "--data", _latin1(t, "rows.jsonl")],
        "rows.jsonl: not UTF-8 (line 2, byte offset ",
    ),
    (
        "bytes that are not UTF-8 in a CSV file",
        lambda t: [*TINY, "--data", _latin1(t, "rows.csv")],
        "rows.csv: not UTF-8 (line 3, byte offset ",
    ),
    (
        "a JSON object with two lists",
        lambda t: [*TINY, "--data", _json(t, {"train": make_rows(30), "test": make_rows(9)})],
        "rows.json: a JSON object with 2 lists (train, test); keep the one list of rows",
    ),
    (
        "new tokens that leave no room for any test prompt",
        lambda t: [*TINY, "--set", "generation.max_new_tokens=511"],
        "generation.max_new_tokens: 511 new tokens leave no room for any test prompt in the "
        "context of builtin:tiny-llama (512 tokens; the shortest prompt takes ",
    ),
    (
        "a LoRA rank of a billion",
        lambda t: [*TINY, "--set", "lora.r=1000000000"],
        "lora.r: Input should be less than or equal to 1024 (got 1000000000)",
    ),
    (
        "a LoRA rank above the model's width",
        lambda t: [*TINY, "--set", "lora.r=128"],
        "lora.r: 128 exceeds the width of builtin:tiny-llama (64); a rank above it adds "
        "weights, not capacity: lower it to at most 64",
    ),
    (
        "a billion bootstrap resamples",
        lambda t: [*TINY, "--set", "bootstrap.resamples=1000000000"],
        "bootstrap.resamples: Input should be less than or equal to 100000 (got 1000000000)",
    ),
    (
        "a generation batch of a million prompts",
        lambda t: [*TINY, "--set", "generation.batch_size=1000000"],
        "generation.batch_size: Input should be less than or equal to 4096 (got 1000000)",
    ),
    (
        "preset given with --set",
        lambda t: [*TINY, "--set", "preset=llama2-7b-t4"],
        "preset: not a field to override; choose it with --preset (the flow's preset parameter)",
    ),
    (
        "an extra metric that cannot load",
        lambda t: [*TINY, "--set", 'evaluation.metrics=["rouge","no-such-metric-24"]'],
        "evaluation.metrics: cannot load 'no-such-metric-24' with evaluate.load (",
    ),
    (
        "a memory:// store",
        lambda t: [*TINY, "--output-dir", "memory://runs"],
        "output_dir: memory:// keeps nothing once this process ends; give a folder or a URL such "
        "as s3://bucket/runs (got 'memory://runs')",
    ),
    (
        "an empty data set name",
        lambda t: [*TINY, "--set", "data.dataset="],
        "data.dataset: empty; name a data file, a URL on your store or a hub id (got '')",
    ),
    (
        "an empty model name",
        lambda t: [*TINY, "--set", "model.name="],
        "model.name: empty; name a model folder, a hub id or builtin:tiny-llama (got '')",
    ),
    (
        "all-linear with other LoRA targets",
        lambda t: [*TINY, "--set", 'lora.target_modules=["all-linear","q_proj"]'],
        'lora.target_modules: all-linear already names every linear layer; pass ["all-linear"] '
        "alone, or module names without it",
    ),
    (
        "missing column",
        lambda t: [*TINY, "--data", _jsonl(t, [{"instruction": "Q", "input": ""}] * 3)],
        "missing column(s) output; Finance-Alpaca rows need instruction, input, output",
    ),
    (
        "empty output",
        lambda t: [
            *TINY,
            "--data",
            _jsonl(t, [*make_rows(40), {"instruction": "Q", "input": "", "output": " "}]),
        ],
        "row 41 has an empty 'output'; remove or fill that row",
    ),
    (
        "non-string field",
        lambda t: [*TINY, "--data", _jsonl(t, [{"instruction": "Q", "input": "", "output": 42}])],
        "row 1 field 'output' is int, not text; fix that row",
    ),
    (
        "duplicate rows across the split",
        lambda t: [
            *TINY,
            "--data",
            _jsonl(t, make_rows(20) * 2),
            "--set",
            "data.train_size=24",
            "--set",
            "data.test_size=8",
        ],
        "data.train_size + data.test_size = 32 exceeds the 20 distinct rows available",
    ),
    (
        "sample larger than the data",
        lambda t: [*TINY, "--set", "data.train_size=5000"],
        "data.train_size + data.test_size = 5008 exceeds the 40 distinct rows available",
    ),
    (
        "test size of 0",
        lambda t: [*TINY, "--set", "data.test_size=0"],
        "data.test_size: Input should be greater than 0 (got 0)",
    ),
    (
        "negative learning rate",
        lambda t: [*TINY, "--set", "train.learning_rate=-0.0002"],
        "train.learning_rate: Input should be greater than 0 (got -0.0002)",
    ),
    (
        "unknown field",
        lambda t: [*TINY, "--set", "train.epoch=2"],
        "train.epoch: Extra inputs are not permitted",
    ),
    (
        "--set without a value",
        lambda t: [*TINY, "--set", "train.epochs"],
        "--set 'train.epochs': expected section.field=value",
    ),
    (
        "output folder parent without write permission",
        lambda t: [*TINY, "--output-dir", _unwritable(t)],
        "output_dir: cannot write to",
    ),
    (
        "output folder under a file",
        lambda t: [*TINY, "--output-dir", _file_parent(t)],
        "output_dir: cannot write to",
    ),
    (
        "LoRA target not in the model",
        lambda t: [*TINY, "--set", 'lora.target_modules=["query_key_value"]'],
        "lora.target_modules: query_key_value not in builtin:tiny-llama",
    ),
    (
        "LoRA on the output head",
        lambda t: [*TINY, "--set", 'lora.target_modules=["lm_head"]'],
        "lora.target_modules: lm_head is the output head of builtin:tiny-llama, not a LoRA target "
        "here",
    ),
    (
        "negative data seed",
        lambda t: [*TINY, "--set", "data.seed=-1"],
        "data.seed: Input should be greater than or equal to 0 (got -1)",
    ),
    (
        "negative training seed",
        lambda t: [*TINY, "--set", "train.seed=-1"],
        "train.seed: Input should be greater than or equal to 0 (got -1)",
    ),
    (
        "negative bootstrap seed",
        lambda t: [*TINY, "--set", "bootstrap.seed=-1"],
        "bootstrap.seed: Input should be greater than or equal to 0 (got -1)",
    ),
    (
        "infinite epochs",
        lambda t: [*TINY, "--set", "train.epochs=1e309"],
        "train.epochs: Input should be a finite number (got inf)",
    ),
    (
        "too many epochs",
        lambda t: [*TINY, "--set", "train.epochs=5000"],
        "train.epochs: Input should be less than or equal to 1000 (got 5000)",
    ),
    (
        "unknown scheduler",
        lambda t: [*TINY, "--set", "train.lr_scheduler=bogus"],
        "train.lr_scheduler: not a transformers scheduler; choose one of linear, cosine, "
        "cosine_with_restarts",
    ),
    (
        "unknown optimizer",
        lambda t: [*TINY, "--set", "train.optimizer=bogus"],
        "train.optimizer: not a transformers optimizer; choose e.g. adamw_torch, "
        "adamw_torch_fused, paged_adamw_8bit, adafactor or sgd (transformers' OptimizerNames) "
        "(got 'bogus')",
    ),
    (
        "sequence length too short for any row",
        lambda t: [*TINY, "--set", "train.max_seq_length=1"],
        "train.max_seq_length: 1 tokens is too short for any training row (the shortest, a "
        "prompt with the first sentence of its answer and EOS, takes ",
    ),
    (
        "sequence length beyond the model's context",
        lambda t: [*TINY, "--set", "train.max_seq_length=100000"],
        "train.max_seq_length: 100000 exceeds the context of builtin:tiny-llama (512 tokens); "
        "lower it to at most 512",
    ),
    (
        "new tokens beyond the model's context",
        lambda t: [*TINY, "--set", "generation.max_new_tokens=1000000000"],
        "generation.max_new_tokens: 1000000000 does not fit the context of builtin:tiny-llama "
        "(512 tokens, the prompt included); lower it below 512",
    ),
    (
        "model folder that is not a model",
        lambda t: [*TINY, "--set", f"model.name={_not_a_model(t)}"],
        "is a folder without config.json, not a model; pass a folder written by save_pretrained, "
        "a hub id or builtin:tiny-llama",
    ),
    (
        "model path that is neither a folder nor a hub id",
        lambda t: [*TINY, "--set", f"model.name={t / 'no' / 'such' / 'model'}"],
        "is neither a folder here nor a hub id (owner/name); check the path",
    ),
    (
        "GPUs asked for on a machine without CUDA",
        lambda t: [*TINY, "--set", "devices.num_gpus=2"],
        "devices.num_gpus: 2 GPUs asked for, but this machine has no CUDA GPU; unset it "
        "(devices.cpu_processes runs several processes on the CPU)",
    ),
    (
        "fused kernels on a machine without CUDA",
        lambda t: [*TINY, "--set", "train.fused_kernels=true"],
        "train.fused_kernels: this machine has no CUDA GPU; set train.fused_kernels=false to "
        "train without them",
    ),
    (
        "Liger's kernels asked of the preset that compiles its layers",
        lambda t: ["--preset", "llama2-7b-h100", "--set", "train.fused_kernels=true"],
        "train: compile and fused_kernels exclude each other (Liger's kernels do not compile); "
        "set train.compile=false to use Liger's kernels, or train.fused_kernels=false to keep "
        "the compiled layers",
    ),
]


def _latin1(tmp: Path, name: str) -> str:
    """Rows with a Latin-1 'é' in the second row (line 3 of a CSV, under its header)."""
    rows = make_rows(40)
    rows[1]["output"] = "Caf\u00e9 revenue rose."
    if name.endswith(".csv"):
        import pandas as pd

        text = pd.DataFrame(rows).to_csv(index=False)
    else:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (tmp / name).write_bytes(text.encode("latin-1"))
    return str(tmp / name)


def _json(tmp: Path, value) -> str:
    (tmp / "rows.json").write_text(json.dumps(value, indent=2))
    return str(tmp / "rows.json")


def _not_a_model(tmp: Path) -> str:
    (tmp / "not-a-model").mkdir()
    (tmp / "not-a-model" / "notes.txt").write_text("x")
    return str(tmp / "not-a-model")


def _txt(tmp: Path) -> str:
    (tmp / "rows.txt").write_text("instruction,input,output\n")
    return str(tmp / "rows.txt")


@pytest.fixture(autouse=True)
def no_model_is_loaded(monkeypatch):
    """Every bad input is told before any model's weights are loaded, and before the flow (and
    Prefect's temporary server) starts: an input let through fails here at once."""
    from prefect.server.api.server import SubprocessASGIServer
    from transformers import AutoModelForCausalLM

    import flows.finetune

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was told")

    def no_flow(*args, **kwargs):
        raise AssertionError("the flow started: the bad input was not told")

    def no_server(*args, **kwargs):
        raise AssertionError("Prefect's temporary server started for a bad input")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(flows.finetune, "finetune", no_flow)
    monkeypatch.setattr(SubprocessASGIServer, "start", no_server)
    monkeypatch.setattr(flows.finetune, "start_local_api", lambda: None)  # before a token look-up


@pytest.mark.parametrize("case, make_args, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_clear_line(capsys, tmp_path, case, make_args, expected):
    code = main(make_args(tmp_path))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert expected in err[0], err[0]


def test_4bit_without_bitsandbytes(capsys, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "bitsandbytes" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert main(TINY) == 2
    assert capsys.readouterr().err.strip() == (
        "error: model.load_in_4bit: bitsandbytes is not installed on this machine; "
        "pip install bitsandbytes, or set model.load_in_4bit=false"
    )


def test_gated_model_without_token(capsys, monkeypatch, tmp_path):
    """The hub's answer is simulated (no network here); the check and its message are real."""
    import httpx2
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(name, **kwargs):
        url = f"https://huggingface.co/api/models/{name}"
        response = httpx2.Response(403, request=httpx2.Request("GET", url))
        raise GatedRepoError(f"Access to model {name} is restricted.", response=response)

    from prefect.blocks.system import Secret

    def no_block(name, **kwargs):
        raise ValueError(f"Unable to find block document named {name}")

    monkeypatch.setattr(Secret, "load", no_block)  # no Secret block saved, no HF_TOKEN set
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "model_info", gated)
    data = _jsonl(tmp_path, make_rows(40))
    assert (
        main(
            [
                "--preset",
                "llama2-7b-t4",
                "--data",
                data,
                "--set",
                "data.train_size=20",
                "--set",
                "data.test_size=5",
                "--output-dir",
                str(tmp_path / "runs"),
            ]
        )
        == 2
    )
    assert capsys.readouterr().err.strip() == (
        "error: model.name: meta-llama/Llama-2-7b-hf is gated and no token was given; accept "
        "its licence on the Hub, then save a token in the Prefect Secret block 'hf-token' or "
        "set HF_TOKEN"
    )


def test_offline_hub_model_not_in_the_local_cache(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = [*TINY, "--set", "model.name=finance-qlora-tests/no-such-model"]
    assert main([*args, "--output-dir", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: model.name: finance-qlora-tests/no-such-model is not in the local Hugging Face "
        "cache and the Hub is offline (HF_HUB_OFFLINE); unset HF_HUB_OFFLINE to download it, or "
        "pass a local model folder"
    )
