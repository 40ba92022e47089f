"""The weekly retraining, three weeks on one durable store, through Prefect as users run it:
`prefect server start`, the `gpu-t4` pool from the process template, a worker, and
`prefect deployment run 'finance-qlora/smollm2-gpu'` on real Finance-Alpaca rows.

    python experiments/retraining_story.py --data ../shared/data/finance_alpaca_sample.jsonl \\
        --work /tmp/story --results experiments/results

Week 1 trains on the first 1,400 rows and promotes (if the adapter beats the pretrained model);
week 2 sees the same file and is served from the cache; week 3 sees all 1,500 rows (a new
version), retrains, re-scores the champion on the new test prompts and decides. Each week's
record (`<store>/runs/<flow run id>.json`, written by the flow) goes to
`retraining-story.json`; the server, worker and flow logs to `retraining-story.log`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEEKS = [("week 1", 1400), ("week 2", 1400), ("week 3", 1500)]  # rows in the data file


def prefect(env: dict, *args: str, log, check: bool = True) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "prefect", *args],
        cwd=ROOT,
        env=env,
        text=True,
        capture_output=True,
    )
    log.write(f"$ prefect {' '.join(args)}\n{result.stdout}{result.stderr}\n")
    log.flush()
    if check and result.returncode != 0:
        raise SystemExit(f"prefect {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def start(env: dict, log, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "prefect", *args],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    except ImportError:
        pass
    return f"{platform.processor() or platform.machine()} CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="Finance-Alpaca rows (JSONL)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/story"))
    parser.add_argument("--results", type=Path, default=ROOT / "experiments" / "results")
    parser.add_argument("--preset", default="smollm2-135m", help="tiny-cpu for a dry run")
    args = parser.parse_args(argv)
    rows = args.data.read_text().splitlines()
    args.work.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    store = args.work / "store"  # the "mounted volume": every week's runs share it
    data = store / "incoming" / "finance_alpaca.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PREFECT_HOME": str(args.work / "prefect-home"),
        "PREFECT_API_URL": "http://127.0.0.1:4200/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT": f"{sys.executable} -m prefect",
        "PYTHONUNBUFFERED": "1",
    }
    log = open(args.results / "retraining-story.log", "w")
    server = start(env, log, "server", "start", "--host", "127.0.0.1", "--port", "4200")
    weeks = []
    try:
        for _ in range(180):
            try:
                urllib.request.urlopen("http://127.0.0.1:4200/api/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        subprocess.run(
            ["bash", "deployments/create-pools.sh", "process"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            check=True,
        )
        prefect(env, "--no-prompt", "deploy", "-n", "smollm2-gpu", log=log)
        params = {
            "preset": args.preset,
            "overrides": {"output_dir": f"file://{store}", "data": {"dataset": str(data)}},
        }
        for name, count in WEEKS:
            data.write_text("\n".join(rows[:count]) + "\n")
            log.write(f"\n===== {name}: {count} rows =====\n")
            worker = start(env, log, "worker", "start", "--pool", "gpu-t4", "--limit", "1")
            started = time.monotonic()
            out = prefect(
                env,
                "deployment",
                "run",
                "finance-qlora/smollm2-gpu",
                "--params",
                json.dumps(params),
                "--watch",
                "--watch-timeout",
                "1800",
                log=log,
                check=False,
            )
            seconds = time.monotonic() - started
            worker.terminate()
            worker.wait(timeout=60)
            flow_run = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
            summary = json.loads((store / "runs" / f"{flow_run}.json").read_text())
            decision = summary["decision"]
            weeks.append(
                {
                    "week": name,
                    "rows": count,
                    "flow_run": flow_run,
                    "seconds": round(seconds, 1),
                    "data_version": summary["data_version"],
                    "cached_steps": summary["cached_steps"],
                    "promoted": summary["promoted"],
                    "champion": summary["champion"],
                    "reason": decision["reason"],
                    "rouge": {
                        "pretrained": summary["rouge"]["pretrained"],
                        "candidate": summary["rouge"]["finetuned"],
                        "champion": summary["rouge"]["champion"],
                    },
                }
            )
            print(json.dumps(weeks[-1], indent=1), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
    record = {
        "machine": machine(),
        "date": datetime.now(UTC).date().isoformat(),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "store": "file:// folder (a mounted volume), shared by the three weekly runs",
        "weeks": weeks,
    }
    (args.results / "retraining-story.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
