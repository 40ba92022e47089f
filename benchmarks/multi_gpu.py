"""Data-parallel QLoRA and sharded evaluation on 1, 2 and 4 GPUs of one machine.

    python benchmarks/multi_gpu.py --data ../shared/data/finance_alpaca_sample.jsonl --gpus 1 2 4

LLaMA-2-7B architecture with random weights (built as in workload.py), true 4-bit NF4
(no dequantizing), the 1,000 / 300 rows. Every GPU count runs the same code path the train and
evaluate tasks run (`train_data_parallel`, `generate_sharded`: fresh processes, one per GPU),
the one-GPU baseline included, in this one call on this one machine:

- train: the same schedule for every count (--rows-per-step rows an optimizer step, split over
  the GPUs, each in token-budget micro-batches of --tokens-per-batch), --epochs over 1,000
  rows. `useful_tok_s` is real (unpadded) tokens / the Trainer's wall time, whose first steps
  pay each process's one-time CUDA costs; `steady_useful_tok_s` leaves out the first
  --skip-steps optimizer steps (timed by rank 0's progress lines, tokens per step taken as the
  run's mean). Loss per step beside the one-GPU curve.
- eval: 300 prompts x 128 new tokens, greedy (random weights never stop early: the worst
  case), batches of --eval-batch prompts dealt out over the GPUs. `seconds_300x128` is the
  slowest process's generation time; `wall_seconds` adds model loading and process start.
  Predictions are compared with the one-GPU run.

Results: benchmarks/results/multi-gpu-<gpu>-<date>.json (merged with an earlier call's phases).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_throughput import flow_run_timing  # noqa: E402
from benchmarks.workload import ARCHS, build_model  # noqa: E402
from finance_qlora.config import DataConfig  # noqa: E402
from finance_qlora.data import resolve_version, write_splits  # noqa: E402
from finance_qlora.files import read_jsonl  # noqa: E402
from finance_qlora.parallel import (  # noqa: E402
    generate_sharded,
    train_data_parallel,
)
from finance_qlora.presets import deep_merge, merge_assignments, resolve_config  # noqa: E402
from finance_qlora.prompts import cut_answer, write_prompts  # noqa: E402
from finance_qlora.rouge import mean_scores, score_pairs  # noqa: E402


def prepare(args) -> tuple[Path, Path, Path]:
    rows = DataConfig(dataset=str(args.data), train_size=1000, test_size=300, seed=0)
    splits = write_splits(resolve_version(rows.dataset), rows, args.work / "splits")
    prompts = write_prompts(splits, args.work / "prompts")
    model_dir = args.work / f"{args.arch}-random"
    if not (model_dir / "config.json").is_file():
        pairs = read_jsonl(prompts.train_path) + read_jsonl(prompts.test_path)
        build_model(args.arch, model_dir, [p["prompt"] + p["completion"] for p in pairs])
    return prompts.train_path, prompts.test_path, model_dir


def config_for(args, model_dir: Path):
    overrides = deep_merge(
        {
            "model": {"name": str(model_dir)},
            "train": {
                "dequantize": "never",  # true 4-bit: the kernels users train with
                "max_tokens_per_batch": args.tokens_per_batch,
                "rows_per_step": args.rows_per_step,  # the recipe's, split over the GPUs
                "gradient_checkpointing": False,
                "epochs": args.epochs,
                "logging_steps": 1,
                "checkpoint_steps": 0,
            },
            "generation": {
                "max_new_tokens": args.max_new_tokens,
                "batch_size": args.eval_batch,
                "dequantize": "never",
            },
        },
        merge_assignments(args.set),
    )
    return resolve_config("llama2-7b-h100", overrides)


def train_phase(args, train_path: Path, model_dir: Path, result: dict) -> None:
    section = result.setdefault("train", {})
    section["settings"] = config_for(args, model_dir).train.model_dump(mode="json")
    for gpus in args.gpus:
        config = config_for(args, model_dir)
        stamps: list[float] = []
        started = time.perf_counter()
        record = train_data_parallel(
            train_path,
            config.model,
            config.lora,
            config.train,
            args.work / f"train-{gpus}",
            gpus,
            on_log=lambda step, total, loss, stamps=stamps: stamps.append(time.perf_counter()),
        )
        wall = time.perf_counter() - started
        per_step = record.tokens / record.steps
        skip = min(args.skip_steps, record.steps - 2)
        steady = per_step * (len(stamps) - 1 - skip) / (stamps[-1] - stamps[skip])
        section.setdefault("useful_tok_s", {})[str(gpus)] = round(record.tokens / record.seconds, 1)
        section.setdefault("steady_useful_tok_s", {})[str(gpus)] = round(steady, 1)
        section.setdefault("seconds", {})[str(gpus)] = round(record.seconds, 2)
        section.setdefault("wall_seconds", {})[str(gpus)] = round(wall, 2)
        section.setdefault("losses", {})[str(gpus)] = [round(x, 5) for x in record.losses]
        section["steps"], section["useful_tokens"] = record.steps, record.tokens
        print(
            f"train on {gpus} GPU(s): {record.tokens} tokens, {record.steps} steps in "
            f"{record.seconds:.1f} s = {record.tokens / record.seconds:,.0f} tok/s "
            f"(steady {steady:,.0f}); wall {wall:.1f} s",
            flush=True,
        )
    one = section["losses"].get("1")
    if one:
        section["loss_max_abs_diff_vs_1"] = {
            n: round(max(abs(a - b) for a, b in zip(curve, one, strict=True)), 5)
            for n, curve in section["losses"].items()
        }
        for key in ("useful_tok_s", "steady_useful_tok_s"):
            section[f"{key}_speedup"] = {
                n: round(v / section[key]["1"], 3) for n, v in section[key].items()
            }


def eval_phase(args, test_path: Path, model_dir: Path, result: dict) -> None:
    section = result.setdefault("eval", {})
    rows = read_jsonl(test_path)
    prompts, references = [r["prompt"] for r in rows], [r["completion"] for r in rows]
    answers = {}
    for run, gpus in enumerate(args.gpus):
        config = config_for(args, model_dir)
        work = args.work / f"eval-{gpus}"
        started = time.perf_counter()
        generated = generate_sharded(prompts, config.model, config.generation, work, gpus)
        wall = time.perf_counter() - started
        timings = [json.loads(p.read_text()) for p in sorted(work.glob("shard-*.timing.json"))]
        seconds = max(t["generate_seconds"] for t in timings)
        answers[run] = [g.text for g in generated]
        # a repeated count (--gpus 1 1 4) is stored under "1#2"
        name = (
            str(gpus)
            if str(gpus) not in section.get("seconds_300x128", {}) or run == 0
            else f"{gpus}#{run + 1}"
        )
        section.setdefault("seconds_300x128", {})[name] = round(seconds, 2)
        section.setdefault("wall_seconds", {})[name] = round(wall, 2)
        section.setdefault("load_seconds", {})[name] = round(
            statistics.median(t["load_seconds"] for t in timings), 2
        )
        same = sum(a == b for a, b in zip(answers[run], answers[0], strict=True))
        section.setdefault("answers_identical_to_first_run", {})[name] = same
        rouge = mean_scores(score_pairs([cut_answer(a) for a in answers[run]], references))
        section.setdefault("rougeL", {})[name] = round(rouge["rougeL"], 5)
        print(
            f"eval on {gpus} GPU(s): {len(prompts)} x {args.max_new_tokens} in {seconds:.1f} s "
            f"(wall {wall:.1f} s); {same}/{len(prompts)} answers identical to the first run's; "
            f"ROUGE-L {rouge['rougeL']:.5f}",
            flush=True,
        )
    section["batch_size"], section["prompts"] = args.eval_batch, len(prompts)


FLOW_DATA = {
    # the default: 1,000 rows x 1 epoch, where "auto" trains on one GPU
    "default": {"train_size": 1000, "test_size": 300, "epochs": 1},
    # the whole sample's other 1,200 rows for 9 epochs (10,800 row-epochs): work enough for
    # several GPUs, but at the preset's 16 rows a step "auto" trains on one (8 rows a GPU a
    # step did not pay on 2 H200s) and evaluates the 300 prompts on one
    "larger": {"train_size": 1200, "test_size": 300, "epochs": 9},
}


def newest_flow_run(store: Path) -> str:
    """The flow run id of the newest run summary in `store`."""
    summary = max((store / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(summary.read_text())["flow_run"]


def auto_choice(data: dict, visible: int) -> dict:
    """What devices.num_gpus "auto" picks for this data on this host, step by step."""
    from finance_qlora.parallel import gpus_per_step

    config = resolve_config(
        "llama2-7b-h100",
        {
            "data": {"train_size": data["train_size"], "test_size": data["test_size"]},
            "train": {"epochs": data["epochs"]},
            "devices": {"num_gpus": "auto"},
        },
    )
    chosen = gpus_per_step(config, visible)
    return {step: gpus for step, (gpus, _) in chosen.items()} | {
        "why": [why for _, why in chosen.values()]
    }


def flow_phase(args, model_dir: Path, result: dict) -> None:
    """The whole flow through the command line (python -m flows.finetune, the llama2-7b-h100
    preset on the random 7B model), on --flow-gpus counts ("auto" too), for each --flow-data;
    each run in a fresh store, all on one worker cache (the kept 4-bit copy is made first)."""
    import subprocess

    from finance_qlora.modeling import load_model, release_memory

    os.environ.setdefault("PREFECT_HOME", str(args.work / "prefect-home"))
    config = config_for(args, model_dir)
    load_model(config.model)  # the kept 4-bit copy, as on a worker that ran before
    release_memory()  # this process holds no GPU memory while the flows run
    section = result.setdefault("flow", {"seconds": {}, "auto_choice": {}, "runs": []})
    for name in args.flow_data:
        data = FLOW_DATA[name]
        section["auto_choice"][name] = auto_choice(data, torch.cuda.device_count())
        for gpus in args.flow_gpus:
            store = args.work / f"flow-{name}-{gpus}"
            shutil.rmtree(store, ignore_errors=True)
            sets = {
                "model.name": model_dir,
                "data.train_size": data["train_size"],
                "data.test_size": data["test_size"],
                "train.epochs": data["epochs"],
                "devices.num_gpus": gpus,
                "promotion.enabled": "false",  # a measurement, not a candidate
                **dict(s.split("=", 1) for s in args.flow_set),
            }
            command = [sys.executable, "-m", "flows.finetune", "--preset", "llama2-7b-h100"]
            command += ["--data", str(args.data), "--output-dir", str(store)]
            command += [f"--set={k}={v}" for k, v in sets.items()]
            started = time.perf_counter()
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
            wall = time.perf_counter() - started
            (args.work / f"flow-{name}-{gpus}.log").write_text(done.stdout + done.stderr)
            run = {"data": name, "gpus": gpus, "command_seconds": round(wall, 2)}
            if done.returncode:
                run["error"] = (done.stderr.strip().splitlines() or ["?"])[-1][:300]
            else:
                # read from the Prefect database the command line used (this PREFECT_HOME)
                run["flow_run"] = newest_flow_run(store)
                seconds, run["tasks_seconds"] = flow_run_timing(run["flow_run"])
                run["flow_run_seconds"] = seconds
                section["seconds"].setdefault(name, {})
                key = gpus if gpus not in section["seconds"][name] else f"{gpus}#2"
                section["seconds"][name][key] = seconds
            section["runs"].append(run)
            print(f"flow {name} on {gpus} GPU(s): {run}", flush=True)
            args.save()  # each run kept, should a later one run out of time
    section["data"] = {n: FLOW_DATA[n] for n in args.flow_data}
    section["set"] = args.flow_set


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared/data/finance_alpaca_sample.jsonl"
    )
    parser.add_argument("--arch", choices=ARCHS, default="llama2-7b")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--phase", choices=("train", "eval", "flow", "all"), default="all")
    parser.add_argument("--flow-gpus", nargs="+", default=["1", "2"], help='counts, or "auto"')
    parser.add_argument("--flow-data", nargs="+", choices=FLOW_DATA, default=list(FLOW_DATA))
    parser.add_argument(
        "--flow-set", action="append", default=[], help="section.field=value for the flow runs"
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/finance-qlora-multi-gpu"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--tokens-per-batch", type=int, default=8192)
    parser.add_argument("--rows-per-step", type=int, default=16)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--skip-steps", type=int, default=2)
    parser.add_argument("--eval-batch", type=int, default=75)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument(
        "--set", action="append", default=[], help="section.field=value for train and eval"
    )
    args = parser.parse_args()

    train_path, test_path, model_dir = prepare(args)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    date = datetime.now(UTC).date().isoformat()
    out_file = args.out / f"multi-gpu-{gpu.replace(' ', '-')}-{date}.json"
    result = json.loads(out_file.read_text()) if out_file.is_file() else {}
    import bitsandbytes

    result |= {
        "gpu": gpu,
        "gpus_on_machine": torch.cuda.device_count(),
        "date": date,
        "arch": args.arch,
        "torch": torch.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "commands": [
            *result.get("commands", []),
            "python benchmarks/multi_gpu.py " + " ".join(sys.argv[1:]),
        ],
        "settings": {
            "tokens_per_batch_per_gpu": args.tokens_per_batch,
            "rows_per_step": args.rows_per_step,
            "epochs": args.epochs,
            "eval_batch": args.eval_batch,
            "max_new_tokens": args.max_new_tokens,
            "set": args.set,
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    args.save = lambda: out_file.write_text(json.dumps(result, indent=2) + "\n")
    if args.phase in ("train", "all"):
        train_phase(args, train_path, model_dir, result)
    if args.phase in ("eval", "all"):
        eval_phase(args, test_path, model_dir, result)
    if args.phase in ("flow", "all"):
        flow_phase(args, model_dir, result)
    args.out.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_file}", flush=True)


if __name__ == "__main__":
    main()
