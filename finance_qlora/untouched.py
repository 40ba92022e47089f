"""Folders in which nothing changed for a while, removed: what crashed tries leave (the
durable store's staging folders, `Store.staging`)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path


def touched_since(folder: Path, since: float) -> bool:
    """Whether `folder` or anything under it changed after `since` (a time in seconds); a part
    that cannot be read raises OSError (the caller leaves such a folder alone)."""
    if folder.stat().st_mtime > since:  # an entry added or removed in the folder itself
        return True

    def unreadable(error: OSError) -> None:
        raise error

    for root, dirs, names in os.walk(folder, onerror=unreadable):
        for name in dirs + names:
            with suppress(FileNotFoundError):  # removed meanwhile
                if os.lstat(os.path.join(root, name)).st_mtime > since:
                    return True
    return False


def remove_untouched(folders: Iterable[Path], older_than_s: float) -> list[Path]:
    """Remove each of `folders` in which nothing changed for `older_than_s` seconds; the
    removed ones. A folder that cannot be read, or is removed meanwhile, is left alone."""
    removed, since = [], time.time() - older_than_s
    for folder in folders:
        try:
            if touched_since(folder, since):
                continue
        except OSError:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            removed.append(folder)
    return removed
