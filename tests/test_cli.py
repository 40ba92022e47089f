"""`python -m flows.finetune`: bad input exits non-zero with one `error:` line, no traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

from flows.finetune import main
from tests.conftest import make_rows

ROOT = Path(__file__).resolve().parents[1]


def run_main(capsys, *argv: str) -> tuple[int, list[str]]:
    code = main(list(argv))
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    "make_args, expected",
    [
        (lambda p: ["--preset", "gpt-5"], "preset: unknown preset 'gpt-5'"),
        (
            lambda p: ["--preset", "tiny-cpu", "--data", str(p / "nope.jsonl")],
            "nope.jsonl does not exist",
        ),
        (lambda p: ["--preset", "tiny-cpu", "--set", "data.test_size=0"], "data.test_size"),
        (
            lambda p: ["--preset", "tiny-cpu", "--set", "data.train_size=5000"],
            "data.train_size + data.test_size = 5008 exceeds the 40 distinct rows",
        ),
        (
            lambda p: ["--preset", "tiny-cpu", "--set", "train.learning_rate=-0.1"],
            "train.learning_rate: Input should be greater than 0",
        ),
        (
            lambda p: ["--preset", "tiny-cpu", "--set", "train.learning_rate"],
            "expected section.field=value",
        ),
    ],
)
def test_bad_arguments(capsys, tmp_path, make_args, expected):
    code, err = run_main(capsys, *make_args(tmp_path))
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


def test_missing_column_in_data_file(capsys, write_rows):
    rows = [{k: v for k, v in r.items() if k != "output"} for r in make_rows(10)]
    code, err = run_main(capsys, "--preset", "tiny-cpu", "--data", str(write_rows(rows)))
    assert code == 2
    assert err == [
        f"error: data {write_rows(rows)}: missing column(s) output; "
        "Finance-Alpaca rows need instruction, input, output"
    ]


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
        "pass an existing JSON/JSONL/CSV/Parquet file or a hub id"
    ]
