"""Adapter ids are reproducible: the same weights give the same bytes whatever PYTHONHASHSEED
(PEFT keeps target_modules as a set and writes it in set order)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

SCRIPT = """
import hashlib, sys, tempfile
from pathlib import Path
from peft import LoraConfig
from finance_qlora.adapter import normalize_adapter_config
folder = Path(tempfile.mkdtemp())
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LoraConfig(r=16, target_modules=targets, task_type="CAUSAL_LM").save_pretrained(folder)
raw = (folder / "adapter_config.json").read_bytes()
if sys.argv[1] == "normalize":
    normalize_adapter_config(folder, "builtin:tiny-llama")
print(hashlib.sha256((folder / "adapter_config.json").read_bytes()).hexdigest())
"""


def digest(seed: str, mode: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        cwd=ROOT,
        env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


def test_the_saved_adapter_config_does_not_depend_on_the_hash_seed():
    seeds = ["0", "3", "11"]
    raw = {digest(seed, "raw") for seed in seeds}
    assert len(raw) > 1  # PEFT's own file does differ: the case this guards against
    assert len({digest(seed, "normalize") for seed in seeds}) == 1


def test_the_adapter_config_names_the_base_models_revision(tmp_path):
    import json

    from peft import LoraConfig

    from finance_qlora.adapter import normalize_adapter_config

    LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM").save_pretrained(tmp_path)
    normalize_adapter_config(tmp_path, "meta-llama/Llama-2-7b-hf", "8cca527")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == (
        "meta-llama/Llama-2-7b-hf",
        "8cca527",
    )
