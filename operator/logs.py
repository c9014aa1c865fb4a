"""Structured (JSON lines) logging with secrets redacted before anything is written."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

_STD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName",
                                                 "settings", "k8s_skip"}  # kopf's bulky extras
_SECRET_KEYS = re.compile(r"(token|password|secret|private[_-]?key|ssh[_-]?key|authorization)",
                          re.I)
_SECRET_VALUES = [  # (pattern, replacement)
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----",
                re.S), "***"),
    (re.compile(r"(?i)\b(bearer|token|basic)(\s+)[A-Za-z0-9._~+/=-]{8,}"), r"\1\2***"),
    (re.compile(r"(https?://)[^/@\s:]+:[^/@\s]+@"), r"\1***@"),  # credentials in URLs
]


def redact(text: str) -> str:
    for pat, replacement in _SECRET_VALUES:
        text = pat.sub(replacement, text)
    return text


def _clean(key: str, value: Any) -> Any:
    if _SECRET_KEYS.search(key):
        return "***"
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _clean(str(k), v) for k, v in value.items()}
    return value


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and every ``extra`` field."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _STD and not key.startswith("_"):
                out[key] = _clean(key, value if _jsonable(value) else repr(value))
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, default=str)


def _jsonable(value: Any) -> bool:
    return isinstance(value, str | int | float | bool | type(None) | dict | list)


def setup(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("kubernetes.client.rest", "urllib3", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
