"""Choose a recipe on validation rows, then test it once: the recipe search as a Prefect flow.

    python -m flows.sweep --preset tiny-cpu --validation-size 6 \\
        --candidate '{"train": {"learning_rate": 1e-3}}' \\
        --candidate '{"train": {"learning_rate": 1e-2}}'

Each candidate (overrides of the preset) runs the finetune flow on rows carved from the
training split (`data.validation_size`, `data.evaluate_on: validation`), as a subflow, or with
`--deployment finance-qlora/smollm2-gpu` as deployment runs on the GPU pool, all submitted at
once so that several workers train candidates side by side. The best on validation
(`--metric`, default ROUGE-L) then runs the flow once on the real train/test split. Every run
keeps its steps in `<output_dir>/sweep`, so a search cut off half-way goes on from its cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from finance_qlora.config import DEFAULT_PRESET, PresetName
from finance_qlora.errors import ConfigError, FinanceQLoRAError
from finance_qlora.presets import deep_merge, merge_assignments, resolve_config
from flows.finetune import finetune
from tasks.store_access import open_store

Metric = Literal["rouge1", "rouge2", "rougeL", "rougeLsum"]


def run_all(
    preset: str, runs: list[dict[str, Any]], deployment: str | None, secret: str | None
) -> list[dict[str, Any]]:
    """Each run's summary (what the finetune flow keeps in `<store>/runs/<id>.json`)."""
    if deployment is None:
        return [finetune(preset=preset, overrides=overrides) for overrides in runs]
    from prefect.deployments import run_deployment

    submitted = [  # all at once: a pool with several workers trains them side by side
        run_deployment(
            deployment, parameters={"preset": preset, "overrides": o}, timeout=0, as_subflow=True
        )
        for o in runs
    ]
    summaries = []
    for overrides, flow_run in zip(runs, submitted, strict=True):
        done = wait_for_final_state(flow_run.id)
        if not done.state.is_completed():
            raise RuntimeError(f"candidate run {done.name} ended {done.state.name}")
        store = open_store(overrides["output_dir"], secret)
        summaries.append(json.loads(store.read_text("runs", f"{flow_run.id}.json")))
    return summaries


def wait_for_final_state(flow_run_id, poll_s: float = 5.0):
    """The flow run once it has ended (prefect.flow_runs.wait_for_flow_run is async only)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            time.sleep(poll_s)


@flow(name="finance-qlora-sweep")
def sweep(
    preset: PresetName = DEFAULT_PRESET,
    overrides: dict[str, Any] | None = None,
    candidates: list[dict[str, Any]] | None = None,
    validation_size: int = 200,
    metric: Metric = "rougeL",
    deployment: str | None = None,
) -> dict[str, Any]:
    """Candidates on validation rows, the best one on the test rows."""
    candidates = candidates or [{}]
    base = resolve_config(preset, overrides)  # one line on bad input, before any run
    for candidate in candidates:
        resolve_config(preset, deep_merge(overrides or {}, candidate))
    if len(candidates) > 1 and validation_size <= 0:
        raise ConfigError("validation_size: several candidates need validation rows to choose on")
    if validation_size >= base.data.train_size:
        raise ConfigError(
            f"validation_size: {validation_size} leaves no training rows of "
            f"data.train_size {base.data.train_size}"
        )
    # Its own store, and no gate: a test-stage adapter trained on the validation rows must
    # never become a champion that later candidates face on those rows.
    shared = {"output_dir": f"{base.output_dir.rstrip('/')}/sweep", "promotion": {"enabled": False}}
    scored = []
    if len(candidates) > 1:
        carve = {
            "data": {
                "train_size": base.data.train_size - validation_size,
                "validation_size": validation_size,
                "evaluate_on": "validation",
            }
        }
        runs = [deep_merge(deep_merge(overrides or {}, c), shared | carve) for c in candidates]
        for candidate, summary in zip(
            candidates, run_all(preset, runs, deployment, base.output_dir_secret), strict=True
        ):
            scored.append(
                {
                    "candidate": candidate,
                    "validation": summary["rouge"]["finetuned"][metric],
                    "validation_pretrained": summary["rouge"]["pretrained"][metric],
                    "flow_run": summary["flow_run"],
                }
            )
    best = max(scored, key=lambda s: s["validation"])["candidate"] if scored else candidates[0]
    test_run = deep_merge(deep_merge(overrides or {}, best), shared)
    (test,) = run_all(preset, [test_run], deployment, base.output_dir_secret)
    create_markdown_artifact(
        decision_markdown(scored, best, test, metric), key="sweep", description="Recipe search"
    )
    get_run_logger().info("best on validation: %s", json.dumps(best))
    return {"metric": metric, "candidates": scored, "best": best, "test": test}


def decision_markdown(scored: list[dict], best: dict, test: dict, metric: str) -> str:
    lines = [f"## Recipe search on validation {metric}", ""]
    if scored:
        lines += ["| candidate | validation | pretrained |", "|---|---|---|"]
        lines += [
            f"| `{json.dumps(s['candidate'])}`{' (best)' if s['candidate'] == best else ''} "
            f"| {s['validation']:.4f} | {s['validation_pretrained']:.4f} |"
            for s in scored
        ]
    else:
        lines.append("One candidate: no search.")
    lines += [
        "",
        f"Test rows, once: {metric} {test['rouge']['pretrained'][metric]:.4f} pretrained, "
        f"{test['rouge']['finetuned'][metric]:.4f} fine-tuned; report `{test['report']}`.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", default=DEFAULT_PRESET)
    parser.add_argument("--candidate", action="append", default=[], metavar="JSON")
    parser.add_argument("--validation-size", type=int, default=200)
    parser.add_argument("--metric", default="rougeL")
    parser.add_argument("--deployment")
    parser.add_argument("--set", dest="assignments", action="append", default=[])
    args = parser.parse_args(argv)
    try:
        candidates = [json.loads(c) for c in args.candidate]
        result = sweep(
            preset=args.preset,
            overrides=merge_assignments(args.assignments),
            candidates=candidates,
            validation_size=args.validation_size,
            metric=args.metric,
            deployment=args.deployment,
        )
    except json.JSONDecodeError as exc:
        print(f"error: --candidate: not JSON ({exc})", file=sys.stderr)
        return 2
    except FinanceQLoRAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: result[k] for k in ("candidates", "best")}, indent=2))
    print(result["test"]["report"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
