from finance_qlora.prompts import (
    RESPONSE_MARKER,
    build_prompt,
    cut_answer,
    fit_completion,
    fit_rows,
    sentence_prefixes,
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


def _words_with_eos(text: str) -> int:
    """A stand-in tokenizer: one token a word, plus one for EOS."""
    return len(text.split()) + 1


def test_long_completion_is_cut_at_a_sentence_boundary_with_room_for_eos():
    text = "Bonds pay interest. They mature at a set date! Prices move? Yields too.\nMore here"
    assert sentence_prefixes(text) == [
        "Bonds pay interest. They mature at a set date! Prices move? Yields too.",
        "Bonds pay interest. They mature at a set date! Prices move?",
        "Bonds pay interest. They mature at a set date!",
        "Bonds pay interest.",
    ]
    fits = fit_completion(text, _words_with_eos, max_length=10)
    assert fits == "Bonds pay interest. They mature at a set date!"  # 9 words + EOS
    assert fit_completion(text, _words_with_eos, max_length=100) == text  # fits: unchanged
    assert fit_completion(text, _words_with_eos, max_length=3) is None  # not even a sentence
    assert fit_completion("One long sentence without a break", _words_with_eos, 4) is None


def test_rows_are_trimmed_or_dropped_and_counted():
    rows = [
        {"prompt": "Q1 ", "completion": "Short."},
        {"prompt": "Q2 ", "completion": "First part. Second part is longer."},
        {"prompt": "Q3 long prompt ", "completion": "Unbreakable answer of many words here."},
    ]

    def length(prompt: str, completion: str) -> int:
        return _words_with_eos(prompt + completion)

    kept, trimmed, dropped = fit_rows(rows, length, max_length=5)
    assert kept == [
        {"prompt": "Q1 ", "completion": "Short."},
        {"prompt": "Q2 ", "completion": "First part."},
    ]
    assert (trimmed, dropped) == (1, 1)
    assert all(length(r["prompt"], r["completion"]) <= 5 for r in kept)  # EOS included


def test_a_missing_or_null_input_is_no_input():
    plain = build_prompt("Q?")
    assert to_prompt_completion({"instruction": "Q?", "output": "A."})["prompt"] == plain
    assert to_prompt_completion({"instruction": "Q?", "input": None, "output": "A."})["prompt"] == (
        plain
    )


def test_sentence_prefixes_drop_the_space_before_a_line_break_and_trailing_breaks():
    assert sentence_prefixes("First line \nSecond line") == ["First line"]
    assert sentence_prefixes("One. Two. ") == ["One."]  # the trailing space is no break
    assert sentence_prefixes("  One. Two.") == ["  One."]  # leading space stays in the text


def test_a_completion_that_fits_exactly_is_kept_whole():
    assert fit_completion("One. Two.", len, 9) == "One. Two."
    assert fit_completion("One. Two.", len, 8) == "One."


def test_every_row_is_looked_at_and_counted():
    rows = [
        {"prompt": "", "completion": "Way too long for anything."},
        {"prompt": "", "completion": "Also far too long here."},
        {"prompt": "", "completion": "Ok. But this part is long."},
        {"prompt": "", "completion": "Fits."},
        {"prompt": "", "completion": "Tiny. Cut here please."},
    ]
    kept, trimmed, dropped = fit_rows(rows, lambda p, c: len(p + c), 6)
    assert [r["completion"] for r in kept] == ["Ok.", "Fits.", "Tiny."]
    assert (trimmed, dropped) == (2, 2)


def test_prompts_are_written_for_both_splits_with_their_digests(tmp_path):
    import json

    from finance_qlora.files import fingerprint, read_jsonl, write_jsonl
    from finance_qlora.prompts import template_digest, write_prompts
    from finance_qlora.records import SplitRecord

    splits = tmp_path / "splits"
    splits.mkdir()
    train = [{"instruction": "Q1?", "input": "ctx", "output": "A1."}]
    test = [{"instruction": "Q2?", "input": "", "output": " A2.\n"}]
    write_jsonl(splits / "train.jsonl", train)
    write_jsonl(splits / "test.jsonl", test)
    from finance_qlora.data import ROW_IDS, row_id

    ids = {"train": [row_id(r) for r in train], "test": [row_id(r) for r in test]}
    (splits / ROW_IDS).write_text(json.dumps(ids))  # as write_splits leaves it
    split = SplitRecord(
        folder=splits, fingerprint=fingerprint(splits), train_rows=1, test_rows=1, data_version="v"
    )
    record = write_prompts(split, tmp_path / "prompts")
    assert read_jsonl(record.train_path) == [to_prompt_completion(r) for r in train]
    assert read_jsonl(record.test_path) == [{"prompt": build_prompt("Q2?"), "completion": "A2."}]
    assert sorted(p.name for p in record.path.iterdir()) == [ROW_IDS, "test.jsonl", "train.jsonl"]
    assert (record.train_rows, record.test_rows, record.data_version) == (1, 1, "v")
    assert record.fingerprint == fingerprint(record.path)
    assert record.train_sha256 == fingerprint(record.train_path)
    assert record.test_sha256 == fingerprint(record.test_path)
    assert record.template == template_digest()
    assert json.loads(record.model_dump_json())["template"] == template_digest()


def test_the_template_digest_changes_with_any_of_the_template_text(monkeypatch):
    import finance_qlora.prompts as prompts

    digest = prompts.template_digest()
    assert len(digest) == 64 and digest == prompts.template_digest()
    for name in ("_HEADER_WITH_INPUT", "_HEADER_NO_INPUT", "RESPONSE_MARKER"):
        with monkeypatch.context() as patch:
            patch.setattr(prompts, name, getattr(prompts, name) + " ")
            assert prompts.template_digest() != digest, name


def test_the_template_digest_covers_the_prompt_with_an_input(monkeypatch):
    """The '### Input:' section is written by build_prompt itself, not a constant: the digest
    must see a prompt with an input, or an edit there would go unnoticed."""
    import finance_qlora.prompts as prompts

    digest, real = prompts.template_digest(), prompts.build_prompt

    def edited(instruction: str, input_text: str = "") -> str:
        text = real(instruction, input_text)
        return text.replace("### Input:", "### Context:") if input_text else text

    monkeypatch.setattr(prompts, "build_prompt", edited)
    assert prompts.template_digest() != digest


def test_the_template_digest_is_stable_across_releases():
    """Stored champions name their template by this digest: a new way of computing it (not a
    new template) would make every stored champion look re-templated. Update the value only
    together with a template change."""
    from finance_qlora.prompts import template_digest

    assert template_digest() == "2916a7e5fff1400195b001da02c30958b87654b6e9830f37fb8567ef25cee57a"
