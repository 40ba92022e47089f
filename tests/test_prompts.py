from finance_qlora.prompts import (
    RESPONSE_MARKER,
    build_prompt,
    cut_answer,
    to_prompt_completion,
)


def test_prompt_without_input_has_no_input_section():
    prompt = build_prompt("What is a bond?")
    assert "### Input:" not in prompt
    assert prompt.startswith("Below is an instruction that describes a task. Write")
    assert prompt.endswith("### Instruction:\nWhat is a bond?\n\n### Response:\n")


def test_prompt_with_input_has_input_section_before_response():
    prompt = build_prompt("Summarize.", "  Revenue rose 10%.  ")
    assert "paired with an input that provides further context" in prompt
    assert "### Instruction:\nSummarize.\n\n### Input:\nRevenue rose 10%.\n\n" in prompt
    assert prompt.endswith(RESPONSE_MARKER)


def test_blank_input_is_treated_as_no_input():
    assert build_prompt("Q?", "   ") == build_prompt("Q?")


def test_prompt_completion_pair_uses_the_same_template():
    row = {"instruction": "Q?", "input": "ctx", "output": " An answer.\n"}
    pair = to_prompt_completion(row)
    assert pair == {"prompt": build_prompt("Q?", "ctx"), "completion": "An answer."}


def test_answer_is_cut_at_the_next_section():
    assert cut_answer(" A bond is a loan.\n\n### Instruction:\nMore") == "A bond is a loan."
    assert cut_answer("No section here.\n") == "No section here."
    assert cut_answer("### Response:\nx") == ""
