"""The command line's first second: arguments parsed and the configuration validated with
pydantic alone, so `--help`, `--show-config` and a config error answer before torch,
transformers or Prefect's server are imported (seconds on a small machine)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from finance_qlora.config import DEFAULT_PRESET, FinetuneConfig
from finance_qlora.errors import FinanceQLoRAError
from finance_qlora.presets import PRESETS, merge_assignments, resolve_config
from finance_qlora.schedule import devices_line, schedule_line

DESCRIPTION = """Fine-tune a causal LM on Finance-Alpaca with QLoRA, compare ROUGE before and after.

    python -m flows.finetune --preset tiny-cpu
    python -m flows.finetune --preset llama2-7b-t4 --set train.learning_rate=1e-4

Runs on Prefect's local embedded API unless PREFECT_API_URL points at a server.
"""


def parse_args(argv: list[str] | None = None) -> tuple[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(
        prog="python -m flows.finetune",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        help=f"one of {', '.join(PRESETS)} (default {DEFAULT_PRESET})",
    )
    parser.add_argument("--data", help="a local JSON/JSONL/CSV/Parquet file or a hub id")
    parser.add_argument(
        "--output-dir", help="the durable store: a folder or s3://, gs://, az:// URL (default runs)"
    )
    parser.add_argument(
        "--set",
        dest="assignments",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override any config field, e.g. train.epochs=2 (repeatable)",
    )
    parser.add_argument(
        "--show-config", action="store_true", help="print the resolved config as JSON and exit"
    )
    args = parser.parse_args(argv)
    overrides = merge_assignments(args.assignments)
    if args.data:
        overrides.setdefault("data", {})["dataset"] = args.data
    if args.output_dir is not None:
        overrides["output_dir"] = args.output_dir
    return args.preset, overrides | ({"_show": True} if args.show_config else {})


def resolve_args(argv: list[str] | None = None) -> tuple[str, dict[str, Any], FinetuneConfig, bool]:
    """(preset, overrides, config, --show-config given); raises FinanceQLoRAError."""
    preset, overrides = parse_args(argv)
    show = overrides.pop("_show", False)
    return preset, overrides, resolve_config(preset, overrides), show


def answer_early(argv: list[str]) -> None:
    """Exit now where the arguments alone decide: --help, --show-config, a config error (the
    same line and status as `flows.finetune.main`); else return, and the run goes on."""
    try:
        _, _, config, show = resolve_args(argv)
    except FinanceQLoRAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    if show:
        print(config.model_dump_json(indent=2))
        print(schedule_line(config), file=sys.stderr)  # the recipe's schedule, in words
        print(devices_line(config), file=sys.stderr)
        sys.exit(0)


def outcome(summary: dict[str, Any], preset: str) -> list[str]:
    """What a run prints after its table: the data version, the adapter, and in words whether
    it was promoted or the champion kept, and why."""
    decision = summary["decision"]
    if summary["promoted"]:
        verdict = f"promoted: this adapter is the new champion ({decision['reason']})"
    elif summary["champion"]:
        verdict = f"kept: the champion stays {summary['champion']} ({decision['reason']})"
    else:
        verdict = f"kept: no champion yet, this adapter is not one ({decision['reason']})"
    lines = [f"data: {summary['data_version']}", f"adapter: {summary['adapter']}", verdict]
    if preset == "tiny-cpu":
        lines.append(
            "note: tiny-cpu's model has random weights: its scores prove only that every step "
            "ran, not that fine-tuning helps"
        )
    return lines
