"""Secrets: the Hugging Face token and the store's credentials, from Prefect Secret blocks or
the environment, redacted from every log record once known."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from finance_qlora.errors import ConfigError
from tasks.progress import run_logger

_SECRETS: set[str] = set()


def redact_in_logs(secret: str) -> None:
    """From now on, every log record in this process shows `secret` as '***'.

    Done in the record factory, so it holds for every handler: the console, Prefect's API
    log handler, and any added later."""
    if not _SECRETS:
        make_record = logging.getLogRecordFactory()

        def redacting_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = make_record(*args, **kwargs)
            message = record.getMessage()
            if any(s in message for s in _SECRETS):
                for s in _SECRETS:
                    message = message.replace(s, "***")
                record.msg, record.args = message, ()
            return record

        logging.setLogRecordFactory(redacting_factory)
    _SECRETS.add(secret)


def storage_options(secret: str | None) -> dict[str, Any]:
    """fsspec options (key, secret, endpoint...) from a Prefect Secret block holding a JSON
    object; without a block, the library reads the environment (AWS_*, GOOGLE_*, AZURE_*)."""
    if not secret:
        return {}
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(secret).get()
    except ValueError:
        raise ConfigError(
            f"output_dir_secret: no Prefect Secret block named {secret!r}; create it with the "
            "store's options as JSON (see README: the durable store)"
        ) from None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    if not isinstance(value, dict):
        raise ConfigError(
            f"output_dir_secret: the Secret block {secret!r} must hold a JSON object of "
            'fsspec options, e.g. {"key": ..., "secret": ...}'
        )
    for credential in value.values():
        if isinstance(credential, str) and len(credential) >= 8:
            redact_in_logs(credential)
    return value


def hf_token(secret_block: str, name: str) -> str | None:
    """The Hugging Face token from a Prefect Secret block, else HF_TOKEN; never logged."""
    if name.startswith("builtin:") or "://" in name:
        return None  # built offline or on a store: nothing to download from the Hub
    from prefect.blocks.system import Secret

    try:
        token, source = Secret.load(secret_block).get(), f"Secret block {secret_block!r}"
    except ValueError:  # no such block
        token, source = os.environ.get("HF_TOKEN") or None, "HF_TOKEN"
    if token:
        redact_in_logs(token)
        run_logger().info("Hugging Face token from %s", source)
    return token
