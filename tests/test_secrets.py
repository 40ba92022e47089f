"""Secrets (tasks/secrets.py): the Hugging Face token from a Prefect Secret block, else
HF_TOKEN; the store's credentials from a Secret block holding a JSON object; every secret found
shown as '***' in every log record from then on. Secret blocks are real ones, saved to the
test session's Prefect API."""

from __future__ import annotations

import io
import json
import logging
import uuid

import pytest

from finance_qlora.errors import ConfigError
from tasks.secrets import hf_token, redact_in_logs, storage_options

TOKEN = "hf_TestToken0123456789abcdefXYZ"
HUB_MODEL = "meta-llama/Llama-2-7b-hf"


def saved_secret(value) -> str:
    """A fresh Prefect Secret block holding `value`: its name."""
    from prefect.blocks.system import Secret

    name = f"test-secret-{uuid.uuid4().hex[:10]}"
    Secret(value=value).save(name)
    return name


def no_block() -> str:
    return f"no-such-block-{uuid.uuid4().hex[:10]}"


# Redaction -----------------------------------------------------------------------------------
def test_redaction_covers_any_logger(caplog, redaction):
    redact_in_logs("hf_SecretValue42")
    logging.getLogger("some.library").warning("auth header Bearer %s", "hf_SecretValue42")
    assert "hf_SecretValue42" not in caplog.text and "Bearer ***" in caplog.text


def test_redaction_holds_for_a_handler_added_later_and_for_every_secret(redaction):
    redact_in_logs("first-secret-value")
    redact_in_logs("second-secret-value")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)  # added after the secrets were known
    logger = logging.getLogger("tests.added_later")
    logger.addHandler(handler)
    try:
        logger.warning("keys %s and %s", "first-secret-value", "second-secret-value")
        logger.warning("nothing secret here: %d rows", 3)
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue().splitlines() == ["keys *** and ***", "nothing secret here: 3 rows"]


# The store's credentials ---------------------------------------------------------------------
@pytest.mark.parametrize("secret", [None, ""])
def test_without_a_block_the_store_gets_no_options(secret):
    """No Secret block named: fsspec reads the environment; nothing is looked up."""
    assert storage_options(secret) == {}


def test_a_missing_store_block_is_one_line(prefect_api):
    name = no_block()
    with pytest.raises(ConfigError) as error:
        storage_options(name)
    message = str(error.value)
    assert message.startswith(f"output_dir_secret: no Prefect Secret block named {name!r}")
    assert "\n" not in message


@pytest.mark.parametrize("as_text", [True, False], ids=["json-text", "json-object"])
def test_the_store_block_gives_its_options_and_they_are_redacted(
    prefect_api, redaction, caplog, as_text
):
    options = {"key": "AKIAEXAMPLEKEY123", "secret": "wJalrXUtnFEMIexample", "region": "eu"}
    name = saved_secret(json.dumps(options) if as_text else options)
    assert storage_options(name) == options
    logging.getLogger("s3fs.test").warning(
        "signing with %s / %s", "AKIAEXAMPLEKEY123", "wJalrXUtnFEMIexample"
    )
    logging.getLogger("s3fs.test").warning("region %s", "eu")  # short values are not secrets
    assert "AKIAEXAMPLEKEY123" not in caplog.text and "wJalrXUtnFEMIexample" not in caplog.text
    assert "signing with *** / ***" in caplog.text and "region eu" in caplog.text


@pytest.mark.parametrize("value", ["not json at all", json.dumps(["key", "secret"]), "42"])
def test_a_store_block_that_is_not_a_json_object_is_one_line(prefect_api, value):
    name = saved_secret(value)
    with pytest.raises(ConfigError) as error:
        storage_options(name)
    assert str(error.value).startswith(
        f"output_dir_secret: the Secret block {name!r} must hold a JSON object of fsspec options"
    )


# The Hugging Face token ----------------------------------------------------------------------
def test_the_secret_block_comes_before_hf_token(prefect_api, redaction, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_FromTheEnvironment0123456789")
    assert hf_token(saved_secret(TOKEN), HUB_MODEL) == TOKEN


def test_without_a_block_hf_token_is_used(prefect_api, redaction, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert hf_token(no_block(), HUB_MODEL) == TOKEN


@pytest.mark.parametrize("env", [None, ""], ids=["unset", "empty"])
def test_without_a_block_or_hf_token_there_is_no_token(prefect_api, monkeypatch, env):
    if env is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", env)
    assert hf_token(no_block(), HUB_MODEL) is None


@pytest.mark.parametrize("name", ["builtin:tiny-llama", "s3://bucket/models/base", "file:///m"])
def test_a_model_not_on_the_hub_gets_no_token(prefect_api, monkeypatch, name):
    """Nothing is downloaded from the Hub for it, so no token is handed out."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert hf_token(saved_secret(TOKEN), name) is None


@pytest.mark.parametrize("from_block", [True, False], ids=["secret-block", "hf-token-env"])
def test_the_token_never_reaches_the_logs(prefect_api, redaction, monkeypatch, caplog, from_block):
    """The lookup says where the token came from, never the token; and anything that logs the
    token afterwards (a library's 401 message, say) shows '***'."""
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    block = saved_secret(TOKEN) if from_block else no_block()
    assert hf_token(block, HUB_MODEL) == TOKEN
    source = f"Secret block {block!r}" if from_block else "HF_TOKEN"
    assert f"Hugging Face token from {source}" in caplog.text
    logging.getLogger("huggingface_hub.test").warning("401 for Authorization: Bearer %s", TOKEN)
    assert "Bearer ***" in caplog.text and TOKEN not in caplog.text
