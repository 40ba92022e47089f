"""The side process of train.compile_ahead alone, timed phase by phase (its log's timestamps):
the llama2-7b-h100 preset's train settings on the model folder given, empty compile caches.

    python benchmarks/ahead_alone.py MODEL_DIR DATA OUT
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from finance_qlora import compile_ahead
from finance_qlora.files import read_jsonl, write_jsonl
from finance_qlora.presets import resolve_config
from finance_qlora.prompts import to_prompt_completion

model_dir, data, out = sys.argv[1:4]
config = resolve_config("llama2-7b-h100", {"model": {"name": model_dir}})
folder = Path(tempfile.mkdtemp(prefix="ahead-alone-"))
write_jsonl(
    folder / compile_ahead.ROWS,
    [to_prompt_completion(r) for r in read_jsonl(Path(data))[: config.train.rows_per_step]],
)
spec = {name: getattr(config, name).model_dump(mode="json") for name in ("model", "lora", "train")}
(folder / compile_ahead.SPEC).write_text(json.dumps(spec))
env = {
    **os.environ,
    **{n: tempfile.mkdtemp() for n in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")},
}
started = time.perf_counter()
done = subprocess.run(
    [sys.executable, "-X", "importtime", "-m", "finance_qlora.compile_ahead", str(folder)],
    env=env,
    capture_output=True,
    text=True,
)
seconds = time.perf_counter() - started
imports = sorted(
    (line for line in done.stderr.splitlines() if line.startswith("import time:")),
    key=lambda line: -int(line.split("|")[1]) if line.split("|")[1].strip().isdigit() else 0,
)[:15]
log = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
Path(out).write_text(
    json.dumps(
        {
            "seconds": round(seconds, 2),
            "rc": done.returncode,
            "result": json.loads((folder / compile_ahead.RESULT).read_text())
            if done.returncode == 0
            else None,
            "imports": imports,
            "log": log[-80:],
        },
        indent=1,
    )
)
print(seconds, done.returncode)
