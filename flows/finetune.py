"""Fine-tune a causal LM on Finance-Alpaca with QLoRA and compare ROUGE before and after.

    python -m flows.finetune --preset tiny-cpu
    python -m flows.finetune --preset llama2-7b-t4 --set train.learning_rate=1e-4

Runs on Prefect's local embedded API unless PREFECT_API_URL points at a server.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    # --help, --show-config and config errors answer before the imports below (torch,
    # transformers, Prefect: seconds) are paid
    from finance_qlora.cli import answer_early

    answer_early(sys.argv[1:])

import json
import logging
import signal
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.logging.handlers import APILogHandler
from prefect.runtime import flow_run

from finance_qlora import heap
from finance_qlora.cli import outcome, resolve_args
from finance_qlora.config import DEFAULT_PRESET, DeviceSettings, FinetuneConfig, PresetName
from finance_qlora.errors import FinanceQLoRAError
from finance_qlora.parallel import gpus_per_step, visible_gpu_count
from finance_qlora.preflight import preflight
from finance_qlora.presets import ConfigOverrides, resolve_config
from finance_qlora.records import (
    AdapterRecord,
    ComparisonRecord,
    DataVersion,
    EvalRecord,
    PromptRecord,
    TrainRecord,
)
from finance_qlora.registry import Champion, Decision, Protocol, live_champion
from finance_qlora.schedule import schedule_line
from flows.local_server import (
    INTERRUPTED,
    STOP_SIGNALS,
    interrupt_once,
    quiet_libraries,
    start_local_api,
)
from tasks.compare import compare_rouge
from tasks.evaluate import evaluate
from tasks.format import format_prompts
from tasks.identity import RecordSerializer
from tasks.load import data_version, load_splits
from tasks.promote import promote
from tasks.save_adapter import save_adapter
from tasks.secrets import hf_token, storage_options
from tasks.store_access import StoreRef, result_storage, store_of
from tasks.train import train


def _run_name() -> str:
    params = flow_run.parameters
    config = resolve_config(params.get("preset", DEFAULT_PRESET), params.get("overrides"))
    return f"{config.preset}: {config.model.name} on {config.data.dataset}"


class StepRunner:
    """Runs tasks with their results kept in the store, and notes which were served from it."""

    def __init__(self, store: StoreRef):
        self.storage = result_storage(store)
        self.cached: list[str] = []

    def __call__(self, step, *args: Any, **kwargs: Any) -> Any:
        state = step.with_options(
            persist_result=True, result_storage=self.storage, result_serializer=RecordSerializer()
        )(*args, **kwargs, return_state=True)
        if state.is_completed() and state.name == "Cached":
            self.cached.append(step.name + (f"-{args[0]}" if step.name == "evaluate" else ""))
        return state.result()


@flow(name="finance-qlora", flow_run_name=_run_name)
def finetune(
    preset: PresetName = DEFAULT_PRESET, overrides: ConfigOverrides | None = None
) -> dict[str, Any]:
    """Load, format, baseline eval, train, save adapter, final eval; compare and promote."""
    # the heap alive before the run stays out of its garbage collections (finance_qlora.heap)
    with heap.frozen():
        config = resolve_config(preset, overrides)
        train_gpus, eval_gpus = devices_for(config)  # "auto" resolved once, step by step
        config = config.model_copy(update={"devices": eval_gpus})  # the gate's evaluations too
        model, token_block = config.model, config.model.hf_token_secret
        store = StoreRef(url=config.output_dir, secret=config.output_dir_secret)
        preflight(config, lambda: hf_token(token_block, model.name), store_of(store).options)
        run = StepRunner(store)
        # Load
        source = data_version(store, config.data, token_block)
        splits = run(load_splits, store, config.data, source, token_block)
        # Format
        prompts = run(format_prompts, store, splits)
        # Baseline eval
        scoring = (config.generation, config.evaluation)
        devices = {"devices": eval_gpus}
        pretrained = run(evaluate, "pretrained", store, prompts, model, *scoring, **devices)
        # Train
        trained = run(train, store, prompts, model, config.lora, config.train, devices=train_gpus)
        # Save adapter
        adapter = run(
            save_adapter, store, trained, model, config.lora, config.train, source, prompts
        )
        # Final eval
        finetuned = run(evaluate, "finetuned", store, prompts, model, *scoring, adapter, **devices)
        # Compare
        comparison = run(compare_rouge, store, pretrained, finetuned, config.bootstrap)
        # Promote: the champion, re-scored on these same prompts, and the gate
        decision, champion_eval = gate(
            run, config, store, prompts, source, adapter, finetuned, comparison
        )
        return record_run(
            store,
            run,
            source,
            trained,
            adapter,
            (pretrained, finetuned, champion_eval),
            comparison,
            decision,
        )


def gate(
    run: StepRunner,
    config: FinetuneConfig,
    store: StoreRef,
    prompts: PromptRecord,
    source: DataVersion,
    adapter: AdapterRecord,
    finetuned: EvalRecord,
    comparison: ComparisonRecord,
) -> tuple[Decision | None, EvalRecord | None]:
    """The champion (one whose adapter is gone is dropped), re-scored on this run's test
    prompts when it can be, and the gate's decision; (None, None) with promotion off."""
    if not config.promotion.enabled:
        return None, None
    protocol = protocol_of(config, prompts, source, finetuned)
    champion, note = live_champion(store_of(store))
    if note:
        get_run_logger().warning(note)
    same = champion is not None and champion.adapter.fingerprint == adapter.fingerprint
    unscorable = unscorable_reason(champion, protocol) if champion and not same else None
    champion_eval = finetuned if same else None  # no new data: the candidate is the champion
    if champion is not None and not same and unscorable is None:
        scoring = (config.generation, config.evaluation)
        champion_eval = run(
            evaluate,
            "champion",
            store,
            prompts,
            config.model,
            *scoring,
            champion.adapter,
            devices=config.devices,
        )
    decision = promote(
        store,
        adapter,
        finetuned,
        comparison,
        champion,
        champion_eval,
        prompts,
        config.promotion,
        config.bootstrap,
        protocol,
        unscorable,
        note,
    )
    return decision, champion_eval


