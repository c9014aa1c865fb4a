"""Logging setup (JSON lines or text) with secrets redacted before anything is written.

Redaction happens in a ``logging.Filter`` on the handler, so it covers every format and every
logger that propagates to the root (kopf's, the Kubernetes client's), not just our JSON lines.
It keeps the shape of what it hides (``https://***@host``, ``Bearer ***``, ``password: ***``)
so a log still says *which* credential was involved.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

FORMATS = ("json", "text")
LEVELS = ("debug", "info", "warning", "error")
MASK = "***"

_STD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName",
                                                 "settings", "k8s_skip"}  # kopf's bulky extras
# Words that make a key name secret: substrings, case-insensitive, so camelCase (apiKey,
# clientSecret, accessToken) and snake/kebab case (client-key-data, ssh_key) both match.
# A bare "key" is too common ("key: default/web") to count, except as a URL query parameter.
_WORDS = (r"token|passw(?:or)?d|passphrase|secret|credential|authorization|cookie"
          r"|(?:api|private|ssh|secret|access|client|signing|encryption|auth)[_-]?key|key[_-]?data")
# Structured fields also hide whole kubeconfigs (they embed client keys and tokens).
_SECRET_KEY = re.compile(rf"{_WORDS}|kubeconfig", re.I)
# ...but a key that only names or locates a secret (secretRef, tokenFile) is useful to see.
_NOT_SECRET = re.compile(r"(?:ref|name|file|path|namespace)s?$", re.I)
# Every pattern that starts with a run of [\w.-] is anchored by a lookbehind on that same class,
# so it is tried once per run rather than at every character (quadratic on long tokens).
_KEY = rf"[\w.-]*(?:{_WORDS})[\w.-]*"
_FLAG = re.compile(rf"--?[\w-]*(?:{_WORDS})[\w-]*", re.I)  # an argv flag whose value follows


def _keep_if_not_secret(m: re.Match[str], replacement: str) -> str:
    key = m.group("key").strip("\"'-")
    return m.group(0) if _NOT_SECRET.search(key) else m.expand(replacement)


_PATTERNS: list[tuple[re.Pattern[str], Any]] = [
    # A private key, also when the text was cut before its END line.
    (re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY[A-Z ]*-----.*?"
                r"(?:-----END [A-Z0-9 ]*PRIVATE KEY[A-Z ]*-----|\Z)", re.S), MASK),
    (re.compile(r"LS0tLS1CRUdJTi[A-Za-z0-9+/=]+"), MASK),  # base64 of "-----BEGIN" (Secret data)
    # YAML block scalars under a secret key (`password: |` and the indented lines below it).
    (re.compile(rf"^(?P<ind>[ \t]*)(?P<key>{_KEY})[ \t]*:[ \t]*[|>][-+0-9]*[ \t]*$"
                r"(?:\n(?:(?P=ind)[ \t]+.*|[ \t]*)(?=\n|\Z))*", re.I | re.M),
     lambda m: _keep_if_not_secret(m, rf"\g<ind>\g<key>: {MASK}")),
    # HTTP authorization schemes: Bearer/Basic/token <credential>.
    (re.compile(r"(?i)\b(bearer|token|basic)(\s+)[A-Za-z0-9._~+/=-]{8,}"), rf"\1\2{MASK}"),
    # Userinfo in any URL, user:password or a token alone (https://ghp_x@github.com).
    (re.compile(r"(?i)(?<![a-z0-9+.-])([a-z][a-z0-9+.-]*://)[^/?#@\s]+@"), rf"\1{MASK}@"),
    # Credentials in query strings.
    (re.compile(r"(?i)([?&;](?:[\w.-]*[_-])?(?:access_?token|token|password|passwd|secret|key|apikey"
                r"|signature|sig)=)[^&#\s\"']+"), rf"\1{MASK}"),
    # key=value / key: value / "key": "value" for secret-ish keys (env, YAML, JSON, reprs).
    (re.compile(rf"(?<![\w.-])(?P<key>[\"']?{_KEY}[\"']?)(?P<sep>[ \t]*[:=][ \t]*)"
                r"(?P<scheme>(?:bearer|basic|token|digest)[ \t]+)?"
                r"(?P<q>[\"']?)(?P<val>(?<=\")(?:[^\"\\\n]|\\.)*|(?<=')(?:[^'\\\n]|\\.)*"
                r"|[^\s\"',;&}\]]+)",
                re.I),
     lambda m: _keep_if_not_secret(m, rf"\g<key>\g<sep>\g<scheme>\g<q>{MASK}")),
    # A secret flag and its separate value: --token abc, --password hunter2.
    (re.compile(rf"(?<![\w-])(?P<key>--?[\w-]*(?:{_WORDS})[\w-]*)(?P<sp>[ \t]+)(?!-)(?P<val>[^\s\"']+)",
                re.I),
     lambda m: _keep_if_not_secret(m, rf"\g<key>\g<sp>{MASK}")),
]


#: Something each pattern above needs to match (a secret word, a URL, base64 of "-----BEGIN"):
#: most log text has none of it and is spared the eight patterns (a tenth of the cost).
_MAYBE_SECRET = re.compile(r"token|pass|secret|credential|authorization|cookie|key|sig|bearer"
                           r"|basic|://|LS0tLS1", re.I)


def redact(text: str) -> str:
    """Hide credentials in free text. Safe to apply twice: two handlers may redact one record."""
    if not _MAYBE_SECRET.search(text):
        return text
    for pat, replacement in _PATTERNS:
        text = pat.sub(replacement, text)
    return text


def clean(key: str, value: Any) -> Any:
    """A structured value safe to write: secret keys masked, strings redacted, containers
    walked (argv lists too: the item after ``--token`` is masked), other objects by repr."""
    if key and _SECRET_KEY.search(key) and not _NOT_SECRET.search(key) and value not in (None, ""):
        return MASK
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bool | int | float | type(None)):
        return value
    if isinstance(value, Mapping):
        return {str(k): clean(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        out: list[Any] = []
        hide_next = False
        for item in value:
            out.append(MASK if hide_next and item is not None else clean("", item))
            hide_next = (isinstance(item, str) and bool(_FLAG.fullmatch(item))
                         and not _NOT_SECRET.search(item))
        return out
    return redact(repr(value))


def redact_record(record: logging.LogRecord) -> None:
    """Redact a record in place (message, extras, traceback, stack); never raises, because a
    filter that raises would crash the code that logged."""
    if getattr(record, "_redacted", False):  # by the handler's filter, then its formatter
        return
    try:
        try:
            msg = record.getMessage()
        except Exception:  # bad format arguments: keep the template, drop the arguments
            msg = f"{record.msg!s} [log arguments could not be formatted]"
        record.msg, record.args = redact(msg), None
        for key, value in list(vars(record).items()):
            if key not in _STD and not key.startswith("_"):
                setattr(record, key, clean(key, value))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        record._redacted = True
    except Exception:  # pragma: no cover - nothing above is expected to fail
        record.msg, record.args, record.exc_info, record.exc_text = (
            "log record dropped: redaction failed", None, None, None)


class RedactFilter(logging.Filter):
    """Redacts every record a handler is about to write, whatever its formatter."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and every ``extra`` field.
    Redacts too, so that it is safe even on a handler without RedactFilter."""

    def format(self, record: logging.LogRecord) -> str:
        redact_record(record)
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STD and not key.startswith("_"):
                out[key] = value
        if record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = record.stack_info
        return json.dumps(out, default=lambda o: redact(str(o)))


_QUOTE_IF = frozenset("\"=")


class TextFormatter(logging.Formatter):
    """``ts LEVEL logger: message key=value ...``: the ``extra`` fields stay (the VM, node
    or job a line is about), quoted only where a value has blanks, so grep still finds them."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        redact_record(record)
        text = super().format(record)
        head, sep, tail = text.partition("\n")  # a traceback goes after the fields
        fields = []
        for key, value in vars(record).items():
            if key in _STD or key.startswith("_"):
                continue
            shown = value if isinstance(value, str) else json.dumps(value, default=str)
            plain = shown and not any(c.isspace() or c in _QUOTE_IF for c in shown)
            fields.append(f"{key}={shown if plain else json.dumps(shown)}")
        return " ".join([head, *fields]) + sep + tail


