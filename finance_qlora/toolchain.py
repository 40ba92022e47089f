"""What Triton's GPU kernels need on this machine beyond the package (preflight's checks and
the decode kernel's fallback ask the same question; a module of its own, so that neither
imports the other)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sysconfig
from pathlib import Path


def triton_missing() -> str | None:
    """What Triton's GPU kernels lack here, or None: Triton itself, then a C compiler and
    Python's headers, with which Triton builds its kernel launcher at first use (the compiler
    found as Triton finds it: $CC, gcc, clang)."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (it comes with torch's CUDA wheels)"
    if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
        return "Triton needs a C compiler (gcc or clang, or $CC) and finds none"
    scheme = sysconfig.get_default_scheme()
    # Debian's own scheme puts headers under /usr/local; Triton reads them where Python's are
    include = sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)
    if not (Path(include["include"]) / "Python.h").is_file():
        return "Triton needs Python's headers (Python.h; e.g. apt install python3-dev)"
    return None
