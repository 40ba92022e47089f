"""`python -m flows.finetune`: the entry point itself (bad inputs: test_bad_inputs.py)."""

import subprocess
import sys
from pathlib import Path

import pytest

from flows.finetune import main

ROOT = Path(__file__).resolve().parents[1]


def test_show_config_applies_overrides(capsys, tmp_path):
    assert (
        main(
            [
                "--preset",
                "tiny-cpu",
                "--output-dir",
                str(tmp_path),
                "--set",
                "lora.r=8",
                "--show-config",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert '"r": 8' in out and str(tmp_path) in out


def test_real_process_exit_code_and_no_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.finetune",
            "--preset",
            "tiny-cpu",
            "--data",
            str(tmp_path / "missing.csv"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: data file {tmp_path / 'missing.csv'} does not exist; "
        "pass an existing JSON/JSONL/CSV/Parquet file, a URL on your store or a hub id"
    ]


@pytest.mark.slow
def test_a_run_prints_the_table_once_and_no_trainer_log_dicts(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "flows.finetune", "--preset", "tiny-cpu"]
        + ["--output-dir", str(tmp_path), "--set", "train.logging_steps=1000"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("## Pretrained vs fine-tuned ROUGE")
    assert (result.stdout + result.stderr).count("## Pretrained vs fine-tuned ROUGE") == 1
    assert "'loss'" not in result.stdout + result.stderr
    assert "trained 14 steps in " in result.stderr  # with the one loss logged, first and last
