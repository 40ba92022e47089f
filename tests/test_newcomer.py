"""Issue 24, "no surprises for a newcomer": long and odd data, the first second of a command,
signals and the quick start's output. The CLI's one-line refusals are cases of
tests/test_bad_inputs.py; what needs more than one line to show lives here."""

from __future__ import annotations

import random
import re
from collections.abc import Callable

import pytest

from finance_qlora.files import read_jsonl
from finance_qlora.presets import resolve_config
from finance_qlora.prompts import fit_rows, shortest_row, to_prompt_completion
from tests.conftest import SHARED_DATA, make_rows

_OLD_BREAK = re.compile(r"(?<=[.!?])\s+|\n+")


def _old_fit_rows(rows, length, max_length):
    """fit_rows as it was before issue 24 (every sentence prefix tried, longest first): the
    reference the linear-time version must agree with."""

    def prefixes(text):
        cuts = {text[: m.start()].rstrip() for m in _OLD_BREAK.finditer(text.rstrip())}
        return sorted((c for c in cuts if c), key=len, reverse=True)

    kept, trimmed, dropped = [], 0, 0
    for row in rows:
        p, c = row["prompt"], row["completion"]
        fit = c if length(p, c) <= max_length else None
        if fit is None:
            fit = next((x for x in prefixes(c) if length(p, x) <= max_length), None)
        if fit is None:
            dropped += 1
            continue
        trimmed += fit != c
        kept.append({"prompt": p, "completion": fit})
    return kept, trimmed, dropped


@pytest.fixture(scope="module")
def tiny_length() -> Callable[[str, str], int]:
    from finance_qlora.modeling import load_tokenizer
    from finance_qlora.training import row_length

    return row_length(load_tokenizer(resolve_config("tiny-cpu").model))


