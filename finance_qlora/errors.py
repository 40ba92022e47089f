"""User-facing errors: one line that names the field or file and says what to do."""

from __future__ import annotations

from pydantic import ValidationError


class FinanceQLoRAError(ValueError):
    """Bad input. Never retried: the same input fails the same way."""


class ConfigError(FinanceQLoRAError):
    """A configuration value is invalid."""


class DataError(FinanceQLoRAError):
    """A data file or data set cannot be used as Finance-Alpaca."""


class TrainingError(FinanceQLoRAError):
    """Training cannot succeed as configured (non-finite loss, out of memory at batch 1)."""


def describe_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """Turn pydantic's multi-line report into one line per problem, joined by '; '."""
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "config"
        got = err.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        parts.append(f"{prefix}{field}: {err['msg']}{shown}")
    return "; ".join(parts)
