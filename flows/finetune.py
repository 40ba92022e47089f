"""Fine-tune a causal LM on Finance-Alpaca with QLoRA and compare ROUGE before and after.

    python -m flows.finetune --preset tiny-cpu
    python -m flows.finetune --preset llama2-7b-t4 --set train.learning_rate=1e-4

Runs on Prefect's local embedded API unless PREFECT_API_URL points at a server.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.transactions import transaction

from finance_qlora.config import (
    DEFAULT_PRESET,
    PRESETS,
    ConfigOverrides,
    PresetName,
    merge_assignments,
    resolve_config,
)
from finance_qlora.errors import FinanceQLoRAError
from finance_qlora.preflight import preflight
from finance_qlora.records import Stored
from tasks.common import hf_token
from tasks.compare import compare_rouge
from tasks.evaluate import evaluate
from tasks.format import format_prompts
from tasks.load import load_splits, source_fingerprint
from tasks.promote import promote
from tasks.save_adapter import save_adapter
from tasks.train import train


def _run_name() -> str:
    params = flow_run.parameters
    config = resolve_config(params.get("preset", DEFAULT_PRESET), params.get("overrides"))
    return f"{config.preset}: {config.model.name} on {config.data.dataset}"


def intact(step, *args: Any, **kwargs: Any) -> Stored:
    """Run a task; if its (cached) record points at files that are gone or changed, run it
    again with the cache refreshed instead of handing back something that no longer exists."""
    record = step(*args, **kwargs)
    if not record.intact():
        get_run_logger().warning(
            "%s: cached files at %s changed or vanished; recomputing", step.name, record.folder
        )
        record = step.with_options(refresh_cache=True)(*args, **kwargs)
    return record


@flow(name="finance-qlora", flow_run_name=_run_name)
def finetune(
    preset: PresetName = DEFAULT_PRESET, overrides: ConfigOverrides | None = None
) -> dict[str, Any]:
    """Load, format, baseline eval, train, save adapter, final eval; compare and promote."""
    config = resolve_config(preset, overrides)
    out, model = config.output_dir, config.model
    preflight(config, lambda: hf_token(model.hf_token_secret, model.name))
    # Load
    splits = intact(
        load_splits, config.data, source_fingerprint(config.data), out, model.hf_token_secret
    )
    # Format
    prompts = intact(format_prompts, splits)
    # Baseline eval
    pretrained = intact(evaluate, "pretrained", prompts, model, config.generation, out)
    # Train
    trained = intact(train, prompts, model, config.lora, config.train, out)
    # One transaction: an adapter that loses to the champion is rolled back (its folder removed,
    # nothing cached), and so is everything after a failure in these steps.
    with transaction() as txn:
        # Save adapter
        adapter = intact(save_adapter, trained, config)
        # Final eval
        finetuned = intact(evaluate, "finetuned", prompts, model, config.generation, out, adapter)
        # Compare
        comparison = intact(compare_rouge, pretrained, finetuned, config.bootstrap, out)
        # Promote
        decision = promote(finetuned, adapter, config.promotion, config.registry)
        if not decision.is_champion:
            txn.rollback()
    get_run_logger().info(
        "%s\nchampion: %s (%s)", comparison.markdown, decision.adapter, decision.reason
    )
    return {
        "adapter": str(adapter.folder),
        "champion": str(decision.adapter),
        "promoted": decision.promoted,
        "rolled_back": not decision.is_champion,
        "report": str(comparison.markdown_path),
        "table": comparison.markdown.split("\n### ")[0],
        "rouge": {"pretrained": pretrained.rouge, "finetuned": finetuned.rouge},
        "train_losses": trained.losses,
    }


def parse_args(argv: list[str] | None = None) -> tuple[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(
        prog="python -m flows.finetune",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        help=f"one of {', '.join(PRESETS)} (default {DEFAULT_PRESET})",
    )
    parser.add_argument("--data", help="a local JSON/JSONL/CSV/Parquet file or a hub id")
    parser.add_argument("--output-dir", type=Path, help="where results go (default ./runs)")
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
    if args.output_dir:
        overrides["output_dir"] = str(args.output_dir)
    return args.preset, overrides | ({"_show": True} if args.show_config else {})


def main(argv: list[str] | None = None) -> int:
    try:
        preset, overrides = parse_args(argv)
        show = overrides.pop("_show", False)
        config = resolve_config(preset, overrides)
        if show:
            print(config.model_dump_json(indent=2))
            return 0
        # Bad input fails here, before the flow starts (the token is looked up, in the Secret
        # block or HF_TOKEN, only for a hub model).
        preflight(config, lambda: hf_token(config.model.hf_token_secret, config.model.name))
        result = finetune(preset=preset, overrides=overrides)
    except FinanceQLoRAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result["table"])
    note = " (rolled back: it did not beat the champion)" if result["rolled_back"] else ""
    print(f"adapter: {result['adapter']}{note}")
    print(f"champion: {result['champion']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
