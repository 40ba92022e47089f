"""`python -m flows.finetune`: the entry point itself (bad inputs: test_bad_inputs.py)."""

import json
import os
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
        env=dict(os.environ, FINANCE_QLORA_CACHE=str(tmp_path / "cache")),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("## Pretrained vs fine-tuned ROUGE")
    assert (result.stdout + result.stderr).count("## Pretrained vs fine-tuned ROUGE") == 1
    assert "'loss'" not in result.stdout + result.stderr
    # with the one loss logged, first and last; the schedule said
    assert "trained 14 steps of 4 rows (1 micro-batches each) in " in result.stderr
    assert "schedule: 4 rows an optimizer step, 7 steps an epoch of 28 rows" in result.stderr
    # library warnings and progress bars stay out of the console, in the log file
    assert "FutureWarning" not in result.stderr and "it/s]" not in result.stderr
    assert "examples/s]" not in result.stderr
    log = tmp_path / "cache" / "logs" / "finance-qlora.log"
    assert "FutureWarning" in log.read_text()


def flow_run_states(env: dict[str, str]) -> list[str]:
    """The state of every flow run the Prefect home in `env` holds, read in a fresh process."""
    states = subprocess.run(
        [sys.executable, "-c", _FLOW_RUN_STATES],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert states.returncode == 0, states.stderr
    return json.loads(states.stdout.strip().splitlines()[-1])


_FLOW_RUN_STATES = """
import json
from prefect import get_client
with get_client(sync_client=True) as client:
    print(json.dumps([run.state.type.value for run in client.read_flow_runs()]))
"""


class Run:
    """`python -m flows.finetune` in its own process group, as a terminal starts it; stderr is
    read as it comes."""

    def __init__(self, env: dict[str, str], *args: str):
        import threading

        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flows.finetune", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def first_step(self, timeout: float = 300) -> int:
        """The first training step logged."""
        import re
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            steps = [re.search(r" - step (\d+)/", line) for line in list(self.lines)]
            if any(steps):
                return int(next(s for s in steps if s).group(1))
            time.sleep(0.2)
        self.process.kill()
        pytest.fail("training did not start:\n" + "\n".join(self.lines[-40:]))

    def ctrl_c(self, within: float = 20) -> int:
        """SIGINT to the whole process group, like Ctrl-C in a terminal; the exit code."""
        import os
        import signal
        import time

        os.killpg(self.process.pid, signal.SIGINT)
        try:
            code = self.process.wait(timeout=within)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            pytest.fail(f"still running {within} s after Ctrl-C:\n" + "\n".join(self.lines[-40:]))
        time.sleep(0.5)  # the reader thread takes the last lines
        try:  # nothing of the group is left: Prefect's temporary server stopped too
            os.killpg(self.process.pid, 0)
            pytest.fail("a process of the run outlived it (Prefect's temporary server?)")
        except ProcessLookupError:
            pass
        return code


@pytest.mark.slow
def test_ctrl_c_stops_within_seconds_marks_the_run_and_a_rerun_resumes(tmp_path):
    """Ctrl-C while training: exit 130 within seconds with one line and no traceback, the flow
    run recorded as Crashed (not left Running) in Prefect, and the same command resumes."""
    import os
    import time

    from flows.local_server import INTERRUPTED

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")  # its own temporary server and database
    args = ["--preset", "tiny-cpu", "--output-dir", str(tmp_path / "runs")]
    args += ["--set", "train.epochs=200", "--set", "train.checkpoint_steps=3"]

    run = Run(env, *args)
    assert run.first_step() == 1
    while not any(" - step 5/" in line for line in list(run.lines)):  # a checkpoint at 3
        assert run.process.poll() is None, "\n".join(run.lines[-40:])
        time.sleep(0.2)
    assert run.ctrl_c() == 130
    assert run.lines.count(INTERRUPTED) == 1
    assert not [line for line in run.lines if "Traceback" in line], "\n".join(run.lines)

    assert flow_run_states(env) == ["CRASHED"]

    again = Run(env, *args)
    first = again.first_step()
    assert first > 1 and (first - 1) % 3 == 0  # resumed from a checkpoint (every 3 steps)
    cached = {line.split("'")[1] for line in again.lines if "Finished in state Cached" in line}
    assert {name.rsplit("-", 1)[0] for name in cached} >= {"load", "format", "evaluate"}
    assert again.ctrl_c() == 130
