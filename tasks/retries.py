"""Which failures are retried: what can heal (a dropped connection, a timeout, a 5xx, CUDA
out-of-memory or a CUDA error, an output that vanished), never bad input or a bug."""

from __future__ import annotations

from finance_qlora.errors import FinanceQLoRAError
from finance_qlora.store import StaleOutput

# Transient failures (hub downloads, a preempted GPU, CUDA hiccups) get retried after a pause.
HUB_RETRIES, HUB_RETRY_DELAY_S = 3, [10, 30, 90]
GPU_RETRIES, GPU_RETRY_DELAY_S = 2, [30, 120]


def retry_unless_bad_input(task, task_run, state) -> bool:
    """Prefect retry condition: retry what `is_transient` says can heal."""
    try:
        state.result()
    except FinanceQLoRAError:
        return False
    except Exception as exc:  # noqa: BLE001 - classified below
        return is_transient(exc)
    return False


def is_transient(exc: BaseException) -> bool:
    import torch

    from finance_qlora.parallel import RankFailed

    transient = (torch.OutOfMemoryError, StaleOutput, RankFailed, ConnectionError, TimeoutError)
    if isinstance(exc, transient):
        return True
    if isinstance(exc, RuntimeError):
        return str(exc).startswith("CUDA error")
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError):
        return False
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status is not None:
        return status >= 500 or status == 429
    return isinstance(exc, OSError)
