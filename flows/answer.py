"""Ask the champion: answers to a file of questions from the champion adapter (or a named one),
with the evaluation's template, end-of-answer tokens and decoding.

    python -m flows.answer --questions questions.jsonl
    python -m flows.answer --questions s3://bucket/q.parquet --adapter s3://bucket/runs/adapters/<key>

Questions: JSONL, JSON, CSV or Parquet rows with `instruction`, optional `input` and `id`.
Answers: <store>/answers/<key>/answers.jsonl and answers.parquet, the key from the questions'
content, the adapter's fingerprint and the decoding.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run

from finance_qlora.answering import Gated, adapter_model, decoding_of, resolve_adapter
from finance_qlora.config import DeviceSettings, GenerationSettings, ModelConfig, default_store
from finance_qlora.errors import ConfigError, FinanceQLoRAError
from finance_qlora.files import read_jsonl
from finance_qlora.presets import merge_assignments
from flows.finetune import StepRunner
from flows.local_server import quiet_libraries, start_local_api
from tasks.answer import answer, checked_questions, load_questions
from tasks.secrets import storage_options
from tasks.store_access import StoreRef, local, store_of

SHOWN = 10  # answers in the run's table artifact


def _run_name() -> str:
    params = flow_run.parameters
    return f"answer {params.get('questions')} with {params.get('adapter', 'champion')}"


def prepare(
    store: StoreRef, adapter: str, generation: dict[str, Any] | None
) -> tuple[Gated, ModelConfig, GenerationSettings]:
    """The adapter, the base model it was trained on and the decoding it is answered with."""
    gated = resolve_adapter(store_of(store), adapter)
    model = adapter_model(local(store, gated).path)
    return gated, model, decoding_of(gated, generation)


@flow(name="finance-qlora-answer", flow_run_name=_run_name)
def answer_flow(
    questions: str,
    adapter: str = "champion",
    output_dir: str | None = None,
    output_dir_secret: str | None = None,
    generation: dict[str, Any] | None = None,
    devices: DeviceSettings | None = None,
) -> dict[str, Any]:
    """Answer `questions` with `adapter` ('champion' or an adapter folder's URL in the store);
    `generation` overrides the decoding the gate scored the adapter with."""
    store = StoreRef(url=output_dir or default_store(), secret=output_dir_secret)
    gated, model, decoding = prepare(store, adapter, generation)
    asked = load_questions(store, questions, model, decoding)
    run = StepRunner(store)
    answers = run(answer, store, asked, gated, model, decoding, devices or DeviceSettings())
    rows = read_jsonl(local(store, answers).answers_path)
    shown = [{k: row[k] for k in ("id", "instruction", "answer")} for row in rows[:SHOWN]]
    create_table_artifact(shown, key="answers", description=f"The first answers of {questions}")
    return {
        "flow_run": str(flow_run.get_id()),
        "questions": questions,
        "adapter": gated.folder,
        "answers": answers.folder,
        "rows": answers.rows,
        "generation": decoding.model_dump(mode="json"),
        "cached": bool(run.cached),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m flows.answer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--questions", required=True, help="a local file or a URL on the store")
    parser.add_argument(
        "--adapter", default="champion", help="'champion' (default) or an adapter folder's URL"
    )
    parser.add_argument("--output-dir", help="the store (default $FINANCE_QLORA_STORE or runs)")
    parser.add_argument("--output-dir-secret", help="Prefect Secret block with its options")
    parser.add_argument(
        "--set",
        dest="assignments",
        action="append",
        default=[],
        metavar="generation.FIELD=VALUE",
        help="change the decoding (e.g. generation.do_sample=true) or devices.num_gpus",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    quiet_libraries()  # library warnings to the log file, no library progress bars
    try:
        args = parse_args(argv)
        overrides = merge_assignments(args.assignments)
        unknown = set(overrides) - {"generation", "devices"}
        if unknown:
            raise ConfigError(f"--set {sorted(unknown)[0]}: only generation.* and devices.*")
        secret = args.output_dir_secret
        if secret:
            start_local_api()
        store = StoreRef(url=args.output_dir or default_store(), secret=secret)
        if secret:
            storage_options(secret)  # a missing Secret block is one line, here
        devices = DeviceSettings.model_validate(overrides.get("devices", {}))
        # Bad input fails here, before the flow starts and before anything is written.
        _, model, decoding = prepare(store, args.adapter, overrides.get("generation"))
        checked_questions(store, args.questions, model, decoding)
        start_local_api()
        result = answer_flow(
            args.questions,
            args.adapter,
            store.url,
            secret,
            overrides.get("generation"),
            devices,
        )
    except FinanceQLoRAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again", file=sys.stderr)
        return 130
    print(f"adapter: {result['adapter']}")
    print(f"answers: {result['rows']} in {result['answers']}/answers.jsonl (and .parquet)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