def record_run(
    store: StoreRef,
    run: StepRunner,
    source: DataVersion,
    trained: TrainRecord,
    adapter: AdapterRecord,
    evaluations: tuple[EvalRecord, EvalRecord, EvalRecord | None],
    comparison: ComparisonRecord,
    decision: Decision | None,
) -> dict[str, Any]:
    """What the run did, in the logs, in the store (`runs/<flow-run-id>.json`: the weekly
    history outlives the server) and as the run-summary artifact; returned to the caller."""
    pretrained, finetuned, champion_eval = evaluations
    logger = get_run_logger()
    if decision is None:
        decision_json = {"promoted": False, "reason": "promotion is off (promotion.enabled)"}
    else:
        decision_json = decision.model_dump(mode="json")
        if "load" in run.cached and not decision.promoted and decision.adapter == adapter.folder:
            logger.info("no new data since %s; champion unchanged", source.version)
    ui_logger().info(
        "%s\nchampion: %s (%s)",
        comparison.markdown,
        decision_json.get("adapter"),
        decision_json["reason"],
    )
    summary = {
        "flow_run": str(flow_run.get_id()),
        "data_version": source.version,
        "adapter": adapter.folder,
        "champion": decision_json.get("adapter"),
        "promoted": decision_json["promoted"],
        "decision": decision_json,
        "cached_steps": run.cached,
        "report": f"{comparison.folder}/comparison.md",
        "rouge": {
            "pretrained": pretrained.rouge,
            "finetuned": finetuned.rouge,
            "champion": champion_eval.rouge if champion_eval else None,
        },
        "train_losses": trained.losses,
        # the schedule (rows a step, steps) and how this card computed it
        "train": trained.model_dump(include=SCHEDULE_FIELDS),
    }
    store_of(store).write_text(json.dumps(summary, indent=2), "runs", f"{summary['flow_run']}.json")
    create_markdown_artifact(run_markdown(summary), key="run-summary", description="This run")
    return summary | {"table": comparison.markdown.split("\n### ")[0]}


def devices_for(config: FinetuneConfig) -> tuple[DeviceSettings, DeviceSettings]:
    """The GPUs this run trains and evaluates on ("auto" resolved from each step's work: the
    training rows x epochs and rows a step, the prompts evaluated), logged with why."""
    chosen = gpus_per_step(config, visible_gpu_count())
    for step, (_, why) in chosen.items():
        get_run_logger().info("devices for %s: %s", step, why)
    train, evaluate = (
        config.devices.model_copy(update={"num_gpus": gpus or config.devices.num_gpus})
        for gpus, _ in chosen.values()
    )
    return train, evaluate


