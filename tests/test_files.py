"""Content fingerprints of files and folders."""

from finance_qlora.files import fingerprint


def test_a_folder_fingerprint_covers_file_names_and_contents(tmp_path):
    folder = tmp_path / "adapter"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.json").write_text("{}")
    (folder / "sub" / "b.bin").write_bytes(b"\x00\x01")
    before = fingerprint(folder)
    assert fingerprint(folder) == before  # the same bytes, the same fingerprint

    (folder / "a.json").rename(folder / "c.json")  # the same bytes under another name
    renamed = fingerprint(folder)
    assert renamed != before
    (folder / "c.json").rename(folder / "sub" / "c.json")  # and in another folder
    assert fingerprint(folder) not in (before, renamed)
    (folder / "sub" / "c.json").rename(folder / "a.json")
    assert fingerprint(folder) == before

    (folder / "a.json").write_text("{ }")  # the same name, other bytes
    assert fingerprint(folder) != before


def test_a_file_fingerprint_is_its_sha256(tmp_path):
    import hashlib

    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"{}\n")
    assert fingerprint(path) == hashlib.sha256(b"{}\n").hexdigest()


def test_json_lines_round_trip_as_readable_utf8(tmp_path):
    from finance_qlora.files import read_jsonl, write_jsonl

    rows = [{"instruction": "Qu'est-ce qu'une obligation ?", "output": "Un prêt, 5 €."}, {"n": 1}]
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, rows)
    assert read_jsonl(path) == rows
    text = path.read_bytes().decode("utf-8")
    assert "prêt, 5 €" in text and "\\u" not in text  # characters, not escapes
    assert text.count("\n") == 2


def test_json_lines_are_utf8_whatever_the_locale(tmp_path):
    """A worker whose locale is not UTF-8 (LANG=C on some images, Windows) reads and writes
    the same files."""
    import locale

    from finance_qlora.files import read_jsonl, write_jsonl

    path, rows = tmp_path / "rows.jsonl", [{"output": "Un prêt à 5 %."}]
    previous = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")  # open()'s default encoding becomes ASCII
    try:
        write_jsonl(path, rows)
        assert read_jsonl(path) == rows
    finally:
        locale.setlocale(locale.LC_CTYPE, previous)
    assert path.read_bytes().decode("utf-8") == '{"output": "Un prêt à 5 %."}\n'
