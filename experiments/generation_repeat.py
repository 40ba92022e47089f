"""Are greedy answers on the GPU the same when generated twice? (issue 23's diagnosis)

    python experiments/generation_repeat.py --store STORE

Takes the newest run in STORE (as experiments/answer_smollm2.py does), generates its 300 test
answers twice in this process with the evaluation's own `generate_all` (which loads the base
model and adapter for each), and compares both with each other, with the run's final
evaluation and with the newest answer flow's answers. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# before torch: cuBLAS reads it at its first handle
if "--deterministic" in sys.argv or "--strict" in sys.argv:
    import os

    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from answer_smollm2 import final_evaluation, run_summary  # noqa: E402

from finance_qlora.answering import adapter_model  # noqa: E402
from finance_qlora.config import GenerationSettings  # noqa: E402
from finance_qlora.evaluation import generate_all  # noqa: E402
from finance_qlora.files import read_jsonl  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", required=True, type=Path)
    parser.add_argument(
        "--deterministic", action="store_true", help="deterministic algorithms (warn-only)"
    )
    parser.add_argument(
        "--strict", action="store_true", help="deterministic algorithms; an op without one fails"
    )
    args = parser.parse_args()
    if args.deterministic or args.strict:
        import torch

        torch.use_deterministic_algorithms(True, warn_only=not args.strict)
    summary = run_summary(args.store, None)
    evaluation = final_evaluation(summary)
    prompts = evaluation["prompt"].tolist()
    adapter = Path(summary["adapter"])
    answers = max((args.store / "answers").glob("*/answers.jsonl"), key=lambda p: p.stat().st_mtime)
    made_by = json.loads((answers.parent / "answering.json").read_text())
    generation = GenerationSettings.model_validate(made_by["generation"])  # the answer flow's
    model = adapter_model(adapter)
    runs = []
    for i in range(2):
        generated, dequantized = generate_all(
            prompts, model, generation, args.store / f"repeat-{i}", 1, adapter
        )
        runs.append([g.text for g in generated])
    flow = [a["raw_answer"] for a in read_jsonl(answers)]
    final = evaluation["raw_prediction"].tolist()

    def same(a, b):
        return sum(x == y for x, y in zip(a, b, strict=True))

    print(
        json.dumps(
            {
                "dequantized": dequantized,
                "repeat_vs_repeat": same(runs[0], runs[1]),
                "repeat_vs_final_evaluation": [same(r, final) for r in runs],
                "repeat_vs_answer_flow": [same(r, flow) for r in runs],
                "answer_flow_vs_final_evaluation": same(flow, final),
                "rows": len(prompts),
            }
        )
    )


if __name__ == "__main__":
    main()
