"""Atomic folders, JSON Lines and content fingerprints."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from finance_qlora.errors import ConfigError


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to `final` only if the block succeeds.

    A crash leaves at most a hidden ``.tmp-*`` folder, never a half-written `final`.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    except OSError as exc:
        raise ConfigError(
            f"cannot write under {final.parent} ({exc.strerror}); choose a writable folder "
            "(--output-dir for results, FINANCE_QLORA_CACHE for built-in models)"
        ) from None
    try:
        yield tmp
        if final.exists():
            # Replace an older result: move it aside first so `final` is never half-written.
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def fingerprint(path: Path) -> str:
    """A file's sha256, or a folder's: the digest of its manifest (every file's name and
    sha256), the same value the durable store checks (`finance_qlora.store`)."""
    from finance_qlora.store import folder_manifest, manifest_digest, sha256_file

    path = Path(path)
    return manifest_digest(folder_manifest(path)) if path.is_dir() else sha256_file(path)
