"""What a process pays the first time a flow's later step imports its library: the ROUGE
metric (🤗 evaluate, the project's metric module, rouge_score and nltk) at the first scoring,
and TRL at the first trainer. Each in a fresh process that already holds what the flow holds
by then (the flow's modules, transformers' model classes, PEFT, bitsandbytes), with the
largest parts from `python -X importtime`:

    python benchmarks/first_imports.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what a flow process holds before its first scoring or trainer
HELD = (
    "import flows.finetune, finance_qlora.modeling, finance_qlora.generation, peft, bitsandbytes;"
    "from transformers import AutoModelForCausalLM, LlamaForCausalLM"
)
FIRSTS = {
    "rouge_metric": "from finance_qlora.rouge import rouge_metric; rouge_metric()",
    "step_trainer_class": "from finance_qlora.step_trainer import step_trainer_class; "
    "step_trainer_class()",
}
MARK = "-- first use --"


def first_use(statement: str, largest: int) -> dict:
    """Seconds of `statement` after HELD in a fresh process, and its costliest imports."""
    program = (
        f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); {HELD}\n"
        f"print({MARK!r}, file=sys.stderr, flush=True); started = time.perf_counter()\n"
        f"{statement}\nprint(time.perf_counter() - started)"
    )
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", program], capture_output=True, text=True
    )
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1][:300]}
    after = done.stderr.split(MARK, 1)[1].splitlines()
    rows = []
    for line in after:  # "import time: self [us] | cumulative | name"
        if not line.startswith("import time:") or "[us]" in line:
            continue
        head, cumulative_us, name = line.split("|", 2)
        self_us = head.split(":", 1)[1]
        rows.append((int(cumulative_us), int(self_us.strip()), name.rstrip()))
    return {
        "seconds": round(float(done.stdout.strip().splitlines()[-1]), 2),
        "imported_seconds": round(sum(r[1] for r in rows) / 1e6, 2),
        "modules": len(rows),
        "largest": [f"{c / 1e6:.2f} s {n}" for c, _, n in sorted(rows, reverse=True)[:largest]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--largest", type=int, default=12)
    args = parser.parse_args()
    results: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "held": HELD,
        "firsts": {},
    }
    for name, statement in FIRSTS.items():
        results["firsts"][name] = [first_use(statement, args.largest) for _ in range(args.repeats)]
        print(name, json.dumps(results["firsts"][name], indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
