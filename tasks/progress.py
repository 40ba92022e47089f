"""What a run tells people: the run logger and progress artifacts."""

from __future__ import annotations

import logging

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a flow or task run, else a plain module logger."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("finance_qlora")


class Progress:
    """A Prefect progress artifact that advances as work gets done."""

    def __init__(self, key: str, description: str):
        self.id = create_progress_artifact(0.0, key=key, description=description)

    def __call__(self, done: int, total: int) -> None:
        update_progress_artifact(self.id, round(100.0 * done / max(total, 1), 1))
