"""The answer flow on a finished run's test questions: are its answers the final evaluation's?

    python -m flows.finetune --preset smollm2-135m --data <rows> --output-dir STORE   # first
    python experiments/answer_smollm2.py --store STORE

Takes the store's run summary (the newest, or --run <flow run id>), its adapter, the final
evaluation (the `eval/<key>` folder whose scores are the run's fine-tuned ROUGE) and the test
split behind its prompts (`data/<key>/test.jsonl`, checked prompt by prompt); runs the answer
flow on that split with that adapter and compares every answer with the evaluation's
prediction. Writes experiments/results/answer-smollm2-<gpu>.json (machine, date, command,
seconds, n identical); exits 1 when any answer differs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from finance_qlora.files import read_jsonl  # noqa: E402
from finance_qlora.prompts import build_prompt  # noqa: E402
from flows.answer import answer_flow  # noqa: E402
from flows.local_server import start_local_api  # noqa: E402

RESULTS = ROOT / "experiments" / "results"


def run_summary(store: Path, run: str | None) -> dict:
    summaries = sorted((store / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime)
    if run:
        summaries = [p for p in summaries if p.stem == run]
    if not summaries:
        sys.exit(f"error: no run summary in {store}/runs{f' for {run}' if run else ''}")
    return json.loads(summaries[-1].read_text())


def final_evaluation(summary: dict) -> pd.DataFrame:
    """The run's fine-tuned answers, from its comparison report (by label, not by scores: two
    evaluations can score the same), as prompt, prediction, raw_prediction, new_tokens."""
    report = Path(summary["report"]).parent
    examples = pd.read_parquet(report / "examples.parquet")
    columns = {f"finetuned_{c}": c for c in ("prediction", "raw_prediction", "new_tokens")}
    table = examples[["prompt", *columns]].rename(columns=columns)
    table.attrs["source"] = str(report)
    return table


def test_split(store: Path, prompts: list[str]) -> Path:
    """The test rows whose prompts are exactly the evaluation's, in order."""
    for split in sorted(store.glob("data/*/test.jsonl")):
        rows = read_jsonl(split)
        if [build_prompt(r["instruction"], r.get("input") or "") for r in rows] == prompts:
            return split
    sys.exit(f"error: no test split in {store}/data gives the evaluation's prompts")


def machine() -> tuple[str, str]:
    """A description and a file-name slug."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-").removeprefix("nvidia-")
        return f"{name} x{torch.cuda.device_count()}, {platform.node()}", slug
    return f"CPU ({os.cpu_count()} cores), {platform.node()}", "cpu"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", required=True, type=Path, help="the finetune run's store")
    parser.add_argument("--run", help="the flow run id of the run (default: the newest)")
    parser.add_argument("--out", type=Path, help="default results/answer-smollm2-<gpu>.json")
    args = parser.parse_args(argv)
    store = args.store.resolve()
    summary = run_summary(store, args.run)
    predictions = final_evaluation(summary)
    evaluation = predictions.attrs["source"]
    questions = test_split(store, predictions["prompt"].tolist())
    start_local_api()
    started = time.perf_counter()
    result = answer_flow(
        questions=str(questions), adapter=summary["adapter"], output_dir=str(store)
    )
    seconds = time.perf_counter() - started
    answers = read_jsonl(Path(result["answers"]) / "answers.jsonl")
    if len(answers) != len(predictions):
        sys.exit(f"error: {len(answers)} answers for {len(predictions)} evaluated prompts")
    pairs = list(zip(answers, predictions.to_dict(orient="records"), strict=True))
    identical = sum(a["answer"] == p["prediction"] for a, p in pairs)
    raw = sum(a["raw_answer"] == p["raw_prediction"] for a, p in pairs)
    described, slug = machine()
    report = {
        "machine": described,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]) if argv is None else f"main({argv})",
        "answer_command": f"python -m flows.answer --questions {questions} "
        f"--adapter {summary['adapter']} --output-dir {store}",
        "seconds": round(seconds, 2),
        "served_from_cache": result["cached"],
        "questions": len(answers),
        "n_identical": identical,
        "n_raw_identical": raw,
        # where they differ (row numbers), to look at the first differing token
        "differing": [i for i, (a, p) in enumerate(pairs) if a["answer"] != p["prediction"]],
        "flow_run": summary["flow_run"],
        "adapter": summary["adapter"],
        "final_evaluation": str(evaluation),
        "answers": result["answers"],
        "generation": result["generation"],
    }
    out = args.out or RESULTS / f"answer-smollm2-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{identical}/{len(answers)} answers identical ({raw} uncut) in {seconds:.1f} s: {out}")
    return 0 if identical == raw == len(answers) else 1


if __name__ == "__main__":
    sys.exit(main())