def setup(level: str = "INFO", fmt: str = "json") -> None:
    """Log to stderr in ``fmt`` (json or text) at ``level`` (debug, info, warning, error);
    anything else is an error rather than a silent fallback nobody asked for."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: use one of {', '.join(FORMATS)}")
    if level.lower() not in LEVELS:
        raise ValueError(f"log level {level!r}: use one of {', '.join(LEVELS)}")
    redactor = RedactFilter()
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(redactor)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Handlers libraries put on their own loggers write too: kopf posts an object's warnings
    # as Kubernetes Events, readable by anyone who may list Events in that namespace.
    for logger in list(logging.root.manager.loggerDict.values()):
        for h in getattr(logger, "handlers", []):
            if not any(isinstance(f, RedactFilter) for f in h.filters):
                h.addFilter(redactor)
    for noisy in ("kubernetes.client.rest", "urllib3", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # kopf says "Handler ... succeeded" at INFO for every event of every object (and for
    # each startup/cleanup activity): most of the lines at scale, and a measurable share of
    # the agents' CPU. Its warnings and errors stay; --log-level debug brings all back.
    for name in ("kopf.objects", "kopf.activities"):
        logging.getLogger(name).setLevel(max(root.level, logging.WARNING)
                                         if root.level >= logging.INFO else logging.NOTSET)
