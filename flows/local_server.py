"""Prefect's temporary local server for a command-line run, and how the run stops.

The server starts before the flow (so a bad Prefect setting fails first), one at a time per
PREFECT_HOME, and dies with the command whatever ends it (a watchdog child, kill -9
included). Ctrl-C and SIGTERM stop a run the same way: recorded as Crashed, resumable.
"""

from __future__ import annotations

import atexit
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

INTERRUPTED = (
    "interrupted: run the same command again to resume (finished steps come from the cache, "
    "training from its last checkpoint)"
)


# Ctrl-C, and SIGTERM (what `timeout`, Docker and Kubernetes send before killing): both stop
# the run the same way, recorded as Crashed and resumable; the exit status tells which came.
STOP_SIGNALS = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Stopped(KeyboardInterrupt):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def interrupt_once(signum, frame) -> None:
    """Stop now; a second Ctrl-C or SIGTERM must not cut short Prefect's recording of the run
    as Crashed, so it is ignored."""
    for stop in STOP_SIGNALS:
        signal.signal(stop, signal.SIG_IGN)
    raise Stopped(signum)


# The temporary server's watchdog: it waits for this process's end (its stdin closes however
# the process ends, kill -9 included) and stops the server, which would outlive it otherwise.
_WATCHDOG = """
import os, signal, sys
sys.stdin.buffer.read()
try:
    os.kill(int(sys.argv[1]), signal.SIGTERM)
except OSError:
    pass
"""
# Kept for the life of the process: a watchdog's pipe closes when its Popen is collected.
_WATCHDOGS: list[subprocess.Popen] = []


def quiet_libraries() -> Path:
    """A command-line run's console shows the project's lines: library warnings (transformers'
    deprecation notices, ...) go to a log file instead, and the libraries' progress bars are
    off. Used only by the commands: a library user keeps both. Returns the log file."""
    import logging

    import datasets
    from transformers.utils import logging as transformers_logging

    from finance_qlora.builtin_models import cache_root

    log_file = cache_root() / "logs" / "finance-qlora.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    logging.captureWarnings(True)
    warnings_logger = logging.getLogger("py.warnings")
    warnings_logger.addHandler(handler)
    warnings_logger.propagate = False
    transformers_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    return log_file


def start_local_api() -> None:
    """Prefect's temporary local server (when PREFECT_API_URL names none), started with SIGINT
    blocked: the server process inherits the blocked signal, so a Ctrl-C in the terminal, sent
    to the whole process group, reaches this process only and the server stays up to record
    the run's end. It still stops when this process exits."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    # Prefect's internal server class (no public API starts the temporary server early):
    # a singleton, the instance Prefect's client uses
    server = SubprocessASGIServer()
    if PREFECT_API_URL.value() or server.running:
        return
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        with first_start_lock():
            server.start()
        _WATCHDOGS.append(watch_server(server.server_process.pid))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


@contextmanager
def first_start_lock():
    """One temporary server starting at a time per PREFECT_HOME: the first creates and
    migrates the database, and a second run started at the same moment would crash in that
    migration; it waits here instead (start() returns once the server answers)."""
    import fcntl

    from prefect.settings import PREFECT_HOME

    home = Path(PREFECT_HOME.value()).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "finance-qlora-server.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def watch_server(pid: int) -> subprocess.Popen:
    """A watchdog that stops process `pid` once this process is gone (started with SIGINT
    blocked, like the server: a Ctrl-C leaves it waiting)."""
    watchdog = subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(pid)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # the pipe's write end stays open in this process until it ends

    def reap() -> None:  # a normal exit: the watchdog ends now and is waited for, no zombie
        watchdog.stdin.close()
        watchdog.wait(timeout=10)

    atexit.register(reap)
    return watchdog
