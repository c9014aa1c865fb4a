"""Structured logs: one JSON object per line, extras kept, secrets never written."""

from __future__ import annotations

import json
import logging

from hyperfleet.operator.logs import JsonFormatter, redact

KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----"


def line(msg: str, **extra: object) -> dict[str, object]:
    record = logging.makeLogRecord({"msg": msg, "levelname": "INFO", "name": "t", **extra})
    out: dict[str, object] = json.loads(JsonFormatter().format(record))
    return out


def test_extras_become_fields() -> None:
    out = line("bound VM", vm="default/web-1", node="n1")
    assert out["msg"] == "bound VM" and out["vm"] == "default/web-1" and out["node"] == "n1"
    assert out["level"] == "info" and "ts" in out


def test_secrets_in_messages_and_fields_are_redacted() -> None:
    out = line(f"cloning https://bot:ghp_abcdef123456@git.example/repo with {KEY}",
               token="s3cr3t-value", headers={"Authorization": "Bearer abcdefghijkl"},
               url="https://user:pw123456@host/x")
    text = json.dumps(out)
    for secret in ("ghp_abcdef123456", "b3BlbnNzaC1rZXktdjEAAAAA", "s3cr3t-value",
                   "abcdefghijkl", "pw123456"):
        assert secret not in text
    assert out["token"] == "***"
    assert str(out["msg"]).startswith("cloning https://***@git.example/repo with ***")
    assert out["url"] == "https://***@host/x"
    assert out["headers"] == {"Authorization": "***"}


def test_redact_leaves_ordinary_text_alone() -> None:
    assert redact("VM web-1 booted on node-2") == "VM web-1 booted on node-2"
