"""Export the champion (or a named adapter) merged into its base model: the NF4 base weights
dequantized, the LoRA merged in, saved as safetensors with the tokenizer and a model card,
loadable with `AutoModelForCausalLM.from_pretrained` (no bitsandbytes, no PEFT).

    python -m flows.export --adapter champion --to exports/finance-champion
    python -m flows.export --adapter champion --to s3://bucket/exports/finance-champion
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from finance_qlora.answering import adapter_model, resolve_adapter
from finance_qlora.config import default_store
from finance_qlora.errors import ConfigError, FinanceQLoRAError
from finance_qlora.export import export_merged, upload
from finance_qlora.store import local_cache, normalize_url
from flows.local_server import quiet_libraries, start_local_api
from tasks.retries import GPU_RETRIES, GPU_RETRY_DELAY_S, retry_unless_bad_input
from tasks.secrets import hf_token, storage_options
from tasks.store_access import StoreRef, local, store_of


@task(
    name="export-merged",
    retries=GPU_RETRIES,
    retry_delay_seconds=GPU_RETRY_DELAY_S,
    retry_condition_fn=retry_unless_bad_input,
    cache_policy=NO_CACHE,  # it writes outside the store: every call exports
)
def export_task(store: StoreRef, adapter: str, to: str) -> str:
    gated = resolve_adapter(store_of(store), adapter)
    adapter_dir = local(store, gated).path
    model = adapter_model(adapter_dir)
    token = hf_token(model.hf_token_secret, model.name)
    target = destination(to)
    if "://" not in target:
        export_merged(gated, adapter_dir, Path(target), token)
        return target
    staging = Path(tempfile.mkdtemp(prefix="export-", dir=local_cache()))
    try:
        export_merged(gated, adapter_dir, staging / "model", token)
        options = store_of(store).options if target.split("://")[0] in store.url else {}
        upload(staging / "model", target, options)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def destination(to: str) -> str:
    try:
        return normalize_url(to)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("output_dir:", "--to:", 1)) from None


@flow(name="finance-qlora-export")
def export_flow(
    to: str,
    adapter: str = "champion",
    output_dir: str | None = None,
    output_dir_secret: str | None = None,
) -> str:
    """The adapter ('champion' or an adapter folder's URL in the store) merged, written to `to`
    (a folder or a store URL)."""
    store = StoreRef(url=output_dir or default_store(), secret=output_dir_secret)
    return export_task(store, adapter, to)


def main(argv: list[str] | None = None) -> int:
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    quiet_libraries()  # library warnings to the log file, no library progress bars
    parser = argparse.ArgumentParser(
        prog="python -m flows.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--adapter", default="champion", help="'champion' or an adapter URL")
    parser.add_argument("--to", required=True, help="a folder or a store URL")
    parser.add_argument("--output-dir", help="the store (default $FINANCE_QLORA_STORE or runs)")
    parser.add_argument("--output-dir-secret", help="Prefect Secret block with its options")
    args = parser.parse_args(argv)
    try:
        if args.output_dir_secret:
            start_local_api()
            storage_options(args.output_dir_secret)
        store = StoreRef(url=args.output_dir or default_store(), secret=args.output_dir_secret)
        destination(args.to)
        resolve_adapter(store_of(store), args.adapter)  # no champion: one line, here
        start_local_api()
        target = export_flow(args.to, args.adapter, store.url, args.output_dir_secret)
    except FinanceQLoRAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"merged model: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
