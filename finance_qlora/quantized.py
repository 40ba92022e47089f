"""4-bit weights quantized once and kept on disk: the first 4-bit load of a model quantizes
its checkpoint and saves the result under $FINANCE_QLORA_CACHE/quantized/<key>; later loads, in
any task or process on the worker, read that copy (a quarter of the size, no quantization)."""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import torch

from finance_qlora import builtin_models
from finance_qlora.config import ModelConfig
from finance_qlora.files import atomic_dir

log = logging.getLogger(__name__)
STALE_CLAIM_S = 3600  # writing a 7B model's 4-bit weights takes seconds


def source_identity(source: str, revision: str | None, token: str | None) -> str | None:
    """What pins a model's weights: a local folder's files (name, size, mtime), a hub model's
    commit. None where that cannot be told (the load itself then reports why)."""
    folder = Path(source)
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.suffix in {".json", ".safetensors"})
        stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        return json.dumps([str(folder.resolve()), stats])
    from transformers.utils import cached_file

    try:
        config = cached_file(source, "config.json", revision=revision, token=token)
    except OSError:
        return None
    if config is None:
        return None
    return f"{source}@{Path(config).parent.name}"  # .../snapshots/<commit>/config.json


def quantized_folder(
    cfg: ModelConfig, source: str, token: str | None, dtype: torch.dtype
) -> Path | None:
    """Where the 4-bit weights of `source` under `cfg`'s quantization settings are kept."""
    import bitsandbytes

    if not (cfg.load_in_4bit and cfg.reuse_quantized) or cfg.trust_remote_code:
        return None  # remote code may not survive a save: always load from the source
    identity = source_identity(source, cfg.revision, token)
    if identity is None:
        return None
    payload = json.dumps(
        [
            identity,
            cfg.quant_type,
            cfg.double_quant,
            str(dtype),
            bitsandbytes.__version__,  # its storage format may change between versions
        ]
    )
    return builtin_models.cache_root() / "quantized" / hashlib.sha256(payload.encode()).hexdigest()


def save_quantized(model, folder: Path) -> None:
    """Keep the 4-bit weights for the next load; a failure costs speed only, never the run.

    One writer at a time: a claim file made with O_EXCL. Others (torchrun ranks, generation
    shards, a second worker on a shared cache) skip; a claim older than an hour is a dead
    writer's, removed so that a later load saves.
    """
    claim = folder.with_name(f".claim-{folder.name}")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        with suppress(OSError):
            if time.time() - claim.stat().st_mtime > STALE_CLAIM_S:
                claim.unlink()
        return
    except OSError as exc:
        log.warning("could not keep the 4-bit weights under %s: %s", folder, exc)
        return
    try:
        if not (folder / "config.json").is_file():  # another process may have kept them
            with atomic_dir(folder) as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # a full disk reaches us as OSError or safetensors' own error
        log.warning("could not keep the 4-bit weights under %s: %s", folder, exc)
    finally:
        claim.unlink(missing_ok=True)


def load_kept(folder: Path, common: dict[str, Any]):
    """The kept 4-bit model, or None where there is none or it cannot be read (then it is
    removed and quantized again: a cache never stops a run)."""
    from transformers import AutoModelForCausalLM

    if not (folder / "config.json").is_file():
        return None
    try:
        return AutoModelForCausalLM.from_pretrained(folder, **common)
    except torch.OutOfMemoryError:
        raise  # the GPU's state, not the copy's: the caller's back-off handles it
    except Exception as exc:  # a truncated or edited copy: any library's error
        log.warning(
            "the kept 4-bit weights under %s are unreadable (%s); quantizing again",
            folder,
            str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__,
        )
        shutil.rmtree(folder, ignore_errors=True)
        gc.collect()  # the failed load's tensors
        return None
