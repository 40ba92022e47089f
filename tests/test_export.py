"""The merged export on `tiny-cpu`: a plain transformers model (no bitsandbytes, no PEFT) that
gives the greedy answers of the 4-bit base model with the adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finance_qlora.config import GenerationSettings, ModelConfig
from finance_qlora.files import read_jsonl
from finance_qlora.generation import generate_shard
from finance_qlora.modeling import loaded
from finance_qlora.registry import read_champion
from finance_qlora.store import Store
from flows.export import main
from flows.finetune import finetune

pytestmark = pytest.mark.slow

TRAIN = {"train": {"learning_rate": 3e-4, "epochs": 1}}  # answers that vary (test_answer.py)


@pytest.fixture(scope="module")
def trained(prefect_api, tmp_path_factory):
    store = tmp_path_factory.mktemp("export-store")
    finetune(preset="tiny-cpu", overrides={"output_dir": str(store), **TRAIN})
    champion = read_champion(Store(str(store)))
    (prompts,) = store.glob("prompts/*/test.jsonl")
    return store, champion, [r["prompt"] for r in read_jsonl(prompts)]


def greedy(model, tokenizer, prompts: list[str], generation: GenerationSettings) -> list[str]:
    answers = generate_shard(model, tokenizer, prompts, generation)
    return [answers[i].text for i in range(len(prompts))]


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    store = trained[0]
    folder = tmp_path_factory.mktemp("export") / "merged"
    assert main(["--to", str(folder), "--output-dir", str(store)]) == 0
    return folder


def test_the_merged_model_answers_as_base_plus_adapter(trained, exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store, champion, prompts = trained
    generation = GenerationSettings.model_validate(champion.protocol.generation)
    settings = json.loads((Path(champion.adapter.folder) / "training_settings.json").read_text())
    cfg = ModelConfig.model_validate(settings["model"])
    # the base's NF4 weights dequantized, as the evaluation generates where the GPU has room
    # (generation.dequantize); bitsandbytes' 4-bit CPU kernel rounds differently, and on random
    # weights that can flip a near-tie late in an answer
    adapter = Path(champion.adapter.folder)
    with loaded(cfg, None, adapter, "always") as (model, tokenizer):
        with_adapter = greedy(model, tokenizer, prompts, generation)
    with loaded(cfg) as (model, tokenizer):
        base = greedy(model, tokenizer, prompts, generation)
    merged = AutoModelForCausalLM.from_pretrained(exported)
    merged_answers = greedy(merged, AutoTokenizer.from_pretrained(exported), prompts, generation)
    assert merged_answers == with_adapter
    assert with_adapter != base  # the adapter is in the merged weights
    # a plain model: no quantization asked for, no PEFT modules
    config = json.loads((exported / "config.json").read_text())
    assert "quantization_config" not in config
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert list(exported.glob("*.safetensors")) and not list(exported.glob("*.bin"))


def test_the_model_card_names_base_data_scores_and_recipe(trained, exported):
    _, champion, _ = trained
    card = (exported / "README.md").read_text()
    assert f"base_model: {champion.protocol.base_model.split('@')[0]}" in card
    assert champion.protocol.data_version in card
    for metric, score in champion.rouge.items():
        assert f"| {metric} | {score:.4f} |" in card
    assert '"learning_rate": 0.0003' in card and '"target_modules"' in card


def test_export_to_a_store_url(trained, exported):
    import fsspec

    store = trained[0]
    url = "memory://exports/finance-champion"
    assert main(["--to", url, "--output-dir", str(store)]) == 0
    target = Store(url)
    files = target.manifest(target.url)
    assert files is not None and set(files) == {
        str(p.relative_to(exported)) for p in exported.rglob("*") if p.is_file()
    }
    with fsspec.open(f"{url}/README.md", "rt") as f:
        assert f.read() == (exported / "README.md").read_text()


def test_no_champion_is_one_line_and_writes_nothing(prefect_api, tmp_path, capsys):
    store, folder = tmp_path / "empty-store", tmp_path / "merged"
    assert main(["--to", str(folder), "--output-dir", str(store)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: adapter: no champion yet in"), err
    assert not folder.exists()