def _odd_answers(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Answers with every kind of break: spaces before line breaks, runs of blank lines,
    '?!' inside sentences, leading spaces, a trailing break."""
    rng, pieces = random.Random(seed), ["Bonds pay.", "Yields move!", "Why?", " x", "\n", "\n\n"]
    pieces += ["  ", " \n ", "A long clause without an end", "e.g. this.", "3.5% a year."]
    rows = []
    for i in range(n):
        answer = " ".join(rng.choice(pieces) for _ in range(rng.randint(1, 40))).strip() or "A."
        rows.append({"prompt": f"Question {i}?\n", "completion": answer})
    return rows


def test_answers_are_cut_exactly_as_before_on_normal_rows(tiny_length):
    """The bisection finds the same cut as trying every prefix, on hand-made odd answers and,
    where present, on real Finance-Alpaca rows, at several limits."""
    rows = _odd_answers(150) + [to_prompt_completion(r) for r in make_rows(20)]
    if SHARED_DATA.is_file():
        rows += [to_prompt_completion(r) for r in read_jsonl(SHARED_DATA)[:300]]
    for limit in (40, 64, 100, 160, 256):
        assert fit_rows(rows, tiny_length, limit) == _old_fit_rows(rows, tiny_length, limit)


def _long_rows(n: int, chars: int = 100_000) -> list[dict[str, str]]:
    sentence = "The bond's coupon is paid twice a year at a fixed rate. "
    answer = (sentence * (chars // len(sentence) + 1))[:chars].strip()
    return [
        {"instruction": f"Explain coupon {i}.", "input": "", "output": answer} for i in range(n)
    ]


def test_100000_character_answers_take_a_few_tokenizer_calls_each(tiny_length):
    """Ten answers of about 1,800 sentences each: cutting one takes a bisection's calls (about
    twice log2 of its sentences), not one call per sentence."""
    pairs = [to_prompt_completion(r) for r in _long_rows(10)]
    calls, bound = [], 10 * 14  # 1 whole + at most ceil(log2(1,800)) + 1 prefixes a row

    def counted(prompt: str, completion: str) -> int:
        calls.append(len(completion))
        assert len(calls) <= bound, "one tokenizer call per sentence: quadratic again"
        return tiny_length(prompt, completion)

    kept, trimmed, dropped = fit_rows(pairs, counted, 256)
    assert (len(kept), trimmed, dropped) == (10, 10, 0)
    assert all(tiny_length(r["prompt"], r["completion"]) <= 256 for r in kept)
    calls.clear()
    assert shortest_row(pairs, counted) < 256 and len(calls) == 10


def test_preflight_tells_whether_a_long_row_fits_with_one_call_a_row(monkeypatch, tmp_path):
    """Preflight on the 100,000-character rows (the CLI and the flow each run it): one
    tokenization a row, of its prompt and first sentence."""
    import json

    import finance_qlora.preflight as preflight
    import finance_qlora.training

    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _long_rows(10)))
    config = resolve_config(
        "tiny-cpu",
        {"data": {"dataset": str(data), "train_size": 8, "test_size": 2}},
    )
    real, calls = finance_qlora.training.row_length, []

    def counting(tokenizer):
        length = real(tokenizer)

        def counted(prompt: str, completion: str) -> int:
            calls.append(len(completion))
            assert len(calls) <= len(train_rows), "more than one tokenization a row"
            return length(prompt, completion)

        return counted

    monkeypatch.setattr(preflight, "row_length", counting)
    train_rows, _ = preflight.check_data(config, None, {})
    preflight.check_sequence_length(config, train_rows, None)
    assert 1 <= len(calls) <= len(train_rows) and max(calls) < 100


def test_a_json_object_holding_one_list_of_rows_is_read_as_those_rows(write_rows):
    """{"data": [...]}, indented, as many exports write it (it read as "malformed json
    (line 1)"); a single object is one row; JSON Lines in a .json file still read."""
    from finance_qlora.data import read_rows

    rows = make_rows(5)
    assert read_rows(str(write_rows({"data": rows}, "rows.json"))) == rows
    assert read_rows(str(write_rows(rows[0], "one.json"))) == rows[:1]
    lines = write_rows(rows, "lines.jsonl")
    assert read_rows(str(lines.rename(lines.with_suffix(".json")))) == rows


def test_test_prompts_past_the_context_are_left_out_and_counted(tmp_path, caplog):
    """A 20,000-character test prompt (far past the tiny model's 512 tokens) is not generated
    and scored: evaluation leaves it out with a warning that counts it, as training does with
    rows that cannot fit."""
    import json

    from finance_qlora.evaluation import evaluate_model
    from finance_qlora.prompts import build_prompt

    config = resolve_config("tiny-cpu")
    rows = [to_prompt_completion(r) for r in make_rows(3)]
    rows.insert(1, {"prompt": build_prompt("Summarize. " * 2000), "completion": "Short."})
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level("WARNING", logger="finance_qlora.evaluation"):
        record = evaluate_model(path, config.model, config.generation, tmp_path / "eval", "t")
    assert record.rows == 3
    assert "1 of 4 test prompts take more than 488 tokens" in caplog.text
    import pandas as pd

    scored = pd.read_parquet(record.path / "predictions.parquet")
    assert list(scored["prompt"]) == [rows[0]["prompt"], *(r["prompt"] for r in rows[2:])]


_FIRST_SECOND = """
import json, runpy, sys
sys.argv = ["finetune", *json.loads(sys.argv[1])]
try:
    runpy.run_module("flows.finetune", run_name="__main__")
except SystemExit as exc:
    code = exc.code
heavy = [m for m in ("torch", "transformers", "prefect", "datasets") if m in sys.modules]
print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
"""


@pytest.mark.parametrize(
    "args, code",
    [
        (["--help"], 0),
        (["--preset", "tiny-cpu", "--show-config"], 0),
        (["--preset", "tiny-cpu", "--set", "train.learning_rate=-1"], 2),
        (["--preset", "tiny-cpu", "--set", "train.lr_scheduler=bogus"], 2),
        (["--preset", "gpt-5"], 2),
    ],
)
def test_the_first_second_imports_no_torch_transformers_or_prefect(args, code):
    """`python -m flows.finetune` answers --help, --show-config and a config error from the
    arguments alone: none of the libraries that take seconds to import is loaded."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run(
        [sys.executable, "-c", _FIRST_SECOND, json.dumps(args)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )
    result = json.loads(done.stderr.strip().splitlines()[-1])
    assert result == {"code": code, "heavy": []}, done.stderr
    if code == 2:
        assert done.stderr.startswith("error: ") and len(done.stderr.splitlines()) == 2


def test_the_written_out_scheduler_and_optimizer_names_are_transformers_own():
    """The config checks names without importing transformers: the lists must be its own."""
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    from finance_qlora.config import OPTIMIZERS, SCHEDULERS

    assert SCHEDULERS == tuple(s.value for s in SchedulerType)
    assert OPTIMIZERS == tuple(o.value for o in OptimizerNames)


def _children(pid: int) -> dict[int, str]:
    """The processes whose parent is `pid`, with their command lines (Linux /proc)."""
    from pathlib import Path

    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ")
                found[int(stat.parent.name)] = cmdline.decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
    return found


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for a reaper that this container may not have."""
    from pathlib import Path

    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _tiny_run(tmp_path):
    import os

    from tests.test_cli import Run

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")  # its own temporary server and database
    args = ["--preset", "tiny-cpu", "--output-dir", str(tmp_path / "runs")]
    args += ["--set", "train.epochs=200", "--set", "train.checkpoint_steps=3"]
    return env, args, Run(env, *args)


@pytest.mark.slow
@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self"), reason="reads /proc")
def test_kill_9_leaves_no_prefect_server_behind(tmp_path):
    """kill -9 of the command while it trains: Prefect's temporary server, its child, stops
    within seconds instead of living on as an orphan (about 200 MB each)."""
    import os
    import signal
    import time

    _, _, run = _tiny_run(tmp_path)
    try:
        run.first_step()
        servers = [p for p, cmd in _children(run.process.pid).items() if "uvicorn" in cmd]
        assert len(servers) == 1, _children(run.process.pid)
        os.kill(run.process.pid, signal.SIGKILL)
        run.process.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _alive(servers[0]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(servers[0]), "the temporary server outlived its command"
    finally:
        try:
            os.killpg(run.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_sigterm_stops_a_run_like_ctrl_c(tmp_path):
    """SIGTERM to the command alone (as `timeout` sends it) while training: exit 143 within
    seconds with the one interrupted line, the flow run recorded as Crashed, and the same
    command resumes from the last checkpoint."""
    import os
    import signal
    import subprocess
    import time

    from flows.local_server import INTERRUPTED
    from tests.test_cli import flow_run_states

    env, args, run = _tiny_run(tmp_path)
    assert run.first_step() == 1
    while not any(" - step 5/" in line for line in list(run.lines)):  # a checkpoint at 3
        assert run.process.poll() is None, "\n".join(run.lines[-40:])
        time.sleep(0.2)
    os.kill(run.process.pid, signal.SIGTERM)
    try:
        assert run.process.wait(timeout=20) == 143
    except subprocess.TimeoutExpired:
        os.killpg(run.process.pid, signal.SIGKILL)
        pytest.fail("still running 20 s after SIGTERM:\n" + "\n".join(run.lines[-40:]))
    time.sleep(0.5)  # the reader thread takes the last lines
    assert run.lines.count(INTERRUPTED) == 1, "\n".join(run.lines[-40:])
    assert not [line for line in run.lines if "Traceback" in line], "\n".join(run.lines)
    assert flow_run_states(env) == ["CRASHED"]
    _, _, again = _tiny_run(tmp_path)
    first = again.first_step()
    assert first > 1 and (first - 1) % 3 == 0  # resumed from a checkpoint (every 3 steps)
    assert again.ctrl_c() == 130


def test_temporary_servers_start_one_at_a_time_per_prefect_home(monkeypatch, tmp_path):
    """Two first runs on a fresh PREFECT_HOME: the database is created by one server start at
    a time (the second crashed in Prefect's migration); here a server start sees the lock
    held, so another run's start would wait."""
    import fcntl
    from types import SimpleNamespace

    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    import flows.local_server

    seen = []

    def start(self, timeout=None):
        with open(tmp_path / "home" / "finance-qlora-server.lock") as other:
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen.append("free")
            except BlockingIOError:
                seen.append("held")
        self.server_process = SimpleNamespace(pid=0)  # for the watchdog, not started here

    monkeypatch.setattr(SubprocessASGIServer, "start", start)
    monkeypatch.setattr(flows.local_server, "watch_server", lambda pid: None)
    # the instance Prefect's client uses: an earlier test's run may have started it already
    monkeypatch.setattr(SubprocessASGIServer(), "running", False)
    try:
        with temporary_settings({PREFECT_HOME: tmp_path / "home", PREFECT_API_URL: None}):
            flows.local_server.start_local_api()
    finally:
        SubprocessASGIServer().server_process = None
    assert seen == ["held"]


def test_the_run_ends_with_promoted_or_kept_in_words_and_the_tiny_note():
    """The last lines a newcomer reads: promoted or kept, with the reason; for tiny-cpu, that
    its random weights prove only that every step ran (it said "champion: ... (no champion
    yet; ... (pretrained not required))" after promoting)."""
    from finance_qlora.cli import outcome

    summary = {
        "data_version": "sha256:abc",
        "adapter": "runs/adapters/new",
        "champion": "runs/adapters/new",
        "promoted": True,
        "decision": {"reason": "no champion yet; rougeL 0.0000"},
    }
    first = outcome(summary, "tiny-cpu")
    assert first[:3] == [
        "data: sha256:abc",
        "adapter: runs/adapters/new",
        "promoted: this adapter is the new champion (no champion yet; rougeL 0.0000)",
    ]
    assert first[3].startswith("note: tiny-cpu's model has random weights")
    kept = summary | {"champion": "runs/adapters/old", "promoted": False}
    kept["decision"] = {"reason": "rougeL 0.1 does not beat the champion's 0.2"}
    assert outcome(kept, "llama2-7b-t4") == [
        "data: sha256:abc",
        "adapter: runs/adapters/new",
        "kept: the champion stays runs/adapters/old (rougeL 0.1 does not beat the champion's 0.2)",
    ]
