"""Where keeping the 4-bit copy goes (quantized.save_quantized: 4.2-5.4 s of a bare worker's
first evaluation on an H200, 2026-11-30), piece by piece, on the LLaMA-2-7B architecture:

    python benchmarks/kept_copy.py --data ../shared/data/finance_alpaca_sample.jsonl

The pieces, each timed alone after the model's 4-bit load: the state dict (bitsandbytes packs
each layer's quant state), its copy to the host, safetensors' write of that copy; then
save_pretrained whole, and its profile (the 25 costliest calls). Also the ROUGE metric's first
load in this process."""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.workload import Setup, sync  # noqa: E402
from finance_qlora.modeling import load_model  # noqa: E402


def timed(results: dict, name: str, function):
    sync()
    started = time.perf_counter()
    value = function()
    sync()
    results[name] = round(time.perf_counter() - started, 2)
    print(f"  {name}: {results[name]} s", flush=True)
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--arch", default="llama2-7b")
    parser.add_argument("--work", type=Path, default=Path("/tmp/finance-qlora-bench"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    setup = Setup(args)
    config = setup.config(model={"reuse_quantized": False})
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results: dict = {"gpu": gpu, "arch": args.arch}
    from safetensors.torch import save_file

    from finance_qlora.rouge import rouge_metric

    timed(results, "rouge_metric_first_load", rouge_metric)
    model = timed(results, "load_and_quantize", lambda: load_model(config.model))
    quantizer = model.hf_quantizer
    # bitsandbytes' quantizer leaves it to the modules (Linear4bit adds its packed quant state)
    state = timed(
        results,
        "packed_state_dict",
        lambda: quantizer.get_state_dict_and_metadata(model)[0] or model.state_dict(),
    )
    results["tensors"] = len(state)
    results["gib"] = round(sum(t.numel() * t.element_size() for t in state.values()) / 2**30, 2)
    host = timed(
        results, "to_host", lambda: {k: t.detach().contiguous().cpu() for k, t in state.items()}
    )
    with tempfile.TemporaryDirectory(dir=args.work) as folder:
        timed(
            results,
            "safetensors_write_from_host",
            lambda: save_file(host, f"{folder}/host.safetensors", metadata={"format": "pt"}),
        )
        for run in ("save_pretrained", "save_pretrained_again"):
            timed(results, run, lambda run=run: model.save_pretrained(f"{folder}/{run}"))
        profile = cProfile.Profile()
        profile.runcall(model.save_pretrained, f"{folder}/profiled")
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(25)
        results["profile"] = text.getvalue().splitlines()[-40:]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(results["profile"]))


if __name__ == "__main__":
    main()
