"""Load and format on real Finance-Alpaca rows from ../shared/data (skipped where absent)."""

import pytest

from finance_qlora.files import read_jsonl
from finance_qlora.presets import resolve_config
from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.skipif(
    not SHARED_DATA.is_file(), reason=f"real Finance-Alpaca rows not found at {SHARED_DATA}"
)


def test_load_and_format_tasks_on_real_rows(prefect_api, tmp_path):
    from prefect import flow

    from finance_qlora.data import resolve_version
    from tasks.format import format_prompts
    from tasks.load import load_splits
    from tasks.store_access import StoreRef, local

    data = resolve_config(overrides={"data": {"dataset": str(SHARED_DATA)}}).data
    store = StoreRef(url=str(tmp_path))

    @flow  # the tasks as the flow runs them, with their cache keys
    def load_and_format():
        splits = load_splits(store, data, resolve_version(data.dataset), "hf-token")
        return local(store, splits), local(store, format_prompts(store, splits))

    splits, prompts = load_and_format()
    assert (splits.train_rows, splits.test_rows) == (1000, 300)
    train, test = read_jsonl(splits.train_path), read_jsonl(splits.test_path)
    keys = {tuple(r.values()) for r in train}
    assert not keys & {tuple(r.values()) for r in test}

    pairs = read_jsonl(prompts.test_path)
    assert len(pairs) == 300
    with_input = [p for p, r in zip(pairs, test, strict=True) if r["input"]]
    assert with_input and all("### Input:\n" in p["prompt"] for p in with_input)
    assert all(p["prompt"].endswith("### Response:\n") for p in pairs)
    assert [p["completion"] for p in pairs] == [r["output"].strip() for r in test]
