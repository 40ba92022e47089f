"""A benchmark tool's result file: what stamps it (the card, the date, the command, torch) and
where it goes, <out>/<kind>-<card>-<date><tag><suffix>. The standard library and torch (read
when stamping) only, so that the tools run on a bare device machine (mm_host.py,
workspace_config.py) use it too."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path


def stamp() -> dict:
    """Where and when this process runs, and how it was started: a result's first fields."""
    import torch

    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {
        "machine": card.replace(" ", "-"),
        "date": datetime.now(UTC).date().isoformat(),
        "command": " ".join(sys.argv),
        "torch": torch.__version__,
    }


def result_path(out: Path, kind: str, stamped: dict, tag: str = "", suffix: str = ".json") -> Path:
    """The file for a result of `kind` stamped `stamped`, its folder made."""
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{kind}-{stamped['machine']}-{stamped['date']}{tag}{suffix}"


def write_json(path: Path, result: dict) -> Path:
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path
