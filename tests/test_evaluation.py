"""The evaluation protocol on the tiny 4-bit model: deterministic, batched == one at a time."""

import pandas as pd
import pytest

from finance_qlora.evaluation import evaluate_model
from finance_qlora.files import write_jsonl
from finance_qlora.modeling import loaded
from finance_qlora.presets import resolve_config
from finance_qlora.prompts import cut_answer, to_prompt_completion
from finance_qlora.report import paired_examples
from finance_qlora.rouge import METRICS
from tests.conftest import generate_cut, make_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def config():
    return resolve_config("tiny-cpu", {"generation": {"max_new_tokens": 12, "batch_size": 4}})


@pytest.fixture(scope="module")
def prompts_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "test.jsonl"
    write_jsonl(path, [to_prompt_completion(r) for r in make_rows(7)])
    return path


def test_two_evaluations_give_identical_scores(config, prompts_path, tmp_path):
    first = evaluate_model(prompts_path, config.model, config.generation, tmp_path / "a", "x")
    second = evaluate_model(prompts_path, config.model, config.generation, tmp_path / "b", "x")
    assert first.rouge == second.rouge
    assert set(first.rouge) == set(METRICS)
    assert all(0.0 <= v <= 1.0 for v in first.rouge.values())
    a, b = pd.read_parquet(first.predictions_parquet), pd.read_parquet(second.predictions_parquet)
    assert a["prediction"].tolist() == b["prediction"].tolist()
    assert pd.read_csv(first.predictions_csv).shape[0] == 7
    # the uncut text and its token count are kept beside the scored answer
    assert a["prediction"].tolist() == [cut_answer(t) for t in a["raw_prediction"]]
    assert a["new_tokens"].between(0, config.generation.max_new_tokens).all()
    assert (a["new_tokens"] > 0).any()


def test_batched_generation_equals_one_at_a_time(config, prompts_path):
    from finance_qlora.files import read_jsonl

    prompts = [r["prompt"] for r in read_jsonl(prompts_path)]
    with loaded(config.model) as (model, tokenizer):
        batched = generate_cut(model, tokenizer, prompts, 12, batch_size=4)
        single = generate_cut(model, tokenizer, prompts, 12, batch_size=1)
    assert batched == single
    assert any(batched)  # the random model does say something


def test_comparison_refuses_different_prompts(config, prompts_path, tmp_path):
    base = evaluate_model(prompts_path, config.model, config.generation, tmp_path / "a", "x")
    other_path = tmp_path / "other.jsonl"
    write_jsonl(other_path, [to_prompt_completion(r) for r in make_rows(8)[1:]])
    other = evaluate_model(other_path, config.model, config.generation, tmp_path / "b", "y")
    with pytest.raises(ValueError, match="same prompts"):
        paired_examples(base, other)


def test_metrics_named_in_the_configuration_are_saved(config, prompts_path, tmp_path):
    import json

    from finance_qlora.config import EvaluationSettings
    from finance_qlora.rouge import ROUGE_MODULE

    # any name evaluate.load takes: here a local module, as no hub is reachable in tests
    evaluation = EvaluationSettings(metrics=["rouge", str(ROUGE_MODULE)])
    record = evaluate_model(
        prompts_path, config.model, config.generation, tmp_path / "a", "x", evaluation=evaluation
    )
    saved = json.loads((record.path / "metrics.json").read_text())
    assert saved["rouge"] == record.rouge
    assert saved[str(ROUGE_MODULE)] == record.rouge