SCHEDULE_FIELDS = {"rows", "rows_per_step", "steps", "micro_batches_per_step", "seconds", "tokens"}


def protocol_of(
    config: FinetuneConfig, prompts: PromptRecord, source: DataVersion, scored: EvalRecord
) -> Protocol:
    """What this run's scores were measured on: prompts, split, decoding, the model as it ran
    (`scored.runtime`: resolved dtype, dequantized or not, library versions, GPU class)."""
    model, runtime = config.model, dict(scored.runtime)
    return Protocol(
        test_sha256=prompts.test_sha256,
        template=prompts.template,
        generation=config.generation.model_dump(mode="json"),
        base_model=f"{model.name}@{model.revision or 'default'}",
        data_version=source.version,
        split=config.data.model_dump(
            mode="json",
            include={"seed", "train_size", "test_size", "validation_size", "evaluate_on"},
        ),
        model={
            **model.model_dump(
                mode="json",
                include={"name", "revision", "load_in_4bit", "quant_type", "double_quant"},
            ),
            "compute_dtype": runtime.pop("dtype", model.compute_dtype),
            "dequantized": runtime.pop("dequantized", None),
        },
        runtime=runtime,
    )


def run_markdown(summary: dict[str, Any]) -> str:
    cached = ", ".join(summary["cached_steps"]) or "none"
    return "\n".join(
        [
            f"## {'Promoted' if summary['promoted'] else 'Champion kept'}",
            "",
            f"- data version: `{summary['data_version']}`",
            f"- served from the cache: {cached}",
            f"- candidate adapter: `{summary['adapter']}`",
            f"- champion: `{summary['champion']}`",
            f"- why: {summary['decision']['reason']}",
            f"- report: `{summary['report']}`",
        ]
    )


def ui_logger() -> logging.LoggerAdapter:
    """The run logger, writing to the run's logs in Prefect only, not to the console: there
    the command line prints the table itself, and once is enough."""
    logger = logging.getLogger("prefect.flow_runs.report")
    if not logger.handlers:
        logger.addHandler(APILogHandler())
        logger.propagate = False
    return logging.LoggerAdapter(logger, get_run_logger().extra)


def unscorable_reason(champion: Champion, protocol: Protocol) -> str | None:
    """Why the champion's adapter cannot be applied to this run's model; None when it can."""
    if champion.protocol.base_model != protocol.base_model:
        return (
            f"it was trained on {champion.protocol.base_model}, this run uses {protocol.base_model}"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    # bitsandbytes warns on import on every CPU without the optional `kernels` package; the
    # configuration check imports it (through transformers), and an error must stay one line.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    quiet_libraries()
    previous = {stop: signal.getsignal(stop) for stop in STOP_SIGNALS}
    for stop, handler in previous.items():
        if handler is not signal.SIG_IGN:  # ignored (a background job of a script): stays so
            signal.signal(stop, interrupt_once)
    try:
        preset, overrides, config, show = resolve_args(argv)
        if show:
            print(config.model_dump_json(indent=2))
            print(schedule_line(config), file=sys.stderr)
            return 0

        def api(function, *args):  # anything that talks to Prefect starts its server first
            start_local_api()
            return function(*args)

        # Bad input fails here, before the flow starts (the token is looked up, in the Secret
        # block or HF_TOKEN, only for a hub model).
        token_block = config.model.hf_token_secret
        preflight(
            config,
            lambda: api(hf_token, token_block, config.model.name),
            api(storage_options, config.output_dir_secret) if config.output_dir_secret else {},
        )
        result = api(finetune, preset, overrides)
    except FinanceQLoRAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(INTERRUPTED, file=sys.stderr)
        return STOP_SIGNALS.get(getattr(exc, "signum", signal.SIGINT), 130)
    finally:
        for stop, handler in previous.items():
            if handler is not None:  # None: a handler not set from Python, left as it was
                signal.signal(stop, handler)
    print(result["table"])
    print("\n".join(outcome(result, preset)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
