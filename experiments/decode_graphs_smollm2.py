"""Do decode steps replayed as CUDA graphs give the eager answers on real weights? And does
reading the stop flag a step late (`--compare stop`) give the answers of reading it each step?

    python experiments/decode_graphs_smollm2.py --data ../shared/data/finance_alpaca_sample.jsonl

SmolLM2-135M-Instruct (the smollm2-135m preset's model: 4-bit NF4 from the shipped weights,
dequantized for generation) answers the 300 test prompts of the seed-0 split with a static cache
in one batch of 300 (as llama2-7b-h100 generates), greedy, 128 new tokens, under
generation.deterministic: decode steps as CUDA graphs (finance_qlora.decode_graphs) and eagerly,
each twice in this process (the first and a warm generation), for the pretrained model and for
the same model with a LoRA adapter of random weights on q_proj and v_proj (the fine-tuned
evaluation's path through PEFT). Counts answers alike and times each; one JSON file.
`--compare stop`: decode steps as graphs in both, generate() deciding to stop a step late
(generation.stop_checks_deferred, as shipped) and at every step; answers that end before 128
tokens counted (a batch whose rows all end early runs the late stop's extra step and undoes
it: smaller --batch-size makes that likelier). `--compare kernel`: decode steps as graphs in
both, their attention through the project's Triton kernel (generation.decode_kernel=triton),
through SDPA as shipped (torch picks its memory-efficient kernel) and through SDPA's math
kernel, so that two of torch's own kernels show how far rounding alone moves greedy answers;
`--compute-dtype float32` runs all three in fp32. `--compare budget`: the 300 prompts in one
batch against batches of at most `--budget` cache positions (generation.max_tokens_per_batch,
llama2-7b-h100's by default), on a split with a long prompt (`--data-seed 44`); it also runs on
a CPU (`--repeats 1`: the first generation only). Every mode's answers (cut as evaluation cuts
them) are scored with ROUGE-L against the test rows' references, with a paired bootstrap
interval of each pair's difference of means, so that answers that differ can be weighed.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
import time
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from benchmarks.variants import stop_each_step  # noqa: E402
from benchmarks.watch import decode_log  # noqa: E402
from finance_qlora.bootstrap import paired_bootstrap  # noqa: E402
from finance_qlora.config import DataConfig  # noqa: E402
from finance_qlora.data import resolve_version, write_splits  # noqa: E402
from finance_qlora.files import read_jsonl  # noqa: E402
from finance_qlora.generation import (  # noqa: E402
    cache_positions,
    generate_shard,
    length_order,
    prompt_batches,
)
from finance_qlora.modeling import loaded  # noqa: E402
from finance_qlora.presets import resolve_config  # noqa: E402
from finance_qlora.prompts import cut_answer, write_prompts  # noqa: E402
from finance_qlora.rouge import mean_scores, score_pairs  # noqa: E402


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(model, tokenizer, prompts, generation) -> tuple[list[str], float, int]:
    """The answers, the seconds, and how many answers ended before the token limit."""
    synchronize()
    started = time.perf_counter()
    answers = generate_shard(model, tokenizer, prompts, generation)
    synchronize()
    seconds = round(time.perf_counter() - started, 2)
    ended = sum(a.new_tokens < generation.max_new_tokens for a in answers.values())
    return [answers[i].text for i in range(len(prompts))], seconds, ended


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/decode-graphs"))
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results")
    parser.add_argument(
        "--compare", choices=["graphs", "stop", "kernel", "budget"], default="graphs"
    )
    parser.add_argument("--models", default="pretrained,random-lora")
    parser.add_argument("--batch-size", type=int, default=300, help="prompts a generate() call")
    parser.add_argument("--compute-dtype", default="auto", help="model.compute_dtype")
    parser.add_argument("--data-seed", type=int, default=0, help="data.seed of the split")
    parser.add_argument("--budget", type=int, default=98304, help="--compare budget's positions")
    parser.add_argument("--repeats", type=int, choices=[1, 2], default=2, help="generations a mode")
    args = parser.parse_args()
    rows = DataConfig(
        dataset=str(args.data.resolve()), train_size=1000, test_size=300, seed=args.data_seed
    )
    splits = write_splits(resolve_version(rows.dataset), rows, args.work / "splits")
    test = list(read_jsonl(write_prompts(splits, args.work / "prompts").test_path))
    prompts, references = [p["prompt"] for p in test], [p["completion"] for p in test]
    batching = {"cache": "static", "batch_size": args.batch_size}
    config = resolve_config(
        "smollm2-135m",
        {"generation": batching, "model": {"compute_dtype": args.compute_dtype}},
    )
    eager = config.generation.model_copy(update={"cuda_graphs": False})
    triton = {"decode_kernel": "triton"}
    modes = {  # name: generation settings, what the generation runs under
        "graphs": [("graphs", config.generation, nullcontext), ("eager", eager, nullcontext)],
        "stop": [
            ("late", config.generation, nullcontext),
            ("each-step", config.generation, stop_each_step),
        ],
        "kernel": [
            ("triton", config.generation.model_copy(update=triton), nullcontext),
            ("sdpa", config.generation, nullcontext),
            ("sdpa-math", config.generation, functools.partial(sdpa_kernel, [SDPBackend.MATH])),
        ],
        "budget": [
            (
                "budget",
                config.generation.model_copy(update={"max_tokens_per_batch": args.budget}),
                nullcontext,
            ),
            ("one-batch", config.generation, nullcontext),
        ],
    }[args.compare]
    handler = decode_log()
    result: dict = {
        "machine": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": datetime.now(UTC).date().isoformat(),
        "torch": torch.__version__,
        "command": " ".join(["python", "experiments/decode_graphs_smollm2.py", *sys.argv[1:]]),
        "generation": config.generation.model_dump(mode="json"),
        **({"budget": args.budget} if args.compare == "budget" else {}),
        "prompts": len(prompts),
        "models": {},
    }
    ahead = config.generation.decode_kernel == "triton"
    with loaded(config.model, None, None, config.generation.dequantize, ahead) as (
        model,
        tokenizer,
    ):
        for name in args.models.split(","):
            if name == "random-lora":
                from peft import LoraConfig, get_peft_model

                torch.manual_seed(0)
                lora = LoraConfig(
                    r=16, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian"
                )
                model = get_peft_model(model, lora).eval()
            runs = {}
            for mode, settings, context in modes:
                handler.lines.clear()
                with context():
                    first, first_s, ended = timed(model, tokenizer, prompts, settings)
                    warm, warm_s = first, None
                    if args.repeats == 2:
                        warm, warm_s, _ = timed(model, tokenizer, prompts, settings)
                scores = score_pairs([cut_answer(a) for a in first], references)["rougeL"]
                positions = cache_positions(tokenizer, prompts, settings.max_new_tokens)
                batches = prompt_batches(
                    length_order(prompts),
                    settings.batch_size,
                    positions,
                    settings.max_tokens_per_batch,
                )
                runs[mode] = {
                    "batches": [len(b) for b in batches],
                    "widest_positions": [max(positions[i] for i in b) for b in batches],
                    "answers": first,
                    "scores": scores,
                    "rougeL": round(mean_scores({"rougeL": scores})["rougeL"], 4),
                    "first_seconds": first_s,
                    "warm_seconds": warm_s,
                    "ended_before_limit": ended,
                    "repeat_alike": (
                        sum(a == b for a, b in zip(first, warm, strict=True))
                        if args.repeats == 2
                        else None  # generated once
                    ),
                    "log": list(handler.lines),
                }
            (new, *_), (old, *_) = modes[:2]
            pairs = {}
            for (a, *_), (b, *_) in itertools.combinations(modes, 2):
                answers = zip(runs[a]["answers"], runs[b]["answers"], strict=True)
                delta = paired_bootstrap(runs[b]["scores"], runs[a]["scores"]).delta
                pairs[f"{a}_vs_{b}_alike"] = sum(x == y for x, y in answers)
                # a's mean ROUGE-L minus b's, with its 95% interval
                pairs[f"{a}_minus_{b}_rougeL"] = [
                    round(x, 4) for x in (delta.mean, delta.low, delta.high)
                ]
            drop = ("answers", "scores")
            result["models"][name] = {
                **pairs,
                **{m: {k: v for k, v in r.items() if k not in drop} for m, r in runs.items()},
                "first_speedup": round(runs[old]["first_seconds"] / runs[new]["first_seconds"], 2),
                **(
                    {
                        "warm_speedup": round(
                            runs[old]["warm_seconds"] / runs[new]["warm_seconds"], 2
                        )
                    }
                    if args.repeats == 2
                    else {}
                ),
            }
            print(json.dumps({name: result["models"][name]}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = result["machine"].replace(" ", "-")
    name = {
        "graphs": "decode-graphs",
        "stop": f"stop-late-batch{args.batch_size}",
        "kernel": f"decode-kernel-{args.compute_dtype}",
        "budget": f"generation-budget-seed{args.data_seed}",
    }[args.compare]
    out = args.out / f"{name}-smollm2-{gpu}-{result['date']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(out)


if __name__ == "__main__":
    main()
