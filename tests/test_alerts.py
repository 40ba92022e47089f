"""Alerts: the automations kept in deployments/automations.yaml, created by one command, send a
notification when a run of the deployments fails (received here by a local webhook)."""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from tests.conftest import cli, free_port, run_deployment, worker

pytestmark = [pytest.mark.server, pytest.mark.slow]


@pytest.fixture
def webhook():
    """A local HTTP server that keeps the bodies of the requests it receives."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            received.append(json.loads(body or b"{}"))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hook", received
    server.shutdown()


def test_a_failed_run_sends_a_notification(deployed, client, webhook, tmp_path):
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url, received = webhook
    with temporary_settings({PREFECT_API_URL: deployed["PREFECT_API_URL"]}):
        CustomWebhookNotificationBlock(
            name="finance-qlora-test",
            url=url,
            json_data={"subject": "{{subject}}", "body": "{{body}}"},
        ).save("finance-qlora-test", overwrite=True)
    for _ in range(2):  # a second run replaces the automations, it does not add to them
        created = cli(
            deployed,
            sys.executable,
            "-m",
            "deployments.alerts",
            "--notify",
            "custom-webhook/finance-qlora-test",
        )
    assert created.stdout.count("automation ") == 2
    # the alerts, beside the trigger that `prefect deploy` made for answer-standing
    names = [a.name for a in client.read_automations() if not a.name.startswith("answer-standing")]
    assert sorted(names) == ["finance-qlora run failed", "finance-qlora scheduled run not started"]

    params = {
        "overrides": {
            "output_dir": str(tmp_path / "store"),
            "data": {"dataset": str(tmp_path / "missing.jsonl")},
        }
    }
    with worker(deployed, "cpu-process", tmp_path / "worker.log"):
        run = run_deployment(deployed, "finance-qlora/smoke-cpu", params, client)
    assert run.state.is_failed()
    deadline = time.monotonic() + 120
    while not received and time.monotonic() < deadline:
        time.sleep(1)
    assert received, "no notification within 120 s"
    message = received[0]
    assert run.name in message["subject"] and "Failed" in message["subject"]
    assert "missing.jsonl does not exist" in message["body"]
