"""Create (or replace) the finance-qlora automations kept in deployments/automations.yaml.

    python -m deployments.alerts --notify slack-webhook/finance-qlora-alerts
    python -m deployments.alerts --notify custom-webhook/ops --late-after 7200

`--notify` names a saved Prefect notification block as `<block-type-slug>/<name>`; create one
in the UI (Blocks) or in code, e.g. `SlackWebhook(url=...).save("finance-qlora-alerts")`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from prefect.automations import Automation
from prefect.blocks.core import Block

AUTOMATIONS = Path(__file__).with_name("automations.yaml")


def load_automations(block_id: str, late_after: int | None = None) -> list[Automation]:
    """The automations of the YAML file, each notifying through the given block."""
    specs = yaml.safe_load(AUTOMATIONS.read_text())["automations"]
    automations = []
    for spec in specs:
        for action in spec["actions"]:
            if action["type"] == "send-notification":
                action["block_document_id"] = block_id
        if late_after and spec["trigger"].get("posture") == "Proactive":
            spec["trigger"]["within"] = late_after
        automations.append(Automation.model_validate(spec))
    return automations


def apply(block_slug: str, late_after: int | None = None) -> list[Automation]:
    """Replace automations of the same names, so running the command twice changes nothing."""
    try:
        block = Block.load(block_slug)
    except ValueError as exc:
        raise SystemExit(f"error: --notify {block_slug}: {exc}") from None
    from prefect.client.orchestration import get_client

    created = []
    with get_client(sync_client=True) as client:
        for automation in load_automations(str(block._block_document_id), late_after):
            for old in client.read_automations_by_name(automation.name):
                client.delete_automation(old.id)
            created.append(automation.create())
    return created


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.alerts", description=__doc__)
    parser.add_argument("--notify", required=True, help="a notification block: <type-slug>/<name>")
    parser.add_argument(
        "--late-after", type=int, help="seconds a scheduled run may wait (default 3600)"
    )
    args = parser.parse_args(argv)
    for automation in apply(args.notify, args.late_after):
        print(f"automation {automation.name!r}: {automation.id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
