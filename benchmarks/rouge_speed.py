"""The scoring's speed on the host, side by side in one process: 300 answer pairs (real
Finance-Alpaca answers scored against other rows' answers, each cut to its first 100 words, as
a 128-token generation) through rouge_score's own stemming tokenizer and through the metric's
CachedStemTokenizer (each distinct word stemmed once: "stemmed_once"), in turn, after one
warm-up of each; every score is checked equal.

    python benchmarks/rouge_speed.py --data ../shared/data/finance_alpaca_sample.jsonl
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rouge_score import rouge_scorer  # noqa: E402

from finance_qlora.evaluate_modules.finance_rouge import ROUGE_TYPES, CachedStemTokenizer  # noqa: E402
from finance_qlora.files import read_jsonl  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    outputs = [row["output"] for row in read_jsonl(args.data)]
    shuffled = random.Random(0).sample(outputs, len(outputs))
    pairs = [
        (" ".join(prediction.split()[:100]), reference)
        for prediction, reference in zip(shuffled[: args.pairs], outputs[: args.pairs], strict=True)
    ]
    ways = {
        "rouge_score_stemmer": lambda: rouge_scorer.RougeScorer(ROUGE_TYPES, use_stemmer=True),
        "stemmed_once": lambda: rouge_scorer.RougeScorer(
            ROUGE_TYPES, tokenizer=CachedStemTokenizer()
        ),
    }
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    scores = {}
    for repeat in range(args.repeats + 1):  # the first round warms both up, untimed
        for name in ways if repeat % 2 else list(ways)[::-1]:
            started = time.perf_counter()
            scorer = ways[name]()  # a new scorer a scoring, as the metric makes one
            scores[name] = [scorer.score(reference, p) for p, reference in pairs]
            if repeat:
                seconds[name].append(round(time.perf_counter() - started, 3))
    if scores["stemmed_once"] != scores["rouge_score_stemmer"]:
        raise SystemExit("the two tokenizers' scores differ")
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu_name(),
        "pairs": len(pairs),
        "seconds": seconds,
        "median_seconds": medians,
        "speed_up": round(medians["rouge_score_stemmer"] / medians["stemmed_once"], 2),
        "scores_equal": True,
        "command": " ".join(sys.argv),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
