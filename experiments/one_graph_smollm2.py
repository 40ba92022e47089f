"""Does training every decoder layer through one compiled graph (the first layer's input made to
require a gradient, `kernels.compile_layers`) change what training computes, on real weights?

    python experiments/one_graph_smollm2.py --data ../shared/data/finance_alpaca_sample.jsonl

SmolLM2-135M-Instruct with llama2-7b-h100's training settings (compiled layers, padding-free,
no activation checkpointing: where the first layer traced a graph of its own), the model
swapped, nothing else: a few optimizer steps of 16 rows on the sample's first rows, in a fresh
process each, with the first layer's input requiring a gradient (as shipped) and without (as
before: the base model's `enable_input_require_grads` made a no-op). Records inductor's graph
lookups, the logged losses and the largest difference between the two adapters' weights; one
JSON file. Runs on a CPU (inductor's C++ kernels) or a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys
from pathlib import Path
import transformers
from finance_qlora import compile_cache
from finance_qlora.presets import resolve_config
from finance_qlora.training import train_adapter
prompts, out, mode = sys.argv[1:4]
if mode == "two-graphs":  # the first layer's input without a gradient, as before (this
    # reproduces it because the settings have activation checkpointing off, whose own hook
    # would otherwise give the first layer's input a gradient)
    transformers.PreTrainedModel.enable_input_require_grads = lambda self: None
config = resolve_config("llama2-7b-h100", {
    "model": {"name": "builtin:smollm2-135m"},
    "train": {"loader_workers": 0, "checkpoint_steps": 0, "logging_steps": 1},
})
record = train_adapter(Path(prompts), config.model, config.lora, config.train, Path(out))
print(json.dumps({"losses": record.losses, "steps": record.steps, "seconds": record.seconds,
                  "lookups": compile_cache.graph_lookups(), "adapter": str(record.folder)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "experiments/results")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    import torch
    from safetensors.torch import load_file

    from finance_qlora.files import read_jsonl, write_jsonl
    from finance_qlora.prompts import to_prompt_completion

    rows = 16 * args.steps  # the preset's 16 rows an optimizer step
    with tempfile.TemporaryDirectory(prefix="one-graph-") as tmp:  # adapters, inductor caches
        work = Path(tmp)
        prompts = work / "train.jsonl"
        write_jsonl(prompts, [to_prompt_completion(r) for r in read_jsonl(args.data)[:rows]])
        runs = {}
        for mode in ("one-graph", "two-graphs"):
            env_cache = {"TORCHINDUCTOR_CACHE_DIR": str(work / f"inductor-{mode}")}
            done = subprocess.run(
                [sys.executable, "-c", CHILD, str(prompts), str(work / mode), mode],
                cwd=ROOT,
                env={**os.environ, **env_cache},
                capture_output=True,
                text=True,
            )
            if done.returncode:
                raise SystemExit(done.stderr[-3000:])
            runs[mode] = json.loads(done.stdout.strip().splitlines()[-1])
            print(mode, runs[mode])
        adapters = [Path(runs[m].pop("adapter")) / "adapter_model.safetensors" for m in runs]
        weights = [load_file(path) for path in adapters]
    largest = max(
        (weights[0][k].float() - weights[1][k].float()).abs().max().item() for k in weights[0]
    )
    result = {
        "experiment": "one compiled graph for every layer against the first layer's own graph",
        "date": datetime.now(UTC).date().isoformat(),
        "machine": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "command": "python experiments/one_graph_smollm2.py " + " ".join(sys.argv[1:]),
        "rows": rows,
        "runs": runs,
        "adapter_weights_largest_difference": largest,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    device = "gpu" if torch.cuda.is_available() else "cpu"
    path = args.out / f"one-graph-smollm2-{device}-{result['date']}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
